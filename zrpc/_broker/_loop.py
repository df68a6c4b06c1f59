"""The broker process: two ROUTER sockets around a BrokerEngine, in one thread."""
from __future__ import annotations

import logging
import threading
import time

import zmq

from ._config import BrokerConfig
from ._engine import BrokerEngine

log = logging.getLogger("zrpc.broker")

# Messages taken from one socket before looking at the other, and before flushing: batching
# amortises the poll and lets the engine coalesce replies per peer (spec §4).
_BATCH = 256


class Broker:
    """A broker bound to a frontend (clients) and a backend (workers) endpoint.

    ``bind()`` then ``run()`` in the calling thread (the CLI), or ``start()`` to run in a
    background thread (tests, ``zrpc.testing``); ``stop()`` from any thread.
    """

    def __init__(self, config: BrokerConfig | None = None, *, context: zmq.Context | None = None,
                 clock=time.monotonic):
        self.config = config or BrokerConfig()
        self.config.validate()
        self._clock = clock
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.engine = BrokerEngine(self.config, clock())
        self.frontend: zmq.Socket | None = None
        self.backend: zmq.Socket | None = None
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self._wake_endpoint = f"inproc://zrpc-broker-wake-{id(self):x}"
        self._wake_recv: zmq.Socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.undeliverable = 0  # replies to peers that are gone or not reading

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> tuple[str, str]:
        """Bind both endpoints; returns them resolved (a tcp port 0 becomes the real port)."""
        if self.frontend is not None:
            return self.frontend_endpoint, self.backend_endpoint
        try:
            self.frontend = self._router(self.config.frontend)
            self.backend = self._router(self.config.backend)
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_recv = self._context.socket(zmq.PULL)
        self._wake_recv.linger = 0
        self._wake_recv.bind(self._wake_endpoint)
        # Calls to unknown services wait out the grace from when we can first be reached.
        self.engine.started_at = self._clock()
        log.info("broker bound: frontend=%s backend=%s", self.frontend_endpoint, self.backend_endpoint)
        return self.frontend_endpoint, self.backend_endpoint

    def _router(self, endpoint: str) -> zmq.Socket:
        socket = self._context.socket(zmq.ROUTER)
        socket.linger = 0
        # Replies to a vanished or stalled peer raise instead of vanishing silently (counted).
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.sndhwm = 100_000
        socket.rcvhwm = 100_000
        # The engine answers oversize messages itself; this frame cap is the last line.
        socket.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + (1 << 20))
        socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        try:
            socket.bind(endpoint)
        except zmq.ZMQError:
            socket.close(0)
            raise
        return socket

    def run(self) -> None:
        """Serve until ``stop()``; binds first if needed."""
        self.bind()
        try:
            self._serve()
        finally:
            self._close_sockets()
            log.info("broker stopped")

    def start(self) -> "Broker":
        """Bind, then serve in a daemon thread."""
        self.bind()
        self._thread = threading.Thread(target=self.run, name="zrpc-broker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (safe from any thread or a signal handler) and wait for the loop."""
        self._stopping.set()
        if self._wake_recv is not None:
            try:
                waker = self._context.socket(zmq.PUSH)
                waker.linger = 0
                waker.connect(self._wake_endpoint)
                waker.send(b"", zmq.NOBLOCK)
                waker.close(0)
            except zmq.ZMQError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"broker loop did not stop within {timeout}s")

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _close_sockets(self) -> None:
        for socket in (self.frontend, self.backend, self._wake_recv):
            if socket is not None:
                socket.close(0)
        self.frontend = self.backend = self._wake_recv = None
        if self._own_context:
            self._context.term()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        engine, clock = self.engine, self._clock
        frontend, backend = self.frontend, self.backend
        poller = zmq.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        tick_interval = self.config.tick_interval
        next_tick = clock()
        while not self._stopping.is_set():
            now = clock()
            timeout = max(0.0, min(next_tick - now, engine.next_timer(now)))
            ready = dict(poller.poll(timeout * 1000))
            now = clock()
            if frontend in ready:
                self._drain(frontend, engine.on_frontend, now)
            if backend in ready:
                self._drain(backend, engine.on_backend, now)
            if now >= next_tick or engine.next_timer(now) == 0.0:
                engine.tick(now)
                next_tick = now + tick_interval
            engine.flush()
            self._send_all()

    def _drain(self, socket: zmq.Socket, handle, now: float) -> None:
        recv = socket.recv_multipart
        for _ in range(_BATCH):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            try:
                handle(identity, frames[1:], now)
            except Exception:  # a bug must not take the broker down for everyone
                log.exception("internal error handling a message from %s", identity.hex())
                self.engine.counters["internal_errors"] += 1

    def _send_all(self) -> None:
        engine = self.engine
        if engine.backend_out:
            self._send(self.backend, engine.backend_out)
            engine.backend_out = []
        if engine.frontend_out:
            self._send(self.frontend, engine.frontend_out)
            engine.frontend_out = []

    def _send(self, socket: zmq.Socket, messages: list) -> None:
        send = socket.send_multipart
        for identity, frames in messages:
            try:
                send([identity, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                # EHOSTUNREACH: the peer is gone; EAGAIN: it stopped reading. Only it loses.
                self.undeliverable += 1
                self.engine.counters["undeliverable"] += 1
                if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                    log.warning("send to %s failed: %s", identity.hex(), exc)
