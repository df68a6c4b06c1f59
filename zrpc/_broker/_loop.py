"""The broker process: two ROUTER sockets around a BrokerEngine, in one thread."""
from __future__ import annotations

import logging
import math
import threading
import time

import zmq

from .. import _protocol as p
from .. import _security
from .._endpoints import ipc_socket_file, remove_ipc_socket_file
from .._frames import readable
from .._polling import yield_core
from ._auth import BrokerSecurity
from ._clients import ClientConnections
from ._config import BrokerConfig
from ._connections import ConnectionLimits, connection_cap, fd_limit
from ._engine import BrokerEngine
from ._poller import SocketPoller
from ._stats import CallStats

log = logging.getLogger("zrpc.broker")

# Messages taken from one socket before looking at the other, and before flushing: batching
# amortises the poll and lets the engine coalesce replies per peer (spec §4).
_BATCH = 256

# Frames move one at a time through the backend's send/recv with plain int flags: the sugar
# send_multipart/recv_multipart cost an Enum operation (SNDMORE | flags) or a getsockopt(RCVMORE)
# per frame plus a Python wrapper per call (14% of the broker's time in Enum code alone). A frame
# received with copy=False knows itself whether more follow (Frame.more).
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_send_frame = zmq.backend.Socket.send
_recv_frame = zmq.backend.Socket.recv
_SRCFD = int(zmq.SRCFD)  # the file descriptor a message came on (see _clients.py)
_FD_TRANSPORTS = ("tcp://", "ipc://")  # whose messages know it (inproc's refuse to say)
# Payloads pass through without being copied from this size on (they are never decoded, §4).
_ZERO_COPY_BYTES = p.ZERO_COPY_BYTES
# TCP keepalive of the broker's connections (see _router): probes after this many idle seconds,
# then every interval; a peer that answers none of the probes is dropped.
_KEEPALIVE_IDLE_S = 30
_KEEPALIVE_INTERVAL_S = 10
_KEEPALIVE_PROBES = 3
_UNACKNOWLEDGED_LIMIT_MS = 60_000
# A drained broker's frontend waits at most this long for its last answers to leave at close.
_DRAINED_LINGER_MS = 2000
# A stopping broker's backend waits at most this long for its DISCONNECTs to workers to leave.
_STOPPING_LINGER_MS = 200
# A draining broker's loop ends this long (seconds) after its last held call was answered (or its
# grace ends first): clients answered last send their next calls within a round trip.
_DRAIN_QUIET = 0.2


class Broker:
    """A broker bound to a frontend (clients) and a backend (workers) endpoint.

    ``bind()`` then ``run()`` in the calling thread (the CLI), or ``start()`` to run in a
    background thread (tests, ``zrpc.testing``); ``stop()`` from any thread, or ``drain(grace)``
    to answer the calls held first (what `zrpc broker start` does on SIGTERM).

    ``gate_handshakes`` (without CURVE): hold each handshake until the loop has seen its
    connection, so that a peer refused at ``max_connections`` keeps the messages it had queued
    (see ``ConnectionLimits.gate``). It costs each handshake a trip through the loop thread,
    which in a process that also runs clients means waiting for the GIL: `zrpc broker start`
    turns it on, in-process brokers leave it off unless asked.
    """

    def __init__(self, config: BrokerConfig | None = None, *, context: zmq.Context | None = None,
                 clock=time.monotonic, gate_handshakes: bool = False):
        self.config = config or BrokerConfig()
        self.config.validate()
        self._clock = clock
        self._gate_handshakes = gate_handshakes
        # Connections each endpoint may hold: a ValueError when the fd limit cannot fit them,
        # raised before anything needs closing.
        self.max_connections = connection_cap(self.config.max_connections, fd_limit())
        self._own_context = context is None
        self._context = context or zmq.Context()
        self.engine = BrokerEngine(self.config, clock())
        # The socket monitors that enforce max_connections (see _connections.py).
        self.connections = ConnectionLimits(self.max_connections, self.engine.counters,
                                            self.engine.bad_input_log.warn, clock)
        # Which connection each client sends on, so a closed one ends its calls (_clients.py).
        # None for a frontend whose transport has no descriptors (inproc): bind() decides.
        self.client_connections: ClientConnections | None = None
        # Per-call statistics for /metrics and `zrpc status`, observed through the engine's hook.
        self.stats = CallStats(self.engine).install()
        self.frontend: zmq.Socket | None = None
        self.backend: zmq.Socket | None = None
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self._socket_files: list = []  # ipc:// files bound, removed at close (see remove_ipc_socket_file)
        self._closed = False  # its sockets were closed after a bind: it cannot bind again
        self._wake_endpoint = f"inproc://zrpc-broker-wake-{id(self):x}"
        self._wake_recv: zmq.Socket | None = None
        self._stopping = threading.Event()
        self._drain_requested = threading.Event()
        self._drain_grace = 0.0
        self._none_held_since: float | None = None  # while draining (see _drained)
        self._drain_began = 0.0  # when the loop began draining, and how many calls it held then
        self._held_at_drain = 0
        self._thread: threading.Thread | None = None
        self.undeliverable = 0  # replies to peers that are gone or not reading
        self._told_workers = False  # the loop ended and sent each worker DISCONNECT (broker stopping)
        self._poller: SocketPoller | None = None  # the loop's, while it runs
        # CURVE: keys and allow-lists from the config; None for plain TCP.
        self.security: BrokerSecurity | None = None
        if self.config.curve_secret:
            self.security = BrokerSecurity(self.config.curve_secret, self.config.client_keys,
                                           self.config.worker_keys, self.config.access_rules)

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> tuple[str, str]:
        """Bind both endpoints; returns them resolved (a tcp port 0 becomes the real port)."""
        if self.frontend is not None:
            return self.frontend_endpoint, self.backend_endpoint
        if self._closed:  # its context may be terminated: libzmq would say "Operation not supported"
            raise RuntimeError("this broker has stopped (or was closed): create a new Broker")
        if self.security is not None:
            # Before binding: a peer that connects before the ZAP handler runs is let in and stays.
            self.security.start(self._context)
            self.engine.policy = self.security.policy
            # Secure mode reads each message's User-Id (its peer's key): see _read_messages_secure.
            self._read_messages = self._read_messages_secure
        elif self._gate_handshakes:  # NULL handshakes wait for the loop to see their connection
            self.connections.gate(self._context)
        try:
            self.frontend = self._router("frontend", self.config.frontend, _security.FRONTEND_DOMAIN)
            self.backend = self._router("backend", self.config.backend, _security.BACKEND_DOMAIN)
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
        log.info("broker bound: frontend=%s backend=%s%s%s", self.frontend_endpoint, self.backend_endpoint,
                 " (CURVE)" if self.security is not None else "",
                 f" busy_poll={self.config.busy_poll:g}s" if self.config.busy_poll else "")
        log.info("connections: at most %d per endpoint (file descriptor limit %d)",
                 self.max_connections, fd_limit())
        if self.security is None:
            for endpoint in (self.frontend_endpoint, self.backend_endpoint):
                if not _security.is_loopback_endpoint(endpoint):
                    log.warning("%s is reachable from other hosts and CURVE is off: anyone who can "
                                "connect can call or serve; see `zrpc keys generate` and --curve-secret",
                                endpoint)
        return self.frontend_endpoint, self.backend_endpoint

    def _router(self, side: str, endpoint: str, zap_domain: str = "") -> zmq.Socket:
        socket = self._context.socket(zmq.ROUTER)
        socket.linger = 0
        if self.security is not None:
            if not self.security.running:  # CURVE without ZAP would accept any key
                socket.close(0)
                raise RuntimeError("refusing to bind a CURVE socket: the ZAP authenticator is not running")
            self.security.make_server(socket, zap_domain)
        elif self.connections.zap is not None:
            socket.zap_domain = zap_domain.encode()  # NULL: ZAP is asked, and always says yes
        # Replies to a vanished or stalled peer raise instead of vanishing silently (counted).
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Messages queued to one peer (config client_queue_messages for a client). Past it,
        # sends to that client fail (EAGAIN) and the engine refuses its new calls for a while
        # (client_not_reading).
        socket.sndhwm = self.config.client_queue_messages if side == "frontend" else 100_000
        socket.rcvhwm = 100_000
        # The engine answers oversize messages itself; this frame cap is the last line. Never
        # under what clients and workers send by default (64 MiB): a tester's broker at 4,000
        # bytes dropped the connection of a client that sent 3 MB, with every call on it (and
        # its retries did it again); the engine answers such a call RESOURCE_EXHAUSTED instead.
        frame_cap = max(self.config.max_message_bytes, p.DEFAULT_MAX_MESSAGE_BYTES) + (1 << 20)
        socket.setsockopt(zmq.MAXMSGSIZE, frame_cap)
        # A peer whose host vanished (no FIN) is found by TCP keepalive (within about a minute),
        # not by ZMTP heartbeats: with them libzmq 4.3.5 aborts the process ("Assertion failed:
        # !_io_error", stream_engine_base.cpp) when a heartbeat falls due on a connection that
        # failed while its input was stopped at the receive limit. A tester's client that
        # flooded the frontend and then disconnected took the broker down so, 4 times in 4.
        # (Clients and workers ping the broker themselves; libzmq answers without this option.)
        socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
        socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _KEEPALIVE_IDLE_S)
        socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, _KEEPALIVE_INTERVAL_S)
        socket.setsockopt(zmq.TCP_KEEPALIVE_CNT, _KEEPALIVE_PROBES)
        # Keepalive probes only an idle connection; one with data unacknowledged (replies to a
        # host that vanished) is dropped after this long instead of TCP's ~15 minutes (review).
        socket.setsockopt(zmq.TCP_MAXRT, _UNACKNOWLEDGED_LIMIT_MS)
        socket.setsockopt(zmq.HANDSHAKE_IVL, max(1, round(self.config.handshake_timeout * 1000)))
        _security.allow_ipv6_for(socket, [endpoint])
        # Before binding: every accepted connection is seen. The frontend's also end the calls of
        # a client whose connection closes (see _clients.py).
        if side == "frontend" and endpoint.startswith(_FD_TRANSPORTS):
            self.client_connections = ClientConnections()
            self.connections.watch(side, socket, self.client_connections.accepted, self._client_connection_closed)
        else:
            self.connections.watch(side, socket)
        try:
            socket.bind(endpoint)
        except zmq.ZMQError:
            self.connections.unwatch(side)
            socket.close(0)
            raise
        # Recorded now, so a failure binding the other side still removes it. Not a wildcard:
        # libzmq made that path in a directory of its own, and cleans both up itself.
        if endpoint != "ipc://*":
            self._socket_files.append(ipc_socket_file(socket.getsockopt_string(zmq.LAST_ENDPOINT)))
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

    def close(self) -> None:
        """Unbind a broker that bound but will not serve (what was to run around it failed to
        start): closes its sockets, removes its ipc:// files. ``run()`` does so when it ends;
        after that, and after a first close(), this does nothing."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this broker is running: stop() it")
        if not self._closed:
            self._close_sockets()

    def drain(self, grace: float) -> None:
        """Begin shutting down (safe from any thread or a signal handler); returns at once.

        New calls are answered UNAVAILABLE with the detail ``zrpc-retry: draining`` (they never
        ran: a client may send any of them to another broker), Health says NOT_SERVING, and the
        calls held are still dispatched and answered. The loop ends when none is left or after
        ``grace`` seconds, whichever comes first; ``run()`` then returns. ``stop()`` ends it now.
        """
        self._drain_grace = max(0.0, grace)
        self._drain_requested.set()
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (safe from any thread or a signal handler) and wait for the loop."""
        self._stopping.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"broker loop did not stop within {timeout}s")

    def _wake(self) -> None:
        """Make the loop's poll return (it reads _stopping and _drain_requested every round)."""
        if self._wake_recv is not None:
            try:
                waker = self._context.socket(zmq.PUSH)
            except zmq.ZMQError:  # the loop saw _stopping already and is terminating the context
                waker = None
            if waker is not None:
                try:
                    waker.linger = 0
                    waker.connect(self._wake_endpoint)
                    waker.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                finally:
                    # Always closed: one left open makes the loop's ctx.term() wait for ever
                    # (measured: 2 stops in 40 under load, when the loop had begun to stop).
                    waker.close(0)

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _close_sockets(self) -> None:
        # The socket files go first: while their sockets are bound, no other file can take their
        # inode, so the identity check in remove_ipc_socket_file cannot be fooled.
        for bound in self._socket_files:
            remove_ipc_socket_file(bound)
        self._socket_files = []
        self._closed = True
        self.connections.close()
        for socket in (self.frontend, self.backend, self._wake_recv):
            if socket is not None:
                # After a drain the last answers may still be queued: give them time to leave.
                if socket is self.frontend and self.engine.draining:
                    linger = _DRAINED_LINGER_MS
                elif socket is self.backend and self._told_workers:
                    linger = _STOPPING_LINGER_MS  # the DISCONNECTs, to workers that read them at once
                else:
                    linger = 0
                socket.close(linger)
        self.frontend = self.backend = self._wake_recv = None
        if self.security is not None:
            self.security.stop()
        if self._own_context:
            self._context.term()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        engine, clock = self.engine, self._clock
        frontend, backend = self.frontend, self.backend
        poller = self._poller = SocketPoller()
        poller.register(frontend)
        poller.register(backend)
        wake = self._wake_recv
        poller.register(wake)
        # The monitors are read every round they have events: one left unread blocks libzmq's
        # I/O thread, and the connection cap acts only as fast as we read them.
        connections = self.connections
        watched = connections.sockets()
        for socket in watched:
            poller.register(socket)
        tick_interval = self.config.tick_interval
        busy_poll = self.config.busy_poll
        next_tick = clock()
        polling_until = 0.0  # busy_poll: when the last message's polling window closes
        drain_due = math.inf  # while draining: when its next step falls due (see _drain_due)
        while not self._stopping.is_set():
            if self._drain_requested.is_set():
                if self._drained(clock()):
                    break
                drain_due = self._drain_due()
            now = clock()
            if now < polling_until:
                ready = poller.poll(0)
                if not ready:
                    # Give the core to a process that is waiting for it (on a small host, the
                    # worker or the client this loop is waiting for); then look again.
                    yield_core()
                    ready = poller.poll(0)
            else:
                timeout = max(0.0, min(min(next_tick, drain_due) - now, engine.next_timer(now)))
                # Whole milliseconds, rounded up: a timer less than 1 ms away, truncated to 0, would
                # make every poll return at once until it is due (a spin before each tick).
                ready = poller.poll(math.ceil(timeout * 1000))
            now = clock()
            if wake in ready:  # drain() or stop(): read, or poll would return at once for ever
                _read_all(wake)
                poller.used(wake)
            # A drain reads a bounded number of events and may answer ZAP: ask all again after one.
            touched = connections.answering() or not ready.isdisjoint(watched)
            connections.drain(ready)
            if touched:
                for socket in watched:
                    poller.used(socket)
            if frontend in ready:
                self._read_messages(frontend, engine.on_frontend, now)
                polling_until = now + busy_poll
            if backend in ready:
                held = engine.calls_held
                self._read_messages(backend, engine.on_backend, now)
                # Replies keep the window open (the client's next call follows), workers'
                # heartbeats alone do not: a broker of many workers would poll while idle.
                if held or engine.calls_held:
                    polling_until = now + busy_poll
            if now >= next_tick or engine.next_timer(now) == 0.0:
                engine.tick(now)
                connections.check(now)
                next_tick = now + tick_interval
            engine.flush()
            self._send_all()
        if self._stopping.is_set() and engine.draining and engine.calls_held:
            log.warning("stopped while draining: %d calls held fail at their clients", engine.calls_held)
        # Workers are told, so they say "stopped", not "silent", and register again as soon as a
        # broker is back on this endpoint (their READY waits in their queue for it).
        engine.backend_out.extend((identity, p.disconnect_message(p.BROKER_STOPPING)) for identity in engine.workers)
        self._send(backend, engine.backend_out)
        engine.backend_out = []
        self._told_workers = True
        self._poller = None  # it holds the sockets, closed next

    def _drained(self, now: float) -> bool:
        """Draining (see drain()): begin on the first call; True once the loop may end."""
        engine = self.engine
        if not engine.draining:
            engine.draining = True
            self._drain_began, self._held_at_drain = now, engine.calls_held
            told = engine.notify_draining()
            self._send_all()
            log.info("draining: refusing new calls (%d recent clients told); %d held, answered within %.1fs "
                     "or failed", told, engine.calls_held, self._drain_grace)
        grace_over = now >= self._drain_began + self._drain_grace
        if engine.calls_held and engine.refuse_queued(now, unserved_only=True):
            # Calls no worker can take would hold the drain to its grace; the tick refuses them
            # too, but a long tick_interval would leave them until then (review).
            engine.flush()
            self._send_all()
        if engine.calls_held and not grace_over:
            return False
        if not grace_over:
            # A client that just had its last answer may be sending its next call: read it and
            # refuse it as never run, rather than leave it unread until the frontend closes
            # (its client would then fail it as lost, "may have run"). One window, not renewed
            # by traffic: a load balancer polling Health must not hold the drain to its grace.
            if self._none_held_since is None:
                self._none_held_since = now
            if now - self._none_held_since < _DRAIN_QUIET:
                return False
        if engine.calls_held:
            # Queued calls never ran: refused as such, their clients may send them on.
            refused = engine.refuse_queued(now)
            engine.flush()
            self._send_all()
            log.warning("drain grace over: %d calls at workers fail at their clients (UNAVAILABLE, "
                        "connection closed); %d queued were refused", engine.calls_held, refused)
        log.info("drained in %.1fs: %d calls held at the start, %d left at workers; %d calls refused "
                 "(they never ran)", now - self._drain_began, self._held_at_drain, engine.calls_held,
                 engine.counters["refused_draining"])
        return True

    def _drain_due(self) -> float:
        """When ``_drained`` may next say yes with no message to wake the loop (clock time): at
        the end of the grace, or of the quiet window once no call is held. The tick must not
        decide this: a broker with a long tick_interval would overstay its drain by up to a tick."""
        due = self._drain_began + self._drain_grace
        if self._none_held_since is not None:
            due = min(due, self._none_held_since + _DRAIN_QUIET)
        return due

    def _read_messages(self, socket: zmq.Socket, handle, now: float) -> None:
        recv = _recv_frame
        clients = self.client_connections if socket is self.frontend else None
        for _ in range(_BATCH):
            try:
                frame = recv(socket, _NOBLOCK, False)
            except zmq.Again:  # not after the poll's POLLIN: messages arrive whole
                return
            identity = frame.bytes
            fd = frame.get(_SRCFD) if clients is not None else -1
            frames = []
            while frame.more:  # the rest of a message is there already: it arrives whole
                frame = recv(socket, _NOBLOCK, False)
                frames.append(frame.buffer if len(frame) >= _ZERO_COPY_BYTES else frame.bytes)
            try:
                if clients is None or not self._from_closed_connection(clients, identity, fd, now):
                    handle(identity, frames, now)
            except Exception:  # a bug must not take the broker down for everyone
                log.exception("internal error handling a message from %s", identity.hex())
                self.engine.counters["internal_errors"] += 1
            # Asked, not learnt from a recv raising zmq.Again: that costs twice as much (_frames).
            if not readable(socket):
                return
        self._poller.used(socket)  # more may wait: the next round reads on before any sleep

    def _from_closed_connection(self, clients: ClientConnections, client: bytes, fd: int, now: float) -> bool:
        """Record the connection ``client``'s message came on (_clients.py); True when that
        connection has closed already: the message is dropped unread (a call in it must not
        start at a worker for nobody, as it did when it was dispatched and then cancelled).

        The monitor's news is read first when the message came on another descriptor than the
        client's last, or from a routing id libzmq did not make: a peer that names itself may
        reconnect under its name on the very descriptor its last connection had (the lowest
        free one), and its new connection must not be taken for the old one (review)."""
        if clients.fd_of(client) == fd and _made_by_libzmq(client):
            return False
        if not self.connections.drain_side("frontend") and self._poller is not None:
            self._poller.used(self.connections.guards["frontend"].monitor)  # more events wait
        if clients.sent_on(client, fd):
            return False
        self.engine.counters["from_closed_connections"] += 1
        self.engine.client_disconnected(client, now)  # calls it sent before, read meanwhile
        return True

    def _client_connection_closed(self, fd: int) -> None:
        """(the frontend monitor's DISCONNECTED) The clients last seen on ``fd`` are gone."""
        for client in self.client_connections.disconnected(fd):
            self.engine.client_disconnected(client, self._clock())

    def reload_keys(self) -> None:
        """Read the allow-lists and rules again (SIGHUP; safe from any thread or a signal handler).

        New handshakes see the new lists at once. Live connections are checked per message: the
        loop adopts the new policy before the next message it reads, so a revoked client's next
        call gets UNAUTHENTICATED and a revoked worker is removed at its next message (it
        heartbeats) and told DISCONNECT. Raises ValueError for a bad file; the old lists stay.
        """
        if self.security is None:
            raise RuntimeError("this broker runs without CURVE: there are no keys to reload")
        self.security.reload()  # the loop thread adopts it (see _read_messages_secure)

    def _read_messages_secure(self, socket: zmq.Socket, handle, now: float) -> None:
        """``_read_messages`` for CURVE: frames as zmq.Frame, to read the peer's key (ZAP User-Id)."""
        policy = self.security.policy  # swapped whole by reload_keys(), maybe in another thread
        if policy is not self.engine.policy:
            self.engine.set_policy(policy, now)
        recv = socket.recv_multipart
        clients = self.client_connections if socket is self.frontend else None
        for _ in range(_BATCH):
            try:
                parts = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = parts[0].bytes
            try:
                if clients is not None and self._from_closed_connection(clients, identity, parts[0].get(_SRCFD), now):
                    continue
                peer_key = parts[1].get("User-Id") if len(parts) > 1 else None
                handle(identity, [part.bytes for part in parts[1:]], now, peer_key=peer_key)
            except Exception:  # a bug must not take the broker down for everyone
                log.exception("internal error handling a message from %s", identity.hex())
                self.engine.counters["internal_errors"] += 1
            if not readable(socket):  # as in _read_messages
                return
        self._poller.used(socket)

    def _send_all(self) -> None:
        engine = self.engine
        # A worker found gone is removed and its undelivered calls go to another worker, in this
        # round: one more pass per worker removed (each pass removes at least one, or ends).
        for _ in range(len(engine.workers) + 1):
            undelivered = []
            if engine.backend_out:
                messages, engine.backend_out = engine.backend_out, []
                undelivered = self._send(self.backend, messages)
            if engine.frontend_out:
                messages, engine.frontend_out = engine.frontend_out, []
                self._send(self.frontend, messages)
            if not undelivered:
                return
            engine.on_undeliverable(undelivered, self._clock())
            engine.flush()

    def _send(self, socket: zmq.Socket, messages: list) -> list:
        """Send each ``(routing id, frames)``; returns those that could not be sent."""
        if self._poller is not None:
            self._poller.used(socket)  # a send may take the FD's signal of a message come meanwhile
        send = _send_frame
        sent_bytes = 0  # the metrics' bytes out: sizes we read anyway to choose copy or not
        undelivered = []
        for identity, frames in messages:
            try:
                # ROUTER refuses a message at its first frame (peer gone, queue full), never midway.
                send(socket, identity, _MORE_NOBLOCK)
                for frame in frames[:-1]:
                    size = len(frame)
                    send(socket, frame, _MORE_NOBLOCK, size < _ZERO_COPY_BYTES)
                    sent_bytes += size
                last = frames[-1]
                size = len(last)
                send(socket, last, _NOBLOCK, size < _ZERO_COPY_BYTES)
                sent_bytes += size
            except zmq.ZMQError as exc:
                # EHOSTUNREACH: the peer is gone; EAGAIN: it stopped reading. Only it loses.
                self.undeliverable += 1
                self.engine.counters["undeliverable"] += 1
                if exc.errno == zmq.EAGAIN and socket is self.frontend:
                    self.engine.client_not_reading(identity, self._clock())
                elif exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                    log.warning("send to %s failed: %s", identity.hex(), exc)
                undelivered.append((identity, frames))
        self.engine.counters["bytes_out"] += sent_bytes
        return undelivered


def _made_by_libzmq(identity: bytes) -> bool:
    """A routing id libzmq made for a peer that named none: a zero byte and a 32-bit counter."""
    return len(identity) == 5 and identity[0] == 0


def _read_all(socket: zmq.Socket) -> None:
    """Discard what ``socket`` holds (wake-ups carry no data)."""
    for _ in range(1000):  # bounded: a wake-up is sent once per drain() or stop()
        try:
            socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
