"""The client's protocol core, shared by the sync and asyncio clients. No I/O here.

It holds the request-id counter, the table of calls in flight, the queue of calls not yet sent,
the deadline bookkeeping, the retry policy and the per-service circuit breakers; it encodes
REQUEST and CANCEL messages and turns REPLY messages into outcomes. A flavour (``_sync``,
``_async``) owns the sockets and only decides how to wait: it feeds the core what it received and
the current time, wakes it at :meth:`ClientCore.next_timer` (a deadline or the end of a retry's
backoff), and settles the waiters the core hands back.

The core is not thread-safe: each flavour touches it from one thread (the sync client's I/O
thread, the asyncio client's event loop). Only :meth:`ClientCore.prepare` may run elsewhere, under
the flavour's lock, because it touches nothing but the id counter (``itertools.count``, whose
``next`` is atomic, so the I/O thread may draw ids for retries at the same time).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from .. import _protocol
from .._errors import Error
from .._protocol import ProtocolError
from .._status import StatusCode
from ._breaker import Circuit, CircuitBreaker
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._silence import PROBE_AFTER, PROBE_TIMEOUT, SilenceWatch

logger = logging.getLogger("zrpc.client")

# (spec §3) The commands a broker sends a client.
_FROM_BROKER = frozenset({_protocol.REPLY, _protocol.REPLY_BATCH})

# deadline_ms is a uint32 on the wire (spec §5); a longer timeout is sent as the largest value.
_MAX_DEADLINE_MS = 2**32 - 1
# deadline_ms is sent _DEADLINE_MARGIN_MS short of what is left (a tenth of it for short ones), so
# the broker's DEADLINE_EXCEEDED, which says where the call was ("while queued: service 'x' has
# had no live worker"), arrives before the client's own timer fires. The client's timer won the
# race by the time the request took to arrive: a tester's call to a service with no worker was
# told "the call is slow at its worker or waits in its queue: pass a larger --timeout".
_DEADLINE_MARGIN_MS = 20
_DEADLINE_MARGIN_SHARE = 0.1

# Coalescing limits for one REQUEST message (spec §4 allows several pairs). Every broker's frame
# limit lets the protocol's most calls per message through, and the byte limit keeps one message
# from delaying the next send by carrying megabytes; a single larger call is still sent, alone.
MAX_PAIRS_PER_MESSAGE = _protocol.MAX_CALLS_PER_MESSAGE
MAX_BYTES_PER_MESSAGE = 1 << 20

# Metadata key carrying the attempt number of a retried call (absent on the first attempt), and
# error details key carrying how many attempts a call that was retried made.
ATTEMPT_METADATA = _protocol.ATTEMPT_METADATA
ATTEMPTS_DETAIL = "zrpc-attempts"
# Error details key of a call whose broker answered nothing, not even a Health call, for that
# many seconds (see _silence): it accepted the connection, so it runs, but its loop does not.
SILENT_DETAIL = "zrpc-broker-silent"
# Details key of a deadline error: the endpoint a connection is open to, with no handshake done.
HANDSHAKE_PENDING_DETAIL = "zrpc-handshake-pending"

# How long closing a client with calls in flight lets their CANCEL leave (spec §8), so that the
# broker stops them at their workers instead of letting them run to their deadlines.
CANCEL_ON_CLOSE_LINGER_MS = 200

_ONE_LINK = (0,)
# Attempts of one call at most, those refused as never run included (see _retry_later).
_MAX_ATTEMPTS = 100
# Codes of a broker's not-run refusal that another broker may not give (see _retry_later).
_SERVED_ELSEWHERE = frozenset({StatusCode.NOT_FOUND, StatusCode.UNIMPLEMENTED})
# How the message of a call failed because no broker could be reached begins (wait_for_broker off).
UNREACHABLE = "cannot connect to the broker"
# How the message of a call sent to a broker's backend begins.
BACKEND = "not a broker's frontend"
# A call sent longer ago than this to a broker the watch did not find silent by its deadline was
# slow: that broker answered something after it was sent (see deadline_error).
_SILENCE_KNOWN_AFTER = PROBE_AFTER + PROBE_TIMEOUT + 0.5
# What a link that owes answers is asked (see _silence): the broker answers it itself (spec §13).
_PROBE_SERVICE, _PROBE_METHOD = "zrpc.Broker", "Health"

# Stale heap entries (answered or cancelled calls) are pruned when they outnumber live ones by
# this factor, so the heap stays proportional to the calls in flight.
_HEAP_SLACK = 2


@dataclass(slots=True, eq=False)
class Call:
    """One call in flight. ``waiter`` is the flavour's future; the core never looks inside it."""

    request_id: int  # of the current attempt: each attempt has its own (spec §5)
    header: Any  # wire_pb2.RequestHeader, complete but for deadline_ms (set at each send)
    payload: bytes
    timeout: float
    deadline: float  # on the core's clock
    decode: Callable[[bytes], Any] | None = None
    waiter: Any = None
    # Which attempt this is: ClientCore._finish re-queues a retryable failure with attempt + 1.
    attempt: int = 1
    # How many of them were refused as never run (a draining broker, a backend): the retry
    # policy's max_attempts counts only the others, that may have run.
    refused: int = 0
    sent: bool = False
    # The broker connection this attempt was sent over (see ClientCore.next_request), and when.
    connection: int = 0
    sent_at: float = 0.0
    trial: bool = False  # this attempt is its circuit's half-open trial
    # Links (bits) whose brokers did not know the call's service or method: its retries go to
    # the others first (see _retry_later, link_order and next_request).
    avoid: int = 0
    last_error: Error | None = None  # of the previous attempt, while waiting out a backoff

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


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The client-wide metadata as a dict; checked now, or every call would fail with it."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map str to str, got {key!r}: {value!r} "
                             f"({type(key).__name__}: {type(value).__name__})")
    return dict(metadata)


class ClientCore:
    """Request ids, calls in flight, deadlines, retries, circuits and the codec of one client.

    ``retry`` and ``circuit_breaker`` are described at :class:`zrpc.Client`; ``uniform`` draws
    the retry jitter (a ``random.Random(seed).random`` makes the backoff schedule repeatable).

    ``endpoints`` are the brokers the flavour talks to (one when None), each over a DEALER of
    its own: link ``i`` for ``endpoints[i]``. A DEALER connected to several brokers would deal calls over
    them without saying which took which; one per broker lets the core know which calls a
    broker that dies takes with it, and send a CANCEL only to the broker holding the call.
    """

    def __init__(
        self,
        default_timeout: float = 30.0,
        metadata: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        circuit_breaker: CircuitBreaker | None = None,
        uniform: Callable[[], float] = random.random,
        max_message_bytes: int = _protocol.DEFAULT_MAX_MESSAGE_BYTES,
        endpoints: Sequence[str] | None = None,
        wait_for_broker: bool = True,
    ):
        self.default_timeout = check_timeout(default_timeout, "default timeout")
        self.wait_for_broker = bool(wait_for_broker)
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be a positive number of bytes, got {max_message_bytes!r}")
        self.max_message_bytes = max_message_bytes
        self.metadata = check_metadata(metadata)
        # Trace ids: 64 random bits per client, then a counter (32 hex digits, like W3C trace
        # ids). uuid4() per call cost 1.83 us, this 0.34 us (timeit), ~5% of the client's CPU.
        self._trace_prefix = os.urandom(8).hex()
        self._trace_seq = itertools.count(1)
        self.clock = clock
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy or None, got {type(retry).__name__}")
        if circuit_breaker is not None and not isinstance(circuit_breaker, CircuitBreaker):
            raise TypeError(f"circuit_breaker must be a CircuitBreaker or None, "
                            f"got {type(circuit_breaker).__name__}")
        self.retry = retry
        self.circuit_breaker = circuit_breaker
        self._uniform = uniform
        # Ids start at 1: a reply under id 0 answers no call (spec §6).
        self._ids = itertools.count(1)
        self._pending: dict[int, Call] = {}
        self._unsent: deque[Call] = deque()
        self._deadlines: list[tuple[float, int]] = []  # heap; entries of settled calls linger
        # Calls waiting out a retry backoff: (when it ends, request id of the next attempt).
        # They are in _pending under that id meanwhile, so cancel, expire and fail_all see them.
        self._backoffs: list[tuple[float, int]] = []  # heap; entries of settled calls linger
        self._circuits: dict[str, Circuit] = {}
        # Each link's current connection has a number; when the flavour's socket monitor says it
        # closed, the link's next connection gets a new one (a restarted broker is a new one).
        endpoints = [""] if endpoints is None else list(endpoints)
        links = len(endpoints)
        self._connection_of_link = list(range(1, links + 1))
        self._link_of_connection = {number: link for link, number in enumerate(self._connection_of_link)}
        self._connections = links  # numbers given so far
        # A link takes REQUESTs from its handshake until its connection closes: libzmq reports
        # the close a moment before the old connection stops taking messages, and a call sent
        # in that moment would carry the next connection's number and never be failed.
        # inproc has no ZMTP handshake, so no monitor event would ever bring its link up.
        self._link_up = [endpoint.startswith("inproc://") for endpoint in endpoints]
        # (spec §4c) A link sends REQUEST_BATCH once its connection's broker has answered in a
        # REPLY_BATCH: that broker reads them. Each connection starts in pairs again (a broker
        # restarted on the same endpoint may be an older one).
        self._link_batches = [False] * links
        # A link whose broker refused a call as it drains (spec §11) gets no more calls until its
        # connection closes (the broker's next start is a new connection); they wait meanwhile.
        self._link_draining = [False] * links
        # A link whose connection answered like a broker's backend (the endpoint for workers):
        # it gets no calls until that connection closes.
        self._link_backend = [False] * links
        # Each link's endpoint, whether its current connection attempt was accepted, and whether
        # its last attempt failed (nothing accepted it) with none accepted since: with
        # wait_for_broker off, calls fail at once while every link is so (see reconnect_scheduled).
        self._endpoints = endpoints
        self._link_accepted = [False] * links
        self._link_unreachable = [False] * links
        self._turn = links - 1  # the link that took the last REQUEST (round-robin, see link_order)
        # Links whose broker answers nothing, not even a Health call (see _silence), and what
        # advance() decided to send them (probes, CANCELs), for the flavour (take_link_messages).
        self._silence = SilenceWatch(links)
        self._stranded: set[int] = set()  # silent links that kept their calls: no other could take them
        self._link_messages: list[tuple[int, list[bytes]]] = []

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
        """Validate and build a call; its deadline starts now. Raises Error(INVALID_ARGUMENT), or
        Error(RESOURCE_EXHAUSTED) for a payload over ``max_message_bytes``."""
        if not isinstance(service, str) or not service or not isinstance(method, str) or not method:
            raise Error(StatusCode.INVALID_ARGUMENT,
                        f"service and method must be non-empty strings, got {service!r}, {method!r}")
        if not isinstance(idempotent, (bool, int)):  # "false" would be true, and run twice
            raise Error(StatusCode.INVALID_ARGUMENT, f"idempotent must be True or False, got {idempotent!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise Error(StatusCode.INVALID_ARGUMENT,
                        f"payload must be bytes (a serialized message), got {type(payload).__name__}")
        payload = bytes(payload)  # the same object for bytes; a memoryview's len() may count items
        if len(payload) > self.max_message_bytes:
            # (spec §9) The broker would answer this itself, but one frame past its frame cap
            # makes ZeroMQ drop our connection instead, and every call on it with it.
            raise Error(StatusCode.RESOURCE_EXHAUSTED,
                        f"request payload is {len(payload):,} bytes, over the client's max_message_bytes "
                        f"({self.max_message_bytes:,}); a larger call needs a larger limit in the client "
                        f"(max_message_bytes=) and in the broker (`zrpc broker start --max-message-bytes`)")
        try:
            seconds = self.default_timeout if timeout is None else check_timeout(timeout)
        except ValueError as exc:
            raise Error(StatusCode.INVALID_ARGUMENT, str(exc)) from None
        merged = {**self.metadata, **(metadata or {})}
        # (spec §5) trace_id identifies the call end to end; the caller may bring its own.
        if "trace_id" not in merged:
            merged["trace_id"] = f"{self._trace_prefix}{next(self._trace_seq):016x}"
        # Build the header here, in the caller's thread, so bad metadata fails the caller and
        # can never reach the I/O thread.
        try:
            header = _protocol.RequestHeader(service=service, method=method, idempotent=bool(idempotent),
                                             reads_batches=True, request_id=next(self._ids))
            fields = header.metadata
            for key, value in merged.items():  # not .update(): the Mapping ABC's costs 3x (timeit)
                fields[key] = value
        except (TypeError, ValueError) as exc:
            raise Error(StatusCode.INVALID_ARGUMENT, f"metadata must map str to str: {exc}") from None
        return Call(header.request_id, header, payload, seconds, self.clock() + seconds, decode)

    def add(self, call: Call) -> Outcome | None:
        """Put a prepared call in flight: it waits to be sent and its deadline is watched.

        Returns the call's outcome at once, unsent, when its service's circuit is open, or
        (``wait_for_broker`` off) when no broker can be reached.
        """
        # Unreachable first: a call refused after _admit made it its circuit's trial would
        # leave that circuit waiting for the trial's outcome for ever.
        refusal = self._no_broker_error() or self._admit(call, self.clock())
        if refusal is not None:
            return Outcome(call, None, refusal)
        self._pending[call.request_id] = call
        self._unsent.append(call)
        heapq.heappush(self._deadlines, (call.deadline, call.request_id))
        return None

    def circuit(self, service: str) -> Circuit | None:
        """The circuit of ``service`` (None without a circuit breaker)."""
        if self.circuit_breaker is None:
            return None
        circuit = self._circuits.get(service)
        if circuit is None:
            circuit = self._circuits[service] = Circuit(service, self.circuit_breaker)
        return circuit

    def _admit(self, call: Call, now: float) -> Error | None:
        if self.circuit_breaker is None:
            return None
        circuit = self.circuit(call.service)
        if circuit is None:
            return None
        refusal = circuit.admit(now)
        call.trial = refusal is None and circuit.trial_in_flight
        return refusal

    @property
    def in_flight(self) -> int:
        """How many calls await an outcome."""
        return len(self._pending)

    def unsent(self) -> int:
        """How many calls wait to be sent (some may turn out cancelled)."""
        return len(self._unsent)

    def has_unsent(self) -> bool:
        """True when calls wait to be sent (some may turn out cancelled: next_request skips them)."""
        unsent, pending = self._unsent, self._pending
        while unsent and pending.get(unsent[0].request_id) is not unsent[0]:
            unsent.popleft()  # answered, cancelled or expired while no link could take it
        return bool(unsent)

    def link_order(self) -> Sequence[int]:
        """The open links to offer the next REQUEST to, in turn: the one after the link that took
        the last (see :meth:`took`) first, then the others (a link whose queue is full passes it
        on).

        A link whose broker is draining takes nothing: it would refuse every call. When no
        other link is up, calls wait, as they do while no broker is connected, for that
        connection to close and the link's next one (the broker's successor) to come up, or
        for their deadline (spec §11). A link whose broker answers nothing at all (see _silence)
        takes calls only when no other link can.
        """
        up, draining, backend = self._link_up, self._link_draining, self._link_backend
        count = len(up)
        if count == 1:
            return _ONE_LINK if up[0] and not draining[0] and not backend[0] else ()
        order = [link for link in ((self._turn + k) % count for k in range(1, count + 1))
                 if up[link] and not draining[link] and not backend[link]]
        if self._silence.silent_links:
            silent = self._silence.silent
            order = [link for link in order if not silent[link]] or order
        unsent = self._unsent
        if unsent and unsent[0].avoid:  # a retry for the brokers that did not know its service
            avoid = unsent[0].avoid
            order = sorted(order, key=lambda link: avoid >> link & 1)  # stable: the others first
        return order

    def took(self, link: int) -> None:
        """``link`` took a REQUEST: the next one is offered to the link after it first."""
        self._turn = link

    def link_is_up(self, link: int) -> bool:
        """Did the connection of ``link`` finish its handshake, and has it not closed since?"""
        return self._link_up[link]

    def connection_up(self, link: int) -> None:
        """The connection of ``link`` finished its handshake (the flavour's socket monitor)."""
        self._link_up[link] = True
        self._link_unreachable[link] = False
        self._silence.reset(link)
        if self._stranded:  # a silent link's calls may go here now: look at the next advance
            self._silence.due = 0.0

    def connected(self, link: int) -> None:
        """A connection attempt of ``link`` was accepted (its handshake may still fail)."""
        self._link_accepted[link] = True
        self._link_unreachable[link] = False

    def reconnect_scheduled(self, link: int) -> list[Outcome]:
        """ZeroMQ will try ``link`` again later: its connection closed, or its attempt failed."""
        accepted, self._link_accepted[link] = self._link_accepted[link], False
        if accepted:  # a connection that closed (a CURVE handshake refused, a broker gone)
            return []
        return self._connect_failed(link)

    def _connect_failed(self, link: int) -> list[Outcome]:
        """A connection attempt of ``link`` failed: nothing accepted it (the broker is not
        running, or the address is wrong).

        With ``wait_for_broker`` on (the default) calls wait for a broker within their deadline,
        as they do while a broker restarts. Off (a command-line tool, gRPC's default), the calls
        that wait to be sent fail UNAVAILABLE at once when no link is up and every link's last
        attempt failed, and so do new calls until one connects.
        """
        self._link_unreachable[link] = True
        return self._fail_unsent()

    def _fail_unsent(self) -> list[Outcome]:
        """When no broker can take a call (see _no_broker_error): fail those waiting to be sent."""
        error = self._no_broker_error()
        if error is None:
            return []
        outcomes = []
        for call in list(self._unsent):
            if self._pending.get(call.request_id) is call:
                del self._pending[call.request_id]
                outcomes.append(self._finish(call, None, _with_last_attempt(error, call), retry=False, record=False))
        self._unsent.clear()
        return outcomes

    def _no_broker_error(self) -> Error | None:
        """The error of a call that no broker can take, or None. Every endpoint a broker's
        backend: it never will, and waiting would only end at the deadline. Without
        wait_for_broker, also every endpoint whose last attempt failed (and no other)."""
        unreachable, backend = self._link_unreachable, self._link_backend
        if self.wait_for_broker:
            if not all(backend):
                return None
        elif not all(a or b for a, b in zip(unreachable, backend)):
            return None
        endpoints = self._endpoints
        for endpoint, wrong in zip(endpoints, backend):
            if wrong:  # the more useful thing to say
                return _backend_error(endpoint)
        return Error(StatusCode.UNAVAILABLE, f"{UNREACHABLE} at {', '.join(endpoints)}: nothing accepted the "
                     f"connection (is the broker running there?)",
                     {"zrpc-endpoint": endpoints[0]} if len(endpoints) == 1 else {})

    def next_request(self, now: float, link: int = 0) -> tuple[list[bytes], list[Call]] | None:
        """One REQUEST, or REQUEST_BATCH, carrying as many unsent calls as fit (spec §4, §4c)
        for ``link``, or None when none is left.

        ``deadline_ms`` is measured now, at send (spec §5), rounded down and a margin short, so
        the broker never waits longer than the client (see _DEADLINE_MARGIN_MS). Calls already
        cancelled, answered or expired are skipped. A link whose broker reads batches gets one;
        a call too large for a batch goes alone, in a REQUEST, so that its payload is not copied.
        """
        batched = self._link_batches[link]
        # Bytes the message may carry: a batch's frame limit counts headers and entry overheads too.
        limit = _protocol.MAX_BATCH_BYTES if batched else MAX_BYTES_PER_MESSAGE
        headers: list[bytes] = []
        calls: list[Call] = []
        carried = 0  # bytes of the calls taken, counted as a batch counts them
        connection = self._connection_of_link[link]
        while self._unsent and len(calls) < MAX_PAIRS_PER_MESSAGE:
            call = self._unsent[0]
            if self._pending.get(call.request_id) is not call or call.deadline <= now:
                self._unsent.popleft()  # expired ones stay pending: expire() answers them
                continue
            payload = call.payload
            if calls and (carried + len(payload) > limit or call.avoid >> link & 1):
                break  # (a retry this link's broker refused heads the next REQUEST: see link_order)
            millis = int((call.deadline - now) * 1000)
            millis -= min(int(millis * _DEADLINE_MARGIN_SHARE), _DEADLINE_MARGIN_MS)
            call.header.deadline_ms = min(max(millis, 1), _MAX_DEADLINE_MS)
            raw = call.header.SerializeToString()
            alone = batched and len(raw) + len(payload) >= _protocol.BATCH_CALL_BYTES
            entry = len(raw) + len(payload) + _protocol.BATCH_ENTRY_OVERHEAD
            # Headers count too, pairs or batch: a broker refuses a REQUEST whose headers pass
            # MAX_REQUEST_HEADER_BYTES (review: 18 calls of 60 KB metadata came to 1,081,350).
            if calls and (alone or carried + entry > limit):
                break  # (a first call always fits a batch: it is under BATCH_CALL_BYTES)
            self._unsent.popleft()
            headers.append(raw)
            call.sent = True
            call.connection = connection
            call.sent_at = now
            calls.append(call)
            carried += entry
            if alone:  # too large for a batch: in a REQUEST of its own, its payload uncopied
                batched = False
                break
        if not calls:
            return None
        self._silence.sent(link, now)
        payloads = [call.payload for call in calls]
        if batched:
            return _protocol.batch_message(_protocol.REQUEST_BATCH, headers, payloads), calls
        return _protocol.request_message(zip(headers, payloads)), calls

    def unsend(self, calls: Sequence[Call]) -> None:
        """Give back calls whose REQUEST could not be sent; they go first next time."""
        for call in reversed(calls):
            call.sent = False
            call.connection = 0
            self._unsent.appendleft(call)

    # -- broker connections ------------------------------------------------------------------

    def connection_closed(self, link: int, endpoint: str) -> list[Outcome]:
        """The connection of ``link`` (to ``endpoint``) closed: the calls sent over it are lost.

        No reply can come: a restarted broker knows nothing of them, and the DEALER's next
        connection has a new routing id. They fail UNAVAILABLE, and the retry policy sends the
        idempotent ones again. The flavour reads its monitors before each send, so that no call
        goes over a link's next connection stamped with this one's number.
        """
        if self._link_up[link]:  # the flavour replaces the DEALER: its first attempt is a new one
            self._link_accepted[link] = False
        # (Else the same DEALER tries again: its retry follows this accepted connection, which
        # closed before its handshake ended, a CURVE refusal say: that is no unreachable broker.)
        self._link_up[link] = False
        self._link_batches[link] = False
        self._link_draining[link] = False
        self._link_backend[link] = False
        self._silence.reset(link)
        closed = self._connection_of_link[link]
        self._connections += 1
        self._connection_of_link[link] = self._connections
        del self._link_of_connection[closed]
        self._link_of_connection[self._connections] = link
        lost = [call for call in self._pending.values() if call.connection == closed and call.sent]
        outcomes = []
        for call in lost:
            del self._pending[call.request_id]
            error = Error(StatusCode.UNAVAILABLE,
                          f"lost the connection to the broker at {endpoint} with the call to "
                          f"{call.service}/{call.method} in flight (the broker stopped, or the network "
                          f"failed); it may or may not have run",
                          {"zrpc-endpoint": endpoint})
            # Not the service's failure: a circuit opened by it would fail the retries too.
            outcome = self._finish(call, None, error, record=False)
            if outcome is not None:  # None: the call was re-queued for another attempt
                outcomes.append(outcome)
        if lost:  # each call's own error says it too: no warning for every command-line call
            logger.info("lost the connection to the broker at %s with %d call(s) in flight (%d to retry)",
                        endpoint, len(lost), len(lost) - len(outcomes))
        self._prune()
        return outcomes

    # -- outcomes ----------------------------------------------------------------------------

    def handle_message(self, frames: Sequence[bytes], link: int) -> list[Outcome]:
        """Outcomes of the calls a broker message (read from ``link``) answers; anything else is
        logged and dropped."""
        if self._silence.heard(link):
            logger.info("zrpc client: the broker at %s answers again; it takes calls again",
                        self._endpoints[link])
            if self._stranded:  # calls kept by another silent link may come here now
                self._silence.due = 0.0
        if len(frames) > 1 and frames[0] == _protocol.TAG and frames[1] == _protocol.DISCONNECT:
            if _protocol.decode_disconnect_message(frames[2:]).drain:
                # (spec §11) our broker drains: nothing more over this connection, calls wait.
                self._link_draining[link] = True
                return []
            return self._answered_by_a_backend(link)
        try:
            command, body = _protocol.split(frames, _FROM_BROKER)
            batch = command == _protocol.REPLY_BATCH
            pairs = _protocol.batch_pairs(body) if batch else _protocol.pairs(body)
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
                # (spec §4c) maybe a batch an older broker does not read: pairs always do.
                self._link_batches[link] = False
                continue
            call = self._pending.pop(header.request_id, None)
            if call is None:
                # The call already expired or was cancelled here; its answer has nobody to go to.
                logger.debug("dropped a late reply for request %d", header.request_id)
                continue
            if batch and call.connection == self._connection_of_link[link]:
                # (spec §4c) this connection's broker reads REQUEST_BATCH. Only an answer to a
                # call sent over it says so: a closed connection's batch, read late, says nothing
                # of the broker that took the endpoint since (its calls were failed already).
                self._link_batches[link] = True
            code = header.code
            if code:
                code = StatusCode.from_wire(code)
                error = Error(code, header.message, dict(header.details))
                if _refused_draining(error) and call.connection == self._connection_of_link[link]:
                    self._link_draining[link] = True  # before _finish: its retry goes elsewhere
                outcome = self._finish(call, None, error)
            else:
                outcome = self._decoded(call, payload)
            if outcome is not None:  # None: the call was re-queued for another attempt
                outcomes.append(outcome)
        self._prune()
        return outcomes

    def _answered_by_a_backend(self, link: int) -> list[Outcome]:
        """A DISCONNECT came: ``link``'s endpoint is a broker's backend, which refuses each of
        our REQUESTs as a worker that did not register. The calls sent over this connection
        never ran and will get no answer: they fail UNAVAILABLE now, and the retry policy may
        send them to another broker, idempotent or not. The link takes no more calls until it
        reconnects; when every endpoint is a backend, calls fail at once instead of waiting."""
        endpoint = self._endpoints[link]
        if not self._link_backend[link]:
            self._link_backend[link] = True
            logger.error("zrpc client: %s answers like a broker's backend (the endpoint for workers): clients "
                         "connect to its frontend (`zrpc broker start --frontend`, port 5555 by default)", endpoint)
        connection = self._connection_of_link[link]
        outcomes = []
        for call in [c for c in self._pending.values() if c.sent and c.connection == connection]:
            del self._pending[call.request_id]
            outcome = self._finish(call, None, _backend_error(endpoint), record=False, never_ran=True)
            if outcome is not None:
                outcomes.append(outcome)
        outcomes += self._fail_unsent()  # when every endpoint is a backend: none will ever send
        self._prune()
        return outcomes

    def _decoded(self, call: Call, payload: bytes) -> Outcome | None:
        if call.decode is None:
            return self._finish(call, bytes(payload), None)
        try:
            value = call.decode(payload)
        except Error as exc:
            return self._finish(call, None, exc)
        except Exception as exc:  # a decoder's own failure must not kill the I/O loop
            return self._finish(call, None, Error(StatusCode.INTERNAL, f"could not decode the reply: {exc}"))
        return self._finish(call, value, None)

    def _finish(self, call: Call, value: Any, error: Error | None, *,
                retry: bool = True, record: bool = True, never_ran: bool = False) -> Outcome | None:
        """The single place an outcome is made. The call's circuit learns how the attempt ended
        (if ``record`` and it was sent: an unsent call says nothing of the service); a failure
        the retry policy allows is re-queued and None returned (if ``retry``). ``never_ran``:
        the attempt is known not to have run, so it may be repeated, idempotent or not."""
        if self.circuit_breaker is None and error is None:  # a plain answer: nothing to record or retry
            return Outcome(call, value, None)
        now = self.clock()
        circuit = self.circuit(call.service)
        if circuit is not None:
            # A draining broker's refusal says nothing of the service either (spec §11), nor does
            # a broker's not knowing it (another may: review, it reset the failure count).
            if record and call.sent and not _refused_draining(error) and not _unknown_there(error):
                circuit.record(StatusCode.OK if error is None else error.code, now, call.trial)
            elif call.trial:
                circuit.abandon_trial()
        call.trial = False
        if error is not None and retry and self._retry_later(call, error, now, never_ran):
            return None
        if error is not None and call.attempt > 1:
            error.details.setdefault(ATTEMPTS_DETAIL, str(call.attempt))
        return Outcome(call, value, error)

    def _retry_later(self, call: Call, error: Error, now: float, never_ran: bool = False) -> bool:
        """Re-queue ``call`` for its next attempt after a backoff, if the policy allows it."""
        policy = self.retry
        # A broker that refused the call as it shut down never ran it, nor did a backend: it may
        # go again, to another broker or to the next one on the endpoint, idempotent or not
        # (spec §11); and such attempts do not count against max_attempts (brokers restarted
        # one after another would use them up), only the deadline and a cap bound them.
        draining = _refused_draining(error)
        never_ran = never_ran or draining
        if draining and not self.wait_for_broker and all(
                d or b or u for d, b, u in zip(self._link_draining, self._link_backend, self._link_unreachable)):
            return False  # no other broker, and no waiting for one: the refusal is the answer
        if never_ran:
            call.refused += 1
        # A broker that refused it before any worker had it (no live worker, a full queue, spec
        # §10) says it never ran too: it may go again, but counts as an attempt.
        # "No live worker" only where another broker may take it: the one broker that refused it
        # would wait its unavailable_wait again, and again (review), instead of answering once
        # (a tester's idempotent `zrpc call -t 10` saw DEADLINE_EXCEEDED, not that refusal).
        if (error.code == StatusCode.UNAVAILABLE and len(self._endpoints) == 1
                and _protocol.refused_not_run(error.details)):
            return False  # idempotent or not: a retry would wait for a worker there once more
        not_run = _protocol.never_ran(error.details)
        may_repeat = call.header.idempotent or never_ran or not_run
        # Brokers share nothing: a service or method one of them does not know (yet) another may
        # serve. Each of the others is tried once, whatever codes the policy retries (a tester's
        # calls to a service on one of two brokers failed NOT_FOUND half the time).
        elsewhere = (not_run and error.code in _SERVED_ELSEWHERE and call.attempt < len(self._endpoints)
                     and policy is not None and call.attempt - call.refused < policy.max_attempts)
        if (policy is None or not may_repeat or call.attempt >= _MAX_ATTEMPTS
                or not (elsewhere or policy.retries(error.code, call.attempt - call.refused))):
            return False
        if elsewhere and (link := self._link_of_connection.get(call.connection)) is not None:
            call.avoid |= 1 << link
        delay = policy.backoff(call.attempt, self._uniform)
        if now + delay >= call.deadline:
            return False  # never past the deadline: fail now with this error
        circuit = self.circuit(call.service)
        if circuit is not None and circuit.refuses(now + delay):
            return False  # the circuit would refuse it anyway: the real error tells more
        # A new id per attempt: the broker refuses an id already in flight (spec §5), and a
        # late reply to the old one (the broker answered it already) must not settle this one.
        call.request_id = call.header.request_id = next(self._ids)
        call.attempt += 1
        call.header.metadata[ATTEMPT_METADATA] = str(call.attempt)
        call.sent = False
        call.connection = 0
        call.last_error = error
        self._pending[call.request_id] = call
        heapq.heappush(self._deadlines, (call.deadline, call.request_id))
        heapq.heappush(self._backoffs, (now + delay, call.request_id))
        logger.debug("retrying %s/%s in %.3fs as request %d (attempt %d) after %s",
                     call.service, call.method, delay, call.request_id, call.attempt, error.code.name)
        return True

    def next_timer(self) -> float | None:
        """When :meth:`advance` next has work: the earliest deadline, end of a backoff, or
        look at the links that owe answers (see _silence)."""
        deadline = self.next_deadline()
        heap = self._backoffs
        while heap and self._pending.get(heap[0][1]) is None:
            heapq.heappop(heap)  # its call was answered, cancelled or expired meanwhile
        if heap and (deadline is None or heap[0][0] < deadline):
            deadline = heap[0][0]
        watch = self._silence.due  # inf while no link owes an answer
        if watch < math.inf and (deadline is None or watch < deadline):
            return watch
        return deadline

    def advance(self, now: float) -> list[Outcome]:
        """Do what is due by ``now``: expired calls fail, and calls whose backoff is over go
        back to the send queue (or fail with their last error if their circuit refuses them),
        and links that owe answers are probed (see :meth:`take_link_messages`) or found silent."""
        if now >= self._silence.due:  # first: a deadline error due now says whether its broker is silent
            self._watch_silence(now)
        outcomes = self.expire(now)
        while self._backoffs and self._backoffs[0][0] <= now:
            _, request_id = heapq.heappop(self._backoffs)
            call = self._pending.get(request_id)
            if call is None:
                continue
            if self._admit(call, now) is not None:
                del self._pending[request_id]
                outcomes.append(self._finish(call, None, call.last_error, retry=False, record=False))
            elif (unreachable := self._no_broker_error()) is not None:
                del self._pending[request_id]
                outcomes.append(self._finish(call, None, _with_last_attempt(unreachable, call), retry=False, record=False))
            else:
                self._unsent.append(call)
        return outcomes

    def silence_due(self, now: float) -> bool:
        """Will :meth:`advance` look at links that owe answers? The flavour first hands the core
        what its sockets hold: a reply it has not read is no silence (its own loop was late)."""
        return now >= self._silence.due

    def _watch_silence(self, now: float) -> None:
        probes, silenced = self._silence.advance(now)
        silent = self._silence.silent
        for link in silenced:
            endpoint, silent_for = self._endpoints[link], self._silence.silent_for(link, now)
            if self._another_answers(link):
                moved = self._move_off_silent(link, endpoint, silent_for, now)
                what = "new calls go to the other brokers until it answers" + (
                    f", and {moved} idempotent call(s) sent to it go there too" if moved else "")
            else:
                self._stranded.add(link)
                what = "no other broker can take calls, so they still go to it"
            logger.warning("zrpc client: the broker at %s has answered nothing for %.1fs, not even a Health call "
                           "(stuck, or starved of CPU?): %s", endpoint, silent_for, what)
        # A silent link that kept its calls for want of another: once one answers, they go there.
        for link in [link for link in self._stranded if link not in silenced]:
            if not silent[link]:
                self._stranded.discard(link)  # it answered: its calls wait for their answers there
            elif self._another_answers(link):
                self._stranded.discard(link)
                endpoint, silent_for = self._endpoints[link], self._silence.silent_for(link, now) or 0.0
                moved = self._move_off_silent(link, endpoint, silent_for, now)
                if moved:
                    logger.warning("zrpc client: the broker at %s still answers nothing (%.1fs): %d idempotent "
                                   "call(s) sent to it go to another broker, which can take calls now",
                                   endpoint, silent_for, moved)
        for link in probes:
            if not self._link_up[link]:
                continue  # its connection closed meanwhile: the next one starts afresh
            if self._silence.silent[link] and not self._pending and len(self._endpoints) == 1:
                continue  # alone, it gets every call anyway: asked again only while calls wait
            header = _protocol.RequestHeader(service=_PROBE_SERVICE, method=_PROBE_METHOD,
                                             request_id=next(self._ids), reads_batches=True,
                                             deadline_ms=int(PROBE_TIMEOUT * 1000))
            self._link_messages.append((link, _protocol.request_message([(header.SerializeToString(), b"")])))

    def _another_answers(self, link: int) -> bool:
        """Can a link other than ``link``, whose broker answers, take calls now? (link_order()
        offers silent links too when no other is left: only an answering one counts.)"""
        silent = self._silence.silent
        return any(other != link and not silent[other] for other in self.link_order())

    def _move_off_silent(self, link: int, endpoint: str, silent_for: float, now: float) -> int:
        """Send the idempotent calls held by the silent ``link`` to the other brokers, as the
        retry policy allows (a new attempt each: a late answer to the old one is dropped), and
        CANCEL them at the silent broker, for when its loop runs again. Other calls stay: they
        may have run, and their answer may yet come. When the link falls silent, or later, once
        another broker connects or answers again (see _watch_silence). Returns how many moved."""
        connection = self._connection_of_link[link]
        error = Error(StatusCode.UNAVAILABLE,
                      f"the broker at {endpoint} answered nothing for {silent_for:.1f}s, not even a Health call",
                      {"zrpc-endpoint": endpoint})
        moved = []
        for call in [c for c in self._pending.values() if c.sent and c.connection == connection]:
            # A circuit's half-open trial stays too: given up for a retry, its slot would go to
            # another call, and the circuit would then refuse this one when its backoff ends.
            if not call.header.idempotent or call.trial:
                continue
            old_id = call.request_id
            del self._pending[old_id]
            if self._retry_later(call, Error(error.code, error.message, dict(error.details)), now):
                moved.append(old_id)
            else:  # its policy allows no other attempt: it stays with that broker
                self._pending[old_id] = call
        if moved:
            self._link_messages.append((link, _protocol.cancel_message(moved)))
        return len(moved)

    def take_link_messages(self) -> list[tuple[int, list[bytes]]]:
        """(link, message) to send now, without waiting: Health calls to links that owe answers
        (see _silence), whose answers match no call and are dropped once they have shown that the
        broker answers, and CANCELs of the calls moved off a silent link."""
        messages, self._link_messages = self._link_messages, []
        return messages

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
        """Fail every call whose deadline is at or before ``now`` with DEADLINE_EXCEEDED.

        A flavour calls :meth:`advance`, which does this and ends the backoffs that are over."""
        outcomes = []
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                break
            _, request_id = heapq.heappop(self._deadlines)
            call = self._pending.pop(request_id)
            outcomes.append(self._finish(call, None, self.deadline_error(call), retry=False))
        self._prune()
        return outcomes

    def _prune(self) -> None:
        if len(self._deadlines) > 64 and len(self._deadlines) > _HEAP_SLACK * len(self._pending):
            self._deadlines = [(c.deadline, c.request_id) for c in self._pending.values()]
            heapq.heapify(self._deadlines)
        if len(self._unsent) > 64 and len(self._unsent) > _HEAP_SLACK * len(self._pending):
            self._unsent = deque(c for c in self._unsent if self._pending.get(c.request_id) is c)

    def deadline_error(self, call: Call) -> Error:
        """The error of a call that got no answer in time, saying why where the client knows;
        a call that was sent names the broker that held it (details ``zrpc-endpoint``)."""
        where = f"deadline of {call.timeout:.3f}s exceeded calling {call.service}/{call.method}"
        details = {}
        if call.sent:
            link = self._link_of_connection.get(call.connection)
            held_by = f" at {self._endpoints[link]}" if link is not None and self._endpoints[link] else ""
            if held_by:
                details["zrpc-endpoint"] = self._endpoints[link]
            now = self.clock()
            silent_for = None if link is None else self._silence.silent_for(link, now)
            why = f" (request {call.request_id}, sent to the broker{held_by}): "
            if silent_for is not None:
                why += (f"that broker has answered nothing for {silent_for:.1f}s, not even a Health call; is it "
                        f"stuck, or starved of CPU?")
                details[SILENT_DETAIL] = f"{silent_for:.1f}"
            elif now - call.sent_at > _SILENCE_KNOWN_AFTER:
                # Long enough for the watch to have found that broker silent, and it did not: it
                # answered since this attempt was sent (a Health call at least). The call is slow.
                why += ("no answer in time, though that broker answers; the call is slow at its worker or "
                        "waits in its queue: pass a larger timeout= if it may take that long")
            else:  # its connection is up: one that closes fails its calls at once (spec §11)
                why += ("no answer in time over a connection that is up; the call may be slow at its worker "
                        "or wait in its queue: pass a larger timeout= if it may take that long")
        elif (shaking := next((endpoint for endpoint, accepted, up in zip(self._endpoints, self._link_accepted,
                                                                           self._link_up)
                               if accepted and not up), None)) is not None:
            # A connection, but no handshake: a new-user tester's HTTP server on the port read as
            # "check that a broker is running". (libzmq's I/O thread answers handshakes even for
            # a broker whose loop is stuck, unless that broker holds them: zrpc broker start does.)
            why = (f": no broker took it in time: a connection to {shaking} is open, but no ZeroMQ handshake "
                   f"completed on it; is a zrpc broker what listens there, and is it not stuck?")
            details[HANDSHAKE_PENDING_DETAIL] = shaking
        else:  # calls go only over a link that is up: unsent means no broker could take it
            why = (": no broker took it in time (none connected, or shutting down, or their queues full); "
                   "check that a broker is running")
        return Error(StatusCode.DEADLINE_EXCEEDED, where + why + _last_attempt(call), details)

    def cancel(self, request_id: int) -> Call | None:
        """Forget a call the caller gave up on; returns it when it was still in flight."""
        call = self._pending.pop(request_id, None)
        if call is not None and call.trial:
            call.trial = False
            self._circuits[call.service].abandon_trial()
        self._prune()
        return call

    def fail_all(self, error: Error) -> list[Outcome]:
        """Fail every call in flight with ``error`` (the client is closing)."""
        calls = list(self._pending.values())
        self._pending.clear()
        self._unsent.clear()
        self._deadlines.clear()
        self._backoffs.clear()
        # The client is closing: no retry, and its own CANCELLED says nothing of the services.
        # Each call its own copy: _finish adds a call's attempt count to its error (review).
        return [self._finish(call, None, Error(error.code, error.message, dict(error.details)), retry=False,
                             record=False) for call in calls]

    def sent_in_flight(self) -> list[Call]:
        """Calls in flight that a broker has been sent (CANCEL them when closing)."""
        return [call for call in self._pending.values() if call.sent]

    def cancel_messages(self, calls: Iterable[Call], deadline: bool = False) -> list[tuple[int, list[bytes]]]:
        """(link, CANCEL) for each broker holding some of ``calls`` (spec §8); calls whose
        connection has closed since are left out (their broker has forgotten them).
        ``deadline``: the calls reached their deadlines (the broker counts them so)."""
        by_link: dict[int, list[int]] = {}
        for call in calls:
            link = self._link_of_connection.get(call.connection)
            if link is not None and call.sent:
                by_link.setdefault(link, []).append(call.request_id)
        return [(link, _protocol.cancel_message(request_ids, deadline)) for link, request_ids in by_link.items()]


def _last_attempt(call: Call) -> str:
    """What a retry's last attempt failed with, for its final error ("" for a first attempt)."""
    if call.last_error is None:
        return ""
    return f"; attempt {call.attempt - 1} had failed with {call.last_error.code.name}: {call.last_error.message}"


def _with_last_attempt(error: Error, call: Call) -> Error:
    """``error`` for ``call``, a copy saying what its last attempt met: a broker that refused it
    as it shut down, or closed the connection, then was gone, is no broker that was never there."""
    return Error(error.code, error.message + _last_attempt(call), dict(error.details))


def _backend_error(endpoint: str) -> Error:
    return Error(StatusCode.UNAVAILABLE, f"{BACKEND}: {endpoint} is a broker's backend (the endpoint for "
                 f"workers); connect clients to its frontend. The call did not run", {"zrpc-endpoint": endpoint})


def closed_error(in_flight: bool = False) -> Error:
    """The error of a call made on a closed client, or left in flight when it closed."""
    if in_flight:
        return Error(StatusCode.CANCELLED, "the client was closed with the call in flight")
    return Error(StatusCode.CANCELLED, "the client is closed; create a new client to make calls")


def _unknown_there(error: Error | None) -> bool:
    """Did a broker refuse the call, unrun, as a service or method it does not know (§10)?"""
    return error is not None and error.code in _SERVED_ELSEWHERE and _protocol.refused_not_run(error.details)


def _refused_draining(error: Error | None) -> bool:
    """Did a broker (or worker) that drains refuse the call? It never ran (spec §11)."""
    return error is not None and _protocol.refused_draining(error.details)
