"""The client's circuit breaker: one small state machine per service, fed outcomes and the time.

    closed ──(failure_threshold consecutive failures)──► open
      ▲                                                   │ reset_timeout passes
      └──────────(the trial call succeeds)──── half-open ◄┘
                                                   │ the trial call fails
                                                   └──────────────────────► open (timer restarts)

Like h11's connection state, a :class:`Circuit` does no I/O and reads no clock: the caller passes
``now`` (the core's injected clock), so tests drive it with plain numbers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .._errors import Error
from .._status import StatusCode
from ._retry import _finite, status_codes

# RESOURCE_EXHAUSTED is left out on purpose. The broker answers it at once, at almost no cost,
# when a queue or a limit is full: it is the broker's own load shedding, it clears as soon as a
# queue drains (milliseconds), and it is also the answer to an oversize message or to this
# client's own outstanding limit, faults of the caller, not of the service. Counting it would
# turn a moment of back-pressure (or one bad caller) into reset_timeout seconds of refusing every
# call to the service. Add it to failure_codes to shed load earlier on purpose.
DEFAULT_FAILURE_CODES = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED})

# Error details key that marks a call the breaker refused (it was never sent).
CIRCUIT_DETAIL = "zrpc-circuit"


class State(enum.Enum):
    """Where a service's circuit stands."""

    CLOSED = "closed"  # calls go out; consecutive failures are counted
    OPEN = "open"  # calls fail at once, unsent, until reset_timeout has passed
    HALF_OPEN = "half-open"  # one trial call goes out; the others fail at once


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """When the client stops sending calls to a service that keeps failing, and for how long.

    After ``failure_threshold`` consecutive attempts at calls to one service end with a code in
    ``failure_codes``, its circuit opens: calls to it fail at once with UNAVAILABLE, without
    being sent, for ``reset_timeout`` seconds. Each attempt counts, a retry's too: retries
    multiply the load on a failing service, and a call does not retry into a circuit its own
    failure opened (it fails with that failure). Then one trial call goes out; its success closes
    the circuit, its failure opens it again. Any other outcome (OK, NOT_FOUND, INVALID_ARGUMENT…)
    proves the service answers, and resets the count.
    """

    failure_threshold: int = 5
    reset_timeout: float = 5.0
    failure_codes: frozenset[StatusCode] = DEFAULT_FAILURE_CODES

    def __post_init__(self) -> None:
        if (isinstance(self.failure_threshold, bool) or not isinstance(self.failure_threshold, int)
                or self.failure_threshold < 1):
            raise ValueError(f"failure_threshold must be an int of 1 or more, got {self.failure_threshold!r}")
        object.__setattr__(self, "reset_timeout", _finite(self.reset_timeout, "reset_timeout", above=0))
        object.__setattr__(self, "failure_codes", status_codes(self.failure_codes, "failure_codes"))


class Circuit:
    """The circuit of one service: asked before each call is sent, told how each call ended."""

    __slots__ = ("service", "breaker", "state", "failures", "reopens_at", "trial_in_flight")

    def __init__(self, service: str, breaker: CircuitBreaker):
        self.service = service
        self.breaker = breaker
        self.state = State.CLOSED
        self.failures = 0  # consecutive, since the last success
        self.reopens_at = 0.0  # when an open circuit lets a trial call through
        self.trial_in_flight = False

    def admit(self, now: float) -> Error | None:
        """None when a call may be sent now, else the error to fail it with.

        In half-open the one call admitted is the trial: the caller reports its outcome with
        ``trial=True`` (or calls :meth:`abandon_trial` if it never gets one).
        """
        if self.state is State.OPEN and now >= self.reopens_at:
            self.state = State.HALF_OPEN
        if self.state is State.CLOSED:
            return None
        if self.state is State.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return None
        return self.refusal(now)

    def refuses(self, now: float) -> bool:
        """True while the circuit is open and its reset_timeout has not passed (no side effect)."""
        return self.state is State.OPEN and now < self.reopens_at

    def refusal(self, now: float) -> Error:
        """The UNAVAILABLE error of a call this circuit does not let through."""
        if self.state is State.OPEN:
            when = f"retrying in {max(0.0, self.reopens_at - now):.1f}s"
        else:
            when = "a trial call is in flight"
        return Error(
            StatusCode.UNAVAILABLE,
            f"circuit open for service {self.service!r} after {self.failures} consecutive "
            f"failures; {when}",
            {CIRCUIT_DETAIL: self.state.value},
        )

    def record(self, code: StatusCode, now: float, trial: bool = False) -> None:
        """Learn how a call that was sent ended (``trial``: it was the half-open trial)."""
        failed = code in self.breaker.failure_codes
        if self.state is State.CLOSED:
            if not failed:
                self.failures = 0
            else:
                self.failures += 1
                if self.failures >= self.breaker.failure_threshold:
                    self._open(now)
        elif self.state is State.HALF_OPEN and trial:
            # Only the trial decides: calls admitted before the circuit opened prove little
            # about the service now, and an open circuit ignores them likewise.
            self.trial_in_flight = False
            if failed:
                self.failures += 1
                self._open(now)
            else:
                self.state = State.CLOSED
                self.failures = 0

    def abandon_trial(self) -> None:
        """The trial call ended with no verdict (its caller cancelled it): let another through."""
        self.trial_in_flight = False

    def _open(self, now: float) -> None:
        self.state = State.OPEN
        self.reopens_at = now + self.breaker.reset_timeout
