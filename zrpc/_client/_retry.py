"""The client's retry policy: which failed calls go out again, how many times, after what wait.

Its fields are those of gRPC's service-config ``retryPolicy`` (maxAttempts, initialBackoff,
maxBackoff, backoffMultiplier, retryableStatusCodes) so users read it without a manual; the
jitter is that of gRPC's connection backoff (doc/connection-backoff.md: ±20% of the delay).
The policy is a plain value with no I/O and no clock; :class:`~zrpc._client._core.ClientCore`
applies it in ``_finish``, the one place a call's outcome is made.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterable

from .._status import StatusCode

# gRPC caps maxAttempts at 5 by default; we allow a little more, never an unbounded number.
MAX_ATTEMPTS_LIMIT = 10


def _finite(value: object, name: str, *, above: float | None = None, at_least: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be above {above}, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name} must be at least {at_least}, got {value!r}")
    return float(value)


def status_codes(codes: Iterable[StatusCode | int], name: str) -> frozenset[StatusCode]:
    """A non-empty frozenset of failure codes (OK is not a failure); raises ValueError."""
    if isinstance(codes, (str, bytes, int)):
        raise ValueError(f"{name} must be a set of StatusCode, got {codes!r}")
    try:
        found = frozenset(StatusCode(code) for code in codes)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a set of StatusCode, got {codes!r}") from None
    if not found or StatusCode.OK in found:
        raise ValueError(f"{name} must name at least one code and not OK, got {sorted(found)!r}")
    return found


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an idempotent call that failed with a retryable code is sent again.

    A call is sent at most ``max_attempts`` times (1 turns retries off). Before attempt n+1 the
    client waits ``min(initial_backoff * backoff_multiplier**(n-1), max_backoff)`` seconds,
    spread by ±``jitter`` (a fraction) so that clients failed by one event do not come back in
    step. Only calls marked idempotent are retried, never past their deadline: when the wait
    would end at or after it, the call fails at once with its last error.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: frozenset[StatusCode] = frozenset({StatusCode.UNAVAILABLE})
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if (isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int)
                or not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT):
            raise ValueError(f"max_attempts must be an int from 1 to {MAX_ATTEMPTS_LIMIT}, "
                             f"got {self.max_attempts!r}")
        initial = _finite(self.initial_backoff, "initial_backoff", above=0)
        maximum = _finite(self.max_backoff, "max_backoff", at_least=initial)
        multiplier = _finite(self.backoff_multiplier, "backoff_multiplier", at_least=1.0)
        jitter = _finite(self.jitter, "jitter", at_least=0.0)
        if jitter >= 1:
            raise ValueError(f"jitter must be a fraction below 1 (0.2 is ±20%), got {self.jitter!r}")
        codes = status_codes(self.retryable_status_codes, "retryable_status_codes")
        # Frozen: normalise through object.__setattr__, as dataclasses' own docs suggest.
        for name, value in (("initial_backoff", initial), ("max_backoff", maximum),
                            ("backoff_multiplier", multiplier), ("jitter", jitter),
                            ("retryable_status_codes", codes)):
            object.__setattr__(self, name, value)

    def retries(self, code: StatusCode, attempt: int) -> bool:
        """True when a failure with ``code`` on attempt number ``attempt`` earns another attempt."""
        return attempt < self.max_attempts and code in self.retryable_status_codes

    def backoff(self, attempt: int, uniform: Callable[[], float] = random.random) -> float:
        """Seconds to wait after attempt number ``attempt`` (from 1) failed, before the next.

        ``uniform`` returns a float in [0, 1) (``random.Random(seed).random`` in tests).
        """
        try:
            grown = self.initial_backoff * self.backoff_multiplier ** (attempt - 1)
        except OverflowError:  # a huge multiplier: the cap applies anyway
            grown = math.inf
        base = min(grown, self.max_backoff)
        return base * (1.0 + self.jitter * (2.0 * uniform() - 1.0))


# The default of both client flavours (see zrpc.Client): frozen, so one instance is shared.
DEFAULT_RETRY = RetryPolicy()
