"""The client's protocol core, shared by the sync and asyncio clients. No I/O here.

It holds the request-id counter, the table of calls in flight, the queue of calls not yet sent,
and the deadline bookkeeping; it encodes REQUEST and CANCEL messages and turns REPLY messages into
outcomes. A flavour (``_sync``, ``_async``) owns the socket and only decides how to wait: it feeds
the core what it received and the current time, and settles the waiters the core hands back.

The core is not thread-safe: each flavour touches it from one thread (the sync client's I/O
thread, the asyncio client's event loop). Only :meth:`ClientCore.prepare` may run elsewhere, under
the flavour's lock, because it touches nothing but the id counter.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from .. import _protocol
from .._errors import Error
from .._protocol import ProtocolError
from .._status import StatusCode

logger = logging.getLogger("zrpc.client")

# (spec §3) The only command a broker sends a client.
_FROM_BROKER = frozenset({_protocol.REPLY})

# deadline_ms is a uint32 on the wire (spec §5); a longer timeout is sent as the largest value.
_MAX_DEADLINE_MS = 2**32 - 1

# Coalescing limits for one REQUEST message (spec §4 allows several pairs). They stay well under
# the broker's default frame limit (2,049 frames) and keep one message from delaying the next
# send by carrying megabytes; a single larger call is still sent, alone.
MAX_PAIRS_PER_MESSAGE = 256
MAX_BYTES_PER_MESSAGE = 1 << 20

# Stale heap entries (answered or cancelled calls) are pruned when they outnumber live ones by
# this factor, so the heap stays proportional to the calls in flight.
_HEAP_SLACK = 2


@dataclass(slots=True, eq=False)
class Call:
    """One call in flight. ``waiter`` is the flavour's future; the core never looks inside it."""

    request_id: int
    header: Any  # wire_pb2.RequestHeader, complete but for deadline_ms (set at each send)
    payload: bytes
    timeout: float
    deadline: float  # on the core's clock
    decode: Callable[[bytes], Any] | None = None
    waiter: Any = None
    # Which attempt this is. The client sends every call once today; a retry policy re-queues
    # a failed call with attempt + 1 from ClientCore._finish, the one place outcomes are made.
    attempt: int = 1
    sent: bool = False

    @property
    def service(self) -> str:
        return self.header.service

    @property
    def method(self) -> str:
        return self.header.method


class Outcome(NamedTuple):
    """A settled call: ``error`` is None on success, and then ``value`` is the result."""

    call: Call
    value: Any
    error: Error | None


def check_timeout(timeout: float, what: str = "timeout") -> float:
    """A timeout must be a finite number of seconds above zero: calls never wait forever."""
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {timeout!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{what} must be a finite number of seconds above 0, got {timeout!r}")
    return seconds


class ClientCore:
    """Request ids, calls in flight, deadlines and the REQUEST/REPLY codec of one client."""

    def __init__(
        self,
        default_timeout: float = 30.0,
        metadata: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.default_timeout = check_timeout(default_timeout, "default timeout")
        self.metadata = dict(metadata or {})
        self.clock = clock
        # Ids start at 1: a reply under id 0 answers no call (spec §6).
        self._ids = itertools.count(1)
        self._pending: dict[int, Call] = {}
        self._unsent: deque[Call] = deque()
        self._deadlines: list[tuple[float, int]] = []  # heap; entries of settled calls linger

    # -- making calls ------------------------------------------------------------------------

    def prepare(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        metadata: Mapping[str, str] | None = None,
        decode: Callable[[bytes], Any] | None = None,
    ) -> Call:
        """Validate and build a call; its deadline starts now. Raises Error(INVALID_ARGUMENT)."""
        if not isinstance(service, str) or not service or not isinstance(method, str) or not method:
            raise Error(StatusCode.INVALID_ARGUMENT,
                        f"service and method must be non-empty strings, got {service!r}, {method!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise Error(StatusCode.INVALID_ARGUMENT,
                        f"payload must be bytes (a serialized message), got {type(payload).__name__}")
        try:
            seconds = self.default_timeout if timeout is None else check_timeout(timeout)
        except ValueError as exc:
            raise Error(StatusCode.INVALID_ARGUMENT, str(exc)) from None
        merged = {**self.metadata, **(metadata or {})}
        # (spec §5) trace_id identifies the call end to end; the caller may bring its own.
        merged.setdefault("trace_id", uuid.uuid4().hex)
        # Build the header here, in the caller's thread, so bad metadata fails the caller and
        # can never reach the I/O thread.
        try:
            header = _protocol.RequestHeader(service=service, method=method, idempotent=bool(idempotent))
            header.metadata.update(merged)
        except (TypeError, ValueError) as exc:
            raise Error(StatusCode.INVALID_ARGUMENT, f"metadata must map str to str: {exc}") from None
        header.request_id = next(self._ids)
        return Call(header.request_id, header, bytes(payload), seconds, self.clock() + seconds, decode)

    def add(self, call: Call) -> None:
        """Put a prepared call in flight: it waits to be sent and its deadline is watched."""
        self._pending[call.request_id] = call
        self._unsent.append(call)
        heapq.heappush(self._deadlines, (call.deadline, call.request_id))

    @property
    def in_flight(self) -> int:
        """How many calls await an outcome."""
        return len(self._pending)

    def has_unsent(self) -> bool:
        """True when calls wait to be sent (some may turn out cancelled: next_request skips them)."""
        return bool(self._unsent)

    def next_request(self, now: float) -> tuple[list[bytes], list[Call]] | None:
        """One REQUEST carrying as many unsent calls as fit (spec §4), or None when none is left.

        ``deadline_ms`` is measured now, at send (spec §5), rounded down so the broker never
        waits longer than the client. Calls already cancelled, answered or expired are skipped.
        """
        frames = [_protocol.TAG, _protocol.REQUEST]
        calls: list[Call] = []
        size = 0
        while self._unsent and len(calls) < MAX_PAIRS_PER_MESSAGE:
            call = self._unsent[0]
            if self._pending.get(call.request_id) is not call or call.deadline <= now:
                self._unsent.popleft()  # expired ones stay pending: expire() answers them
                continue
            if calls and size + len(call.payload) > MAX_BYTES_PER_MESSAGE:
                break
            self._unsent.popleft()
            millis = int((call.deadline - now) * 1000)
            call.header.deadline_ms = min(max(millis, 1), _MAX_DEADLINE_MS)
            frames.append(call.header.SerializeToString())
            frames.append(call.payload)
            call.sent = True
            calls.append(call)
            size += len(call.payload)
        return (frames, calls) if calls else None

    def unsend(self, calls: Sequence[Call]) -> None:
        """Give back calls whose REQUEST could not be sent; they go first next time."""
        for call in reversed(calls):
            call.sent = False
            self._unsent.appendleft(call)

    # -- outcomes ----------------------------------------------------------------------------

    def handle_message(self, frames: Sequence[bytes]) -> list[Outcome]:
        """Outcomes of the calls a broker message answers; anything else is logged and dropped."""
        try:
            _, body = _protocol.split(frames, _FROM_BROKER)
            pairs = _protocol.pairs(body)
        except ProtocolError as exc:
            logger.warning("dropped a message from the broker (%s): %s", exc.reason, exc.message)
            return []
        outcomes = []
        # (spec §4) each pair is handled as if it had arrived alone, in order.
        for raw_header, payload in pairs:
            try:
                header = _protocol.decode_reply_header(raw_header)
            except ProtocolError as exc:
                logger.warning("dropped a reply from the broker: %s", exc.message)
                continue
            if header.request_id == 0:
                # (spec §6, §9) the broker could not tell which call a message of ours was.
                logger.warning("broker rejected a message it could not attribute to a call: %s: %s",
                               StatusCode.from_wire(header.code).name, header.message)
                continue
            call = self._pending.pop(header.request_id, None)
            if call is None:
                # The call already expired or was cancelled here; its answer has nobody to go to.
                logger.debug("dropped a late reply for request %d", header.request_id)
                continue
            code = StatusCode.from_wire(header.code)
            if code != StatusCode.OK:
                outcomes.append(self._finish(call, None, Error(code, header.message, dict(header.details))))
            else:
                outcomes.append(self._decoded(call, payload))
        self._prune()
        return outcomes

    def _decoded(self, call: Call, payload: bytes) -> Outcome:
        if call.decode is None:
            return self._finish(call, bytes(payload), None)
        try:
            value = call.decode(payload)
        except Error as exc:
            return self._finish(call, None, exc)
        except Exception as exc:  # a decoder's own failure must not kill the I/O loop
            return self._finish(call, None, Error(StatusCode.INTERNAL, f"could not decode the reply: {exc}"))
        return self._finish(call, value, None)

    def _finish(self, call: Call, value: Any, error: Error | None) -> Outcome:
        # The single place an outcome is made: where a retry policy would re-queue the call.
        return Outcome(call, value, error)

    def next_deadline(self) -> float | None:
        """The earliest deadline among calls in flight, or None when there are none."""
        heap = self._deadlines
        while heap:
            deadline, request_id = heap[0]
            call = self._pending.get(request_id)
            if call is not None and call.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> list[Outcome]:
        """Fail every call whose deadline is at or before ``now`` with DEADLINE_EXCEEDED."""
        outcomes = []
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                break
            _, request_id = heapq.heappop(self._deadlines)
            call = self._pending.pop(request_id)
            outcomes.append(self._finish(call, None, self.deadline_error(call)))
        self._prune()
        return outcomes

    def _prune(self) -> None:
        if len(self._deadlines) > 64 and len(self._deadlines) > _HEAP_SLACK * len(self._pending):
            self._deadlines = [(c.deadline, c.request_id) for c in self._pending.values()]
            heapq.heapify(self._deadlines)

    @staticmethod
    def deadline_error(call: Call) -> Error:
        """The error of a call that got no answer in time."""
        return Error(
            StatusCode.DEADLINE_EXCEEDED,
            f"deadline of {call.timeout:.3f}s exceeded calling {call.service}/{call.method} "
            f"(request {call.request_id}): no answer in time; pass a larger timeout= if the call "
            f"is slow, or check that a broker is reachable",
        )

    def cancel(self, request_id: int) -> Call | None:
        """Forget a call the caller gave up on; returns it when it was still in flight."""
        call = self._pending.pop(request_id, None)
        self._prune()
        return call

    def fail_all(self, error: Error) -> list[Outcome]:
        """Fail every call in flight with ``error`` (the client is closing)."""
        calls = list(self._pending.values())
        self._pending.clear()
        self._unsent.clear()
        self._deadlines.clear()
        return [self._finish(call, None, error) for call in calls]

    def sent_in_flight(self) -> list[int]:
        """Ids of calls in flight that the broker has been sent (CANCEL them when closing)."""
        return [call.request_id for call in self._pending.values() if call.sent]


def cancel_message(request_ids: Iterable[int]) -> list[bytes]:
    """A CANCEL for the client's own request ids (spec §8)."""
    return _protocol.cancel_message(request_ids)


def closed_error(in_flight: bool = False) -> Error:
    """The error of a call made on a closed client, or left in flight when it closed."""
    if in_flight:
        return Error(StatusCode.CANCELLED, "the client was closed with the call in flight")
    return Error(StatusCode.CANCELLED, "the client is closed; create a new client to make calls")
