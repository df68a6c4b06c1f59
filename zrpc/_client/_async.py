"""The asyncio client: the same core, waited on with asyncio futures, tasks and timers.

Everything runs on the event loop of the first call: a reader task per broker settles futures as
replies arrive, a loop reader per broker watches its connection (see _monitor), a writer task
coalesces the calls made since it last ran into one REQUEST (spec §4), and one timer, re-armed
to the nearest deadline or end of a retry backoff, fails calls DEADLINE_EXCEEDED on time and
hands retries back to the writer.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Mapping, Sequence

import zmq
import zmq.asyncio
from google.protobuf.descriptor import ServiceDescriptor

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

# With several brokers and none able to take a REQUEST (none connected, or every queue full), the
# writer tries again after a pause that doubles from the first to the most (see _writable).
_RETRY_SEND_FIRST = 0.001
_RETRY_SEND_MAX = 0.02


class AsyncClient:
    """An asyncio zrpc client; many tasks may call at once, over one socket per broker.

    Arguments are those of :class:`zrpc.Client` (``retry`` on by default for idempotent calls,
    ``circuit_breaker`` off, for the reasons given there); ``context`` may be a
    ``zmq.asyncio.Context`` or a plain ``zmq.Context`` (shadowed); ``curve_secret``,
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
        self._context: zmq.asyncio.Context | None = None
        self._sockets: list[zmq.asyncio.Socket] = []  # one DEALER per broker (see ClientCore)
        self._monitors: list[zmq.Socket] = []  # plain sockets, read by loop readers and before sends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[asyncio.Task] = []  # one per broker, reading its DEALER
        # Per broker: the reader's recv, and the last one whose message _take_received handled.
        self._receiving: list[asyncio.Future | None] = []
        self._taken: list[asyncio.Future | None] = []
        self._writer: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._cancels: list[Call] = []
        self._send_blocked = False  # no broker could take a REQUEST: the writer waits for room
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
        release the sockets. Idempotent."""
        # (spec §8) Calls the broker holds for us are stopped there, not left to their deadlines.
        cancelled = self._core.sent_in_flight() if self._sockets and not self._closed else []
        if cancelled:  # best effort: a full queue loses it, and the deadlines still apply
            self._send_cancel(cancelled)
        self._closed = True
        self._settle(self._core.fail_all(closed_error(in_flight=True)))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for monitor in self._monitors:  # before any await: no reconnection starts while closing
            self._loop.remove_reader(monitor.FD)
        tasks = self._readers + ([self._writer] if self._writer is not None else [])
        self._readers, self._writer = [], None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
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
        self._arm_timer()
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():  # the caller gave up (not a reply that raced the cancel)
                self._abandon(call)
            raise

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            raise RuntimeError("an AsyncClient belongs to the event loop of its first call; "
                               "create one client per event loop")
        context = self._context_arg
        if context is None:
            context = zmq.asyncio.Context()
        elif not isinstance(context, zmq.asyncio.Context):
            context = zmq.asyncio.Context.shadow(context.underlying)
        try:
            self._sockets, self._monitors = open_dealers(context, self.endpoints, self._curve)
        except BaseException:
            if self._context_arg is None:  # ours, as close() terms it: a bad endpoint leaks nothing
                context.term()
            raise
        self._context = context
        # Each DEALER's monitor tells us when its broker connection opens and closes, and (CURVE)
        # when the broker refuses our handshake (issue 5). Plain sockets read with NOBLOCK: a
        # loop reader drains them, and so does every send (see _send_one), which a pending
        # asyncio recv would race for the events.
        self._watch = HandshakeWatch(self.endpoints, curve=self._curve is not None)
        self._loop = loop
        self._wake = asyncio.Event()
        for link in range(len(self._sockets)):
            self._readers.append(None)
            self._receiving.append(None)
            self._taken.append(None)
            self._watch_link(link)
        self._writer = loop.create_task(self._write(), name="zrpc-client-writer")

    def _watch_link(self, link: int) -> None:
        """Start reading the DEALER of ``link`` and its monitor."""
        loop = self._loop
        self._readers[link] = loop.create_task(self._read(self._sockets[link], link), name=f"zrpc-client-reader-{link}")
        # The FD is edge-triggered: drain once now, then at each edge.
        loop.add_reader(self._monitors[link].FD, self._on_monitor_events, link)
        loop.call_soon(self._on_monitor_events, link)

    def _replace_dealer(self, link: int) -> None:
        """A new DEALER and monitor for ``link``, whose connection closed (see _monitor.drain)."""
        try:
            fresh = open_dealer(self._context, self.endpoints[link], self._curve)
        except Exception as exc:  # out of file descriptors, say: this link would be dead for good
            self._fail(f"reconnect to {self.endpoints[link]}", exc)
            return
        self._readers[link].cancel()
        self._loop.remove_reader(self._monitors[link].FD)
        close_dealer(self._sockets[link], self._monitors[link])
        self._sockets[link], self._monitors[link] = fresh
        self._watch_link(link)
        # The writer may be waiting for the old socket's POLLOUT (see _writable), which will never
        # come now: a new writer takes over (it keeps nothing: the calls are in the core). This
        # may run inside the writer itself (a send reads the monitors first): that one is
        # cancelled at its next suspension, or sees it is no longer the writer (see _write).
        self._writer.cancel()
        self._writer = self._loop.create_task(self._write(), name="zrpc-client-writer")
        self._wake.set()

    def _abandon(self, call: Call) -> None:
        if self._closed:
            return
        if self._core.cancel(call.request_id) is not None and call.sent:
            # (spec §8) the broker drops the call, or cancels it at its worker.
            self._cancels.append(call)
            self._wake.set()

    # -- tasks and timer ---------------------------------------------------------------------

    async def _read(self, socket: zmq.asyncio.Socket, link: int) -> None:
        try:
            while True:
                receiving = self._receiving[link] = socket.recv_multipart()
                frames = await receiving
                if self._taken[link] is receiving:
                    continue  # the monitor's turn came first and handled it (see _take_received)
                self._settle(self._core.handle_message(frames, link))
                self._arm_timer()  # a failed call may now wait out a retry backoff
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail("reader task", exc)

    def _take_received(self, link: int) -> None:
        """Handle a message the reader of ``link`` has received but not yet seen.

        The DEALER's data and its monitor's DISCONNECTED can come in one loop turn, the data
        first: the reader's recv then holds a reply whose call the close would fail, and
        replacing the DEALER would cancel the reader with the reply in it. A poll-then-read
        reader avoids this too, but costs the client about 6 µs per call more (bench.py).
        """
        receiving = self._receiving[link]
        if (receiving is not None and receiving.done() and not receiving.cancelled()
                and receiving.exception() is None and self._taken[link] is not receiving):
            self._taken[link] = receiving
            self._settle(self._core.handle_message(receiving.result(), link))

    def _on_monitor_events(self, link: int) -> None:
        """Connections that opened or closed (the calls of a closed one fail at once), and CURVE
        refusals (calls fail UNAUTHENTICATED when every broker refused us)."""
        if self._closed or link >= len(self._monitors):
            return  # closed meanwhile
        self._take_received(link)
        drained = drain(self._monitors[link], self._core, link, self.endpoints[link], self._watch, self._sockets[link])
        if drained is None:
            return
        if drained.replace:
            self._replace_dealer(link)
        self._settle(drained.outcomes)
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
            sent = self._sockets[link].send_multipart(frames, zmq.NOBLOCK)
            if not sent.done():  # pyzmq queued it behind another send (none is ever left waiting)
                core.took(link)
                sent.add_done_callback(self._check_sent)
                return True
            if not sent.cancelled() and isinstance(sent.exception(), zmq.Again):
                core.unsend(calls)
                continue
            core.took(link)
            self._send_blocked = False  # a broker took it: early sends may go again
            self._check_sent(sent)
            return True
        self._send_blocked = True
        return False

    async def _writable(self, waited: int) -> None:
        """Until one broker may take a REQUEST: its socket's POLLOUT with one broker; with several,
        a pause that grows with ``waited`` (how many pauses came before), as pyzmq has no poll of
        several sockets that can be given up: a cancelled poll stays queued on its socket, and a
        send there would then wait behind it, with its calls counted as sent."""
        if len(self._sockets) == 1:
            await self._sockets[0].poll(None, zmq.POLLOUT)
        else:
            await asyncio.sleep(min(_RETRY_SEND_MAX, _RETRY_SEND_FIRST * 2 ** waited))

    def _send_cancel(self, calls: list[Call], deadline: bool = False) -> None:
        """Best effort, to the broker holding each call: the brokers drop these calls anyway
        when their deadlines pass."""
        self._send_best_effort(self._core.cancel_messages(calls, deadline))

    def _send_best_effort(self, messages: list[tuple[int, list[bytes]]]) -> None:
        """Send each (link, message) now, or never: a CANCEL or a probe is not worth a wait."""
        for link, message in messages:
            sent = self._sockets[link].send_multipart(message, zmq.NOBLOCK)
            if sent.done() and not sent.cancelled() and isinstance(sent.exception(), zmq.Again):
                continue  # its queue is full, or the broker is gone
            self._check_sent(sent)

    def _check_sent(self, sent: asyncio.Future) -> None:
        if not sent.done() or sent.cancelled():
            return
        error = sent.exception()
        if error is not None and not self._closed:
            self._fail("send", error)

    async def _write(self) -> None:
        core = self._core
        try:
            while True:
                await self._wake.wait()
                if asyncio.current_task() is not self._writer:
                    return  # replaced (see _replace_dealer)
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
            for link in range(len(self._sockets)):  # a reply received in this loop turn, not yet seen
                self._take_received(link)
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
