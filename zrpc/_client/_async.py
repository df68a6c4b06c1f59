"""The asyncio client: the same core, waited on with asyncio futures, tasks and timers.

Everything runs on the event loop of the first call: a reader task settles futures as replies
arrive, a writer task coalesces the calls made since it last ran into one REQUEST (spec §4), and
one timer, re-armed to the nearest deadline or end of a retry backoff, fails calls
DEADLINE_EXCEEDED on time and hands retries back to the writer.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Mapping, Sequence

import zmq
import zmq.asyncio
from google.protobuf.descriptor import ServiceDescriptor

from .._protocol import DEFAULT_MAX_MESSAGE_BYTES
from .._security import client_security
from ._breaker import CircuitBreaker
from ._core import (CANCEL_ON_CLOSE_LINGER_MS, Call, ClientCore, Outcome, cancel_copies, cancel_message,
                    closed_error, logger)
from ._dealer import endpoint_list, open_dealer
from ._monitor import CLIENT_EVENTS, HandshakeWatch, on_event
from ._retry import DEFAULT_RETRY, RetryPolicy
from ._stub import AsyncUnaryMethod, Stub


# Calls one loop turn makes are coalesced into one REQUEST (spec §4), but once this many wait
# they leave at once: the broker and the worker start on them while this loop makes the rest,
# so with many calls in flight several batches overlap and use more than one core.
# bench.py (a) at concurrency 128, three alternating pairs of runs: 25,593/29,603/32,020 calls/s
# coalescing the whole turn, 27,628/33,128/34,585 sending every 8 (at 32 in flight: no change
# that stands out of this machine's noise).
PIPELINE_PAIRS = 8


class AsyncClient:
    """An asyncio zrpc client; many tasks may call at once over one socket.

    Arguments are those of :class:`zrpc.Client` (``retry`` on by default for idempotent calls,
    ``circuit_breaker`` off, for the reasons given there); ``context`` may be a
    ``zmq.asyncio.Context`` or a plain ``zmq.Context`` (shadowed); ``curve_secret`` and
    ``broker_key`` turn on CURVE as for the sync client. The socket is opened in the
    running loop at the first call, and the client then belongs to that loop. Close it with
    ``await client.close()`` or ``async with``.
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
    ):
        self._core = ClientCore(timeout, metadata, retry=retry, circuit_breaker=circuit_breaker,
                                max_message_bytes=max_message_bytes)
        self.endpoints = endpoint_list(endpoints)
        self._curve = client_security(curve_secret, broker_key)
        self._monitor: zmq.asyncio.Socket | None = None
        self._monitor_now: zmq.Socket | None = None  # the same socket, read without waiting
        self._watch: HandshakeWatch | None = None
        self._watcher: asyncio.Task | None = None
        self._context_arg = context
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._cancel_ids: list[int] = []
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
        release the socket. Idempotent."""
        # (spec §8) Calls the broker holds for us are stopped there, not left to their deadlines.
        cancelled = self._core.sent_in_flight() if self._socket is not None and not self._closed else []
        if cancelled:  # best effort: a full queue loses it, and the deadlines still apply
            self._send_cancel(cancelled)
        self._closed = True
        self._settle(self._core.fail_all(closed_error(in_flight=True)))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [task for task in (self._reader, self._writer, self._watcher) if task is not None]
        self._reader = self._writer = self._watcher = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = self._monitor_now = None
        if self._socket is not None:
            self._socket.close(linger=CANCEL_ON_CLOSE_LINGER_MS if cancelled else 0)
            self._socket = None
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
        if refused is not None:  # its service's circuit is open: fail fast, unsent
            raise refused.error
        if self._watch is not None and self._watch.refused:
            for endpoint in self._watch.to_retry():  # the key may be allowed by now
                self._socket.connect(endpoint)
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
            self._socket = open_dealer(context, self.endpoints, self._curve)
        except BaseException:
            if self._context_arg is None:  # ours, as close() terms it: a bad endpoint leaks nothing
                context.term()
            raise
        self._context = context
        # The monitor tells us when a broker connection opens or closes, and (CURVE) when a
        # broker refuses our handshake (issue 5).
        self._monitor = self._socket.get_monitor_socket(CLIENT_EVENTS)
        self._monitor_now = zmq.Socket.shadow(self._monitor.underlying)
        if self._curve is not None:
            self._watch = HandshakeWatch(self.endpoints)
        self._watcher = loop.create_task(self._watch_connections(), name="zrpc-client-connections")
        self._loop = loop
        self._wake = asyncio.Event()
        self._reader = loop.create_task(self._read(), name="zrpc-client-reader")
        self._writer = loop.create_task(self._write(), name="zrpc-client-writer")

    def _abandon(self, call: Call) -> None:
        if self._closed:
            return
        if self._core.cancel(call.request_id) is not None and call.sent:
            # (spec §8) the broker drops the call, or cancels it at its worker.
            self._cancel_ids.append(call.request_id)
            self._wake.set()

    # -- tasks and timer ---------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                frames = await self._socket.recv_multipart()
                self._settle(self._core.handle_message(frames))
                self._arm_timer()  # a failed call may now wait out a retry backoff
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail("reader task", exc)

    async def _watch_connections(self) -> None:
        try:
            while True:
                await self._monitor.poll(None, zmq.POLLIN)
                self._on_monitor_events()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("zrpc async client: connection monitor failed")

    def _see_connections(self) -> None:
        """Before a send: a connection that opened is known before calls go over it (see
        ClientCore.connection_closed)."""
        if not self._core.all_connected(len(self.endpoints)):
            self._on_monitor_events()

    def _on_monitor_events(self) -> None:
        """Connections that opened or closed (calls on a closed one fail at once), and CURVE
        refusals (calls fail UNAUTHENTICATED when every broker refused us)."""
        monitor = self._monitor_now
        settled = False
        while monitor.get(zmq.EVENTS) & zmq.POLLIN:
            outcomes = on_event(monitor.recv_multipart(zmq.NOBLOCK), self._core, self._watch, self._socket)
            self._settle(outcomes)
            settled = True
        if settled:
            self._arm_timer()  # lost idempotent calls wait out a retry backoff
            if self._core.has_unsent():
                self._wake.set()

    def _send_early(self) -> None:
        """Send the unsent calls now, in this loop turn, instead of at its end (see PIPELINE_PAIRS)."""
        if self._send_blocked:
            return  # the writer sends them once a broker can take them
        core = self._core
        self._see_connections()
        batch = core.next_request(core.clock())
        if batch is not None and not self._try_send(batch):
            self._wake.set()

    def _try_send(self, batch: tuple[list[bytes], list[Call]]) -> bool:
        """Send a REQUEST at once, or give its calls back unsent and return False.

        Never a send that waits: while no broker is connected (or every queue is full) a REQUEST
        built now would leave later with deadlines measured now, for calls that may have expired
        meanwhile. Calls given back are sent again, with fresh deadlines, once there is room.
        """
        frames, calls = batch
        sent = self._socket.send_multipart(frames, zmq.NOBLOCK)
        if not sent.done():  # pyzmq queued it behind another send (none is ever left waiting)
            sent.add_done_callback(self._check_sent)
            return True
        if not sent.cancelled() and isinstance(sent.exception(), zmq.Again):
            self._core.unsend(calls)
            self._send_blocked = True
            return False
        self._send_blocked = False  # a broker took it: early sends may go again
        self._check_sent(sent)
        return True

    def _send_cancel(self, request_ids: list[int]) -> None:
        """Best effort, once per broker (see cancel_copies): the brokers drop these calls anyway
        when their deadlines pass."""
        message = cancel_message(request_ids)
        for _ in range(cancel_copies(self.endpoints)):
            sent = self._socket.send_multipart(message, zmq.NOBLOCK)
            if sent.done() and not sent.cancelled() and isinstance(sent.exception(), zmq.Again):
                return  # every queue is full, or no broker is connected
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
                self._wake.clear()
                if self._cancel_ids:
                    request_ids, self._cancel_ids = self._cancel_ids, []
                    self._send_cancel(request_ids)
                # Every call made since the last turn goes out in as few messages as fit.
                self._see_connections()
                while (batch := core.next_request(core.clock())) is not None:
                    if not self._try_send(batch):
                        await self._socket.poll(None, zmq.POLLOUT)  # a broker can take it now
                        self._send_blocked = False
                        self._see_connections()
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
        outcomes = self._core.advance(self._core.clock())
        if outcomes:
            self._settle(outcomes)
            sent = [o.call.request_id for o in outcomes if o.call.sent]
            if sent:
                self._cancel_ids.extend(sent)  # (spec §8) the broker drops what we gave up on
                self._wake.set()
        if self._core.has_unsent():  # retries whose backoff is over
            self._wake.set()
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
