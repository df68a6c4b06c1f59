"""The asyncio client: the same core, waited on with asyncio futures, tasks and timers.

Everything runs on the event loop of the first call: a loop reader per broker reads its DEALER
and settles futures as replies arrive, another watches its connection (see _monitor), a writer
task coalesces the calls made since it last ran into one REQUEST (spec §4), and one timer,
re-armed to the nearest deadline or end of a retry backoff, fails calls DEADLINE_EXCEEDED on time
and hands retries back to the writer.

The DEALERs are plain zmq sockets used only without waiting, as the worker's (see _frames):
zmq.asyncio's future per message, its loop lookups (a getpid() system call each, in Python
3.11) and its Enum flags cost more than the rest of a call (the client alone at 32 calls in
flight: 60 -> 49 µs of CPU per call, medians of four alternating runs).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Mapping, Sequence

import zmq
from google.protobuf.descriptor import ServiceDescriptor

from .. import _frames
from .._protocol import DEFAULT_MAX_MESSAGE_BYTES
from .._endpoints import endpoint_list
from .._security import client_security
from ._breaker import CircuitBreaker
from ._core import CANCEL_ON_CLOSE_LINGER_MS, Call, ClientCore, Outcome, closed_error, logger
from ._dealer import close_dealer, open_dealer, open_dealers
from ._monitor import HandshakeWatch, drain
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._stub import AsyncUnaryMethod, Stub


# Calls one loop turn makes are coalesced into one REQUEST (spec §4), but once this many wait
# they leave at once: the broker and the worker start on them while this loop makes the rest,
# so with many calls in flight several batches overlap and use more than one core.
# bench.py (a) at concurrency 128, three alternating pairs of runs: 25,593/29,603/32,020 calls/s
# coalescing the whole turn, 27,628/33,128/34,585 sending every 8 (at 32 in flight: no change
# that stands out of this machine's noise).
PIPELINE_PAIRS = 8

# With no broker able to take a REQUEST (none connected, or every queue full), the writer tries
# again when a DEALER says it has room, or after a pause that doubles from the first to the most
# (see _writable).
_RETRY_SEND_FIRST = 0.001
_RETRY_SEND_MAX = 0.02

# Messages read from one DEALER per loop turn before the loop's other work gets a turn.
_READ_BATCH = 256


class AsyncClient:
    """An asyncio zrpc client; many tasks may call at once, over one socket per broker.

    Arguments are those of :class:`zrpc.Client` (``retry`` on by default for idempotent calls,
    ``circuit_breaker`` off, for the reasons given there); ``context`` may be a plain
    ``zmq.Context`` or a ``zmq.asyncio.Context`` (its sockets are made plain); ``curve_secret``,
    ``broker_key`` and ``wait_for_broker`` are as for the sync client. The sockets are opened
    in the running loop at the first call, and the client then belongs to that loop. Close it
    with ``await client.close()`` or ``async with``.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        timeout: float = 30.0,
        context: zmq.Context | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        circuit_breaker: CircuitBreaker | None = None,
        curve_secret: Any = None,
        broker_key: Any = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        wait_for_broker: bool = True,
    ):
        self.endpoints = endpoint_list(endpoints)
        self._core = ClientCore(timeout, metadata, retry=retry, circuit_breaker=circuit_breaker,
                                max_message_bytes=max_message_bytes, endpoints=self.endpoints,
                                wait_for_broker=wait_for_broker)
        self._curve = client_security(curve_secret, broker_key)
        self._watch: HandshakeWatch | None = None
        self._context_arg = context
        self._context: zmq.Context | None = None
        self._sockets: list[zmq.Socket] = []  # one DEALER per broker (see ClientCore)
        self._monitors: list[zmq.Socket] = []  # each DEALER's monitor, read by loop readers and before sends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_scheduled: list[bool] = []  # per DEALER: a read is due in the next loop turn
        self._writer: asyncio.Task | None = None
        self._room: asyncio.Future | None = None  # the writer waits on it for a DEALER with room
        self._wake: asyncio.Event | None = None
        self._cancels: list[Call] = []
        self._send_blocked = False  # no broker could take a REQUEST: the writer waits for room
        # A refused send's look at ZMQ_EVENTS said POLLOUT: room came in between, and that look
        # took the FD's signal for it (see _send, _writable).
        self._room_after_refusal = False
        self._retried_at_once = False  # the writer's last wait was such a retry, not a pause
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False

    # -- public API --------------------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """Call ``service``/``method`` with a serialized request; return the serialized reply.

        Raises :class:`zrpc.Error` with the status code of a failed call. Cancelling the
        awaiting task cancels the call at the broker.
        """
        return await self._call(service, method, payload, timeout, idempotent, metadata, None)

    def stub(self, service: ServiceDescriptor) -> Stub:
        """A typed stub for a protobuf ``ServiceDescriptor``: ``await stub.Method(request)``."""
        return Stub(self, service, AsyncUnaryMethod)

    async def close(self) -> None:
        """Fail calls in flight with CANCELLED (and cancel them at the broker), stop the tasks,
        release the sockets. Idempotent; from any loop (the client's own does the work)."""
        loop = self._loop
        if loop is not None and loop.is_running() and loop is not asyncio.get_running_loop():
            # Our loop runs in another thread: its sockets, futures and writer are that thread's,
            # and none of them may be touched from here (review: a caller there learnt of the
            # close only at its loop's next timer, and its reader found a socket closed under it).
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.close(), loop))
            return
        # A closed loop (its asyncio.run returned, or it was closed with calls awaited) runs
        # nothing again: anything scheduled on it raises "Event loop is closed", and before the
        # sockets were closed that left them open (review).
        ended = loop is not None and loop.is_closed()
        # (spec §8) Calls the broker holds for us are stopped there, not left to their deadlines.
        # With the calls cancelled just before and not yet sent by the writer (a caller's timeout,
        # then the `async with` closing the client): they are out of the core already.
        cancelled = self._core.sent_in_flight() + self._cancels if self._sockets and not self._closed else []
        self._cancels = []
        self._closed = True  # before the CANCEL: a closing client schedules no read after it
        if cancelled:  # best effort: a full queue loses it, and the deadlines still apply
            self._send_cancel(cancelled)
        outcomes = self._core.fail_all(closed_error(in_flight=True))
        if not ended:  # an ended loop's futures wake no one
            self._settle(outcomes)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for socket, monitor in zip(self._sockets, self._monitors):
            # Before any await: no reconnection starts and no reply is read while closing.
            self._loop.remove_reader(monitor.FD)
            self._loop.remove_reader(socket.FD)
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done() and not ended:
            writer.cancel()
            # Closed from a new loop while ours is stopped (run_until_complete returned): the
            # writer ends when ours runs again; awaited from here, it would raise.
            if writer.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(writer, return_exceptions=True)
        for socket, monitor in zip(self._sockets, self._monitors):
            close_dealer(socket, monitor, linger=CANCEL_ON_CLOSE_LINGER_MS if cancelled else 0)
        self._sockets, self._monitors = [], []
        if self._context is not None:
            if self._context_arg is None:
                self._context.term()  # returns at once, or once that CANCEL left (200 ms at most)
            self._context = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, service: str, method: str, payload: bytes, timeout: float | None,
                    idempotent: bool, metadata: Mapping[str, str] | None,
                    decode: Callable[[bytes], Any] | None) -> Any:
        if self._closed:
            raise closed_error()
        self._start()
        call = self._core.prepare(service, method, payload, timeout=timeout, idempotent=idempotent,
                                  metadata=metadata, decode=decode)
        future = self._loop.create_future()
        call.waiter = future
        refused = self._core.add(call)
        if refused is not None:  # its circuit is open, or no broker can be reached: fail fast, unsent
            raise refused.error
        if self._watch is not None and self._watch.refused:
            for endpoint in self._watch.to_retry():  # the key may be allowed by now
                self._sockets[self.endpoints.index(endpoint)].connect(endpoint)
        if self._core.unsent() >= PIPELINE_PAIRS:
            self._send_early()
        else:
            self._wake.set()
        if self._timer is None or call.deadline < self._timer_at:
            self._arm_timer()  # else the timer fires first, and re-arms for what is due then
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():  # the caller gave up (not a reply that raced the cancel)
                self._abandon(call)
            raise

    def _start(self) -> None:
        # Our loop, running in this thread, is the running loop (one loop runs in a thread at a
        # time, and in one thread): asyncio.get_running_loop() costs a getpid() system call in
        # Python 3.11. The thread a loop runs in is asyncio's own attribute; a loop without it
        # takes the long way. (Not the thread of our first call: that loop may run elsewhere now.)
        if self._loop is not None and getattr(self._loop, "_thread_id", None) == threading.get_ident():
            return
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            raise RuntimeError("an AsyncClient belongs to the event loop of its first call; "
                               "create one client per event loop")
        context = self._context_arg
        if context is None:
            context = zmq.Context()
        try:
            self._sockets, self._monitors = open_dealers(context, self.endpoints, self._curve)
        except BaseException:
            if self._context_arg is None:  # ours, as close() terms it: a bad endpoint leaks nothing
                context.term()
            raise
        # Each DEALER's monitor tells us when its broker connection opens and closes, and (CURVE)
        # when the broker refuses our handshake (issue 5). A loop reader drains each, and so does
        # every send (see _send_one).
        self._watch = HandshakeWatch(self.endpoints, curve=self._curve is not None)
        self._loop = loop
        self._wake = asyncio.Event()
        self._read_scheduled = [False] * len(self._sockets)
        try:
            for link in range(len(self._sockets)):
                self._watch_link(link)
        except BaseException as exc:
            # A loop without add_reader (asyncio's Proactor loop, say): the client is not half
            # set up, with no writer, and later calls waiting out their deadlines (review).
            for socket, monitor in zip(self._sockets, self._monitors):
                for fd in (socket.FD, monitor.FD):
                    try:
                        loop.remove_reader(fd)
                    except Exception:  # noqa: BLE001 - the same loop's refusal again
                        pass
                close_dealer(socket, monitor)
            self._sockets, self._monitors, self._loop = [], [], None
            if self._context_arg is None:
                context.term()
            if isinstance(exc, NotImplementedError):
                raise RuntimeError(f"zrpc.AsyncClient needs an event loop that can watch file descriptors "
                                   f"(add_reader); {type(loop).__name__} cannot (on Windows, use "
                                   f"asyncio.WindowsSelectorEventLoopPolicy)") from exc
            raise
        self._context = context
        self._writer = loop.create_task(self._write(), name="zrpc-client-writer")

    def _watch_link(self, link: int) -> None:
        """Start reading the DEALER of ``link`` and its monitor."""
        loop = self._loop
        # Both FDs are edge-triggered: drain once now, then at each edge.
        loop.add_reader(self._sockets[link].FD, self._on_readable, link)
        self._schedule_read(link)
        loop.add_reader(self._monitors[link].FD, self._on_monitor_events, link)
        loop.call_soon(self._on_monitor_events, link)

    def _replace_dealer(self, link: int) -> None:
        """A new DEALER and monitor for ``link``, whose connection closed (see _monitor.drain)."""
        try:
            fresh = open_dealer(self._context, self.endpoints[link], self._curve)
        except Exception as exc:  # out of file descriptors, say: this link would be dead for good
            self._fail(f"reconnect to {self.endpoints[link]}", exc)
            return
        self._loop.remove_reader(self._sockets[link].FD)
        self._loop.remove_reader(self._monitors[link].FD)
        close_dealer(self._sockets[link], self._monitors[link])
        self._sockets[link], self._monitors[link] = fresh
        self._watch_link(link)
        self._room_found()  # the writer may be waiting for room in the old socket (see _writable)
        self._wake.set()

    def _abandon(self, call: Call) -> None:
        if self._closed:
            return
        if self._core.cancel(call.request_id) is not None and call.sent:
            # (spec §8) the broker drops the call, or cancels it at its worker.
            self._cancels.append(call)
            self._wake.set()

    # -- tasks and timer ---------------------------------------------------------------------

    def _schedule_read(self, link: int) -> None:
        """Read ``link``'s DEALER in the next loop turn (once, however often this is asked)."""
        if not self._read_scheduled[link]:
            self._read_scheduled[link] = True
            self._loop.call_soon(self._on_readable, link)

    def _on_readable(self, link: int) -> None:
        """Handle the messages ``link``'s DEALER holds (its FD signalled, or a read was due).

        The FD only says something changed, and a send may take its signal: a reader reads until
        the socket has nothing left, and each send looks at ZMQ_EVENTS after it (see _send)."""
        self._read_scheduled[link] = False
        if link >= len(self._sockets):
            return  # closed
        socket = self._sockets[link]
        if self._closed:  # failed (see _fail): unread, the FD would stay readable and spin the loop
            self._loop.remove_reader(socket.FD)
            return
        try:
            for index in range(_READ_BATCH):
                if index:  # another message? ZMQ_EVENTS costs less than a recv raising zmq.Again
                    events = _frames.events(socket)
                    if not events & _frames.POLLIN:
                        self._act_on_events(link, events)
                        break
                frames = _frames.receive(socket)  # the first: the FD signalled, one usually waits
                if frames is None:
                    if self._room is not None:  # the writer waits: has this DEALER room?
                        self._look_at_events(link, socket)
                    break
                self._settle(self._core.handle_message(frames, link))
            else:
                self._schedule_read(link)  # more may wait: after the loop's other work
            self._arm_timer()  # a failed call may now wait out a retry backoff
        except Exception as exc:
            self._fail("reader", exc)

    def _on_monitor_events(self, link: int) -> None:
        """Connections that opened or closed (the calls of a closed one fail at once), and CURVE
        refusals (calls fail UNAUTHENTICATED when every broker refused us)."""
        if link >= len(self._monitors):
            return  # closed meanwhile
        if self._closed:  # failed (see _fail): unread, the FD would stay readable and spin the loop
            self._loop.remove_reader(self._monitors[link].FD)
            return
        drained = drain(self._monitors[link], self._core, link, self.endpoints[link], self._watch, self._sockets[link])
        if drained is None:
            return
        if drained.replace:
            self._replace_dealer(link)
        self._settle(drained.outcomes)
        self._room_found()  # a connection came up, say: the writer need not wait out its pause
        if not self._closed:
            self._arm_timer()  # lost idempotent calls wait out a retry backoff
            if self._core.has_unsent():
                self._wake.set()

    def _send_early(self) -> None:
        """Send the unsent calls now, in this loop turn, instead of at its end (see PIPELINE_PAIRS)."""
        if self._send_blocked:
            return  # the writer sends them once a broker can take them
        if not self._send_one():
            self._wake.set()
        self._arm_timer()  # as the writer does: a link that owes answers is looked at in time

    def _send_one(self) -> bool:
        """Send one REQUEST at once to the next broker in turn that takes it; False (its calls
        given back unsent) when none does, not connected or its queue full.

        Never a send that waits: while no broker is connected (or every queue is full) a REQUEST
        built now would leave later with deadlines measured now, for calls that may have expired
        meanwhile. Calls given back are sent again, with fresh deadlines, once there is room.
        """
        core = self._core
        # First what the monitors say: a link whose connection closed takes nothing more until
        # its next handshake, so no call goes out stamped with a connection that is gone.
        for link in range(len(self._monitors)):
            self._on_monitor_events(link)
        for link in core.link_order():
            batch = core.next_request(core.clock(), link)
            if batch is None:
                return True  # nothing (left) to send
            frames, calls = batch
            if not self._send(link, frames):
                core.unsend(calls)
                continue
            core.took(link)
            # A broker took it: early sends may go again, and no earlier refusal's room is news.
            self._send_blocked = self._retried_at_once = self._room_after_refusal = False
            return True
        self._send_blocked = True
        return False

    async def _writable(self, waited: int) -> None:
        """Until a DEALER that takes calls may have room for a REQUEST (ZMQ_EVENTS said POLLOUT
        after its FD signalled or a send, see _look_at_events), a connection event came, or a
        pause that grows with ``waited`` (how many waits came before) is over."""
        if self._room_after_refusal and not self._retried_at_once:
            # Room came between a refusal and its look, which took the FD's signal: try again
            # after one loop turn rather than wait out a pause (up to _RETRY_SEND_MAX) for a
            # signal that will not come (review). Never twice in a row: a DEALER that said
            # POLLOUT and refused anyway would make that a spin; it waits out its pauses.
            self._room_after_refusal, self._retried_at_once = False, True
            await asyncio.sleep(0)
            return
        self._room_after_refusal = self._retried_at_once = False
        room = self._room = self._loop.create_future()
        # (The exponent capped: every early wake-up counts, and 2 ** 1024 overflows a float.)
        pause = min(_RETRY_SEND_MAX, _RETRY_SEND_FIRST * 2 ** min(waited, 16))
        timer = self._loop.call_later(pause, self._room_found)
        try:
            await room
        finally:
            timer.cancel()
            if self._room is room:
                self._room = None

    def _room_found(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    def _send(self, link: int, frames: list[bytes]) -> bool:
        """Send one message on ``link`` without waiting; False when its queue is full (EAGAIN).
        Any other failure closes the client."""
        socket = self._sockets[link]
        refused = False
        try:
            _frames.send(socket, frames)
        except zmq.Again:
            refused = True
            return False
        except zmq.ZMQError as exc:
            if not self._closed:
                self._fail("send", exc)
            return True
        finally:
            if not self._closed and self._look_at_events(link, socket) & _frames.POLLOUT and refused:
                self._room_after_refusal = True
        return True

    def _look_at_events(self, link: int, socket: zmq.Socket) -> int:
        """Act on ZMQ_EVENTS, whose asking clears the FD's signal (edge-triggered): a reply that
        arrived meanwhile is read next turn, and room in a DEALER that takes calls ends the
        writer's wait (review: a reply arrived between a read's end and a look for room only, and
        waited for another wake-up). Returns the events."""
        events = _frames.events(socket)
        self._act_on_events(link, events)
        return events

    def _act_on_events(self, link: int, events: int) -> None:
        """What ``link``'s ZMQ_EVENTS (``events``) say: read it next turn, or the writer may go on."""
        if events & _frames.POLLIN:
            self._schedule_read(link)
        if events & _frames.POLLOUT and self._room is not None and link in self._core.link_order():
            self._room_found()

    def _send_cancel(self, calls: list[Call], deadline: bool = False) -> None:
        """Best effort, to the broker holding each call: the brokers drop these calls anyway
        when their deadlines pass."""
        self._send_best_effort(self._core.cancel_messages(calls, deadline))

    def _send_best_effort(self, messages: list[tuple[int, list[bytes]]]) -> None:
        """Send each (link, message) now, or never: a CANCEL or a probe is not worth a wait."""
        for link, message in messages:
            self._send(link, message)  # its queue full, or the broker gone: it is dropped

    async def _write(self) -> None:
        core = self._core
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._cancels:
                    calls, self._cancels = self._cancels, []
                    self._send_cancel(calls)
                # Every call made since the last turn goes out in as few messages as fit.
                waited = 0
                while core.has_unsent():
                    if self._send_one():
                        waited = 0
                    elif not core.link_order():
                        break  # no link up: its handshake event (_on_monitor_events) sets _wake
                    else:
                        await self._writable(waited)
                        waited += 1
                        self._send_blocked = False
                self._arm_timer()  # a link that owes answers now is looked at in time (see _silence)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail("writer task", exc)

    def _fail(self, what: str, error: BaseException) -> None:
        logger.error("zrpc async client %s failed; the client is closed", what, exc_info=error)
        self._closed = True
        self._settle(self._core.fail_all(closed_error(in_flight=True)))

    def _arm_timer(self) -> None:
        due = self._core.next_timer()  # a deadline, or the end of a retry's backoff
        if due is None:
            return  # a pending timer finds nothing to do and is not re-armed
        if self._timer is not None:
            if self._timer_at <= due:
                return  # it fires first and re-arms for what is left then
            self._timer.cancel()
        self._timer_at = due
        self._timer = self._loop.call_later(max(0.0, due - self._core.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._core.clock()
        if self._core.silence_due(now):
            for link in range(len(self._sockets)):  # a reply received, its FD not yet looked at
                self._on_readable(link)
        outcomes = self._core.advance(now)
        if outcomes:
            self._settle(outcomes)
            # (spec §8) A CANCEL marked `deadline`: counted DEADLINE_EXCEEDED, as the caller saw
            # it; and a call that waited unread at a stopped broker does not run after that.
            self._send_cancel([o.call for o in outcomes if o.call.sent], deadline=True)
        if self._core.has_unsent():  # retries whose backoff is over
            self._wake.set()
        self._send_best_effort(self._core.take_link_messages())  # probes, CANCELs (see _silence)
        self._arm_timer()

    @staticmethod
    def _settle(outcomes: list[Outcome]) -> None:
        for call, value, error in outcomes:
            future = call.waiter
            if future.done():
                continue  # cancelled by its task meanwhile
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

