"""The broker's connection cap: live connections per endpoint, counted from the socket monitor.

Measured (issue 3, fault 11; pyzmq 27.3 with libzmq 4.3.5, Linux, tests/test_connection_flood.py):
- a flood of plain TCP connections makes libzmq accept until the process is out of file
  descriptors; then accept() fails with EMFILE and libzmq retries it at once, for ever: its I/O
  thread spins (0.74 to 1.74 s of CPU per 2 s; a whole core when no call comes), a client
  connected before made 2x to 15x fewer calls (3,795 -> 250 and 2,508 -> 1,153 in 2 s), and
  no new peer (client, worker, metrics scrape) could connect;
- libzmq has no max-connections option, and ``unbind`` drops every connection accepted through
  the endpoint, so accepting cannot be paused that way;
- the socket monitor reports ACCEPTED and DISCONNECTED with the connection's fd, in order, and
  every way an accepted connection ends (peer gone, handshake timeout, protocol error, a
  duplicate routing id closed) reports DISCONNECTED;
- a monitor that is not read blocks libzmq's I/O thread once its pipe is full (about 2000
  events): every socket of the context stalls. The loop reads the monitors every round;
- so the monitor must not report ACCEPT_FAILED: at EMFILE libzmq emits one per spin (824,000 in
  3 s), the blocked I/O thread then waits for the loop to read them all, and calls fell from
  5,914 to 167 in 3 s. Running out of descriptors is noticed by a probe once a second instead;
- ``shutdown(2)`` on an accepted fd makes libzmq read EOF and close the fd itself, cleanly (the
  connection goes, libzmq's bookkeeping stays right); closing the fd under libzmq would not.

So: ``ConnectionCount`` decides (no I/O: fed fds, answers admit or refuse), a
``ConnectionGuard`` reads one ROUTER's monitor in the broker loop and shuts down each
connection accepted past the cap, and ``ConnectionLimits`` holds both guards, the probe, and
(`zrpc broker start` without CURVE) a ZAP handler that holds every handshake until the loop has
seen its connection (``gate``). A refused ZeroMQ peer sees a dropped connection and reconnects
after its reconnect interval; it gets in once a slot is free. Held, its handshake never
completes on a refused connection, so it keeps what it had queued; not held, it usually
completes first (well under a millisecond) and what it sent is lost with the connection.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import struct

import zmq

log = logging.getLogger("zrpc.broker")

# File descriptors kept free beyond both endpoints' caps: the broker's own sockets and pipes,
# ZeroMQ's internal ones, the metrics server and log files (20-60), and per endpoint the
# connections libzmq accepts before the loop refuses them. Measured: floods of 700 to 6,000
# connections at once peaked at 120 to 210 descriptors above the cap (the kernel hands them
# over in waves of about one listen backlog, ZMQ_BACKLOG 100), never more.
RESERVE_FDS = 512
# The automatic cap (max_connections = 0) when the fd limit is large.
DEFAULT_CAP = 10_000
# How many monitor events one round of the loop reads per endpoint before serving messages.
_EVENTS_PER_ROUND = 1024
# drain_side reads at most this many rounds of _EVENTS_PER_ROUND (a monitor's pipe holds ~2,000).
_DRAIN_ROUNDS = 8
# At the cap, look for stale entries (an fd closed without an event) at most this often.
_AUDIT_INTERVAL = 5.0
# How often the loop checks that the process still has a free file descriptor.
_PROBE_INTERVAL = 1.0
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq sends ZAP requests (RFC 27)
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED  # never ACCEPT_FAILED: see above
_ACCEPTED = int(zmq.EVENT_ACCEPTED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_EVENT_HEADER = struct.Struct("=HI")  # event number, value (the connection's fd)
# SO_LINGER {on, 0 s}: libzmq's close of a refused connection resets it (no FIN_WAIT orphans).
_LINGER_RESET = struct.pack("ii", 1, 0)


def fd_limit() -> int:
    """The process's soft RLIMIT_NOFILE (a very large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, in use now).

    For a process that is a broker (the CLI): a library must not change its host's limits
    (code using select() breaks on fds past 1024).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file descriptor limit from %d to %d: %s", soft, target, exc)
    return soft, fd_limit()


class ConnectionCapError(ValueError):
    """max_connections cannot fit in the file descriptor limit: a bad setting."""


def connection_cap(configured: int, limit: int) -> int:
    """The connections one endpoint may hold: ``configured``, or automatic when 0.

    Both endpoints at their cap plus RESERVE_FDS must fit in ``limit``, or the cap could not keep
    libzmq away from EMFILE; a setting that does not fit is a ConnectionCapError naming both numbers.
    The automatic cap never raises: under a limit too low for that rule it is a quarter of it.
    """
    most = (limit - RESERVE_FDS) // 2
    if configured == 0:
        return min(DEFAULT_CAP, most) if most >= 1 else max(1, limit // 4)
    if configured > most:
        raise ConnectionCapError(f"max_connections {configured} needs a file descriptor limit of at least "
                         f"{2 * configured + RESERVE_FDS} (2 x max_connections + {RESERVE_FDS}), "
                         f"the limit is {limit}: raise it (ulimit -n, LimitNOFILE=) or lower "
                         f"max_connections (0: automatic)")
    return configured


class ConnectionCount:
    """One endpoint's accepted connections and the decision for each new one; no I/O.

    ``admitted`` are the connections within the cap; ``refusing`` those refused whose fd libzmq
    has not closed yet (they still hold a descriptor, but no slot).
    """

    __slots__ = ("cap", "admitted", "refusing", "refused")

    def __init__(self, cap: int):
        self.cap = cap
        self.admitted: set[int] = set()
        self.refusing: set[int] = set()
        self.refused = 0

    def accepted(self, fd: int) -> bool:
        """Record a connection libzmq accepted on ``fd``; False means refuse it (cap reached)."""
        # An fd we still hold was closed without an event and reused: the entry is stale.
        self.admitted.discard(fd)
        self.refusing.discard(fd)
        if len(self.admitted) < self.cap:
            self.admitted.add(fd)
            return True
        self.refusing.add(fd)
        self.refused += 1
        return False

    def disconnected(self, fd: int) -> None:
        self.admitted.discard(fd)
        self.refusing.discard(fd)

    def forget(self, fds) -> None:
        """Drop entries found stale by an audit."""
        for fd in fds:
            self.disconnected(fd)

    @property
    def held(self) -> int:
        """Descriptors held by accepted connections, refused ones not yet closed included."""
        return len(self.admitted) + len(self.refusing)


class ConnectionLimits:
    """The cap of every endpoint of one broker, and the probe for running out of descriptors.

    Optionally, without CURVE, ``gate()`` first: the ROUTERs then get a ZAP domain, so that no
    NULL handshake completes before the loop has seen its connection's ACCEPTED event. Then
    ``watch()`` each ROUTER before it binds (no accepted connection goes unseen), register
    ``sockets()`` in the loop's poller, call ``drain(ready)`` after each poll and ``check(now)``
    on the loop's ticks, ``close()`` before closing the ROUTERs. Refusals and exhaustion go to
    ``counters`` (the engine's) and to ``warn`` (its rate-limited log).
    """

    def __init__(self, cap: int, counters, warn, clock):
        self.cap = cap
        self.guards: dict[str, ConnectionGuard] = {}  # by side: "frontend", "backend"
        self._counters = counters
        self._warn = warn
        self._clock = clock
        self._next_probe = 0.0
        self.zap: zmq.Socket | None = None  # our ZAP handler (NULL mode), see gate()
        self._zap_pending: list[list[bytes]] = []

    def gate(self, context: zmq.Context) -> bool:
        """Answer ZAP on ``context`` from the loop, so handshakes wait for our decision.

        Measured: refused right after accept, a ZeroMQ peer has usually completed its handshake
        already (well under a millisecond on loopback) and sent what it had queued: those
        messages are lost with the connection. A ZAP request cannot come before its connection's
        ACCEPTED event, so answering every request only once the monitors are read means a
        refused peer never completes its handshake, and keeps its messages for the reconnection.
        Every request is answered 200: the refusal is the shutdown, never a ZAP denial (measured:
        after a denial, status 300 leaves the peer hanging, 400 and 500 stop its reconnecting).
        The cost is a trip through the loop thread per handshake: nothing measurable for a broker
        process (median 250-440 us either way), but a broker thread in a process whose other
        threads hold the GIL delays handshakes enough to change what clients see (of 334 clients
        that send and close at once, none got its call through in 5 runs of 10; some did in every
        run without the hold), so in-process brokers leave it off. False when the context has a
        ZAP handler already.
        """
        handler = context.socket(zmq.ROUTER)
        handler.linger = 0
        try:
            handler.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            handler.close(0)
            log.info("connection cap without handshake gating: %s is taken (%s)", ZAP_ENDPOINT, exc)
            return False
        self.zap = handler
        return True

    def watch(self, side: str, router: zmq.Socket, on_accepted=None, on_disconnected=None) -> None:
        """Guard ``router``; ``on_accepted(fd)`` and ``on_disconnected(fd)`` hear of each of its
        connections as well, in the monitor's order."""
        self.guards[side] = ConnectionGuard(router, side, self.cap, self._counters, self._warn, self._clock,
                                            on_accepted, on_disconnected)

    def drain_side(self, side: str) -> bool:
        """Read every event waiting on ``side``'s monitor now (bounded): what happened to its
        connections up to the message just read (see _clients.py). False when some were left."""
        guard = self.guards.get(side)
        if guard is None:
            return True
        for _ in range(_DRAIN_ROUNDS):
            if guard.drain():
                return True
        return False

    def unwatch(self, side: str) -> None:
        guard = self.guards.pop(side, None)
        if guard is not None:
            guard.close()

    def sockets(self) -> list[zmq.Socket]:
        """What the loop polls for us: each monitor, and the ZAP handler when gating."""
        return [guard.monitor for guard in self.guards.values()] + ([self.zap] if self.zap is not None else [])

    def answering(self) -> bool:
        """ZAP requests wait for their answer: the next drain sends on the handler."""
        return bool(self._zap_pending)

    def drain(self, ready) -> None:
        """Read the events of each monitor in ``ready`` (the poll's result), then answer the
        ZAP requests waiting, once every event they could follow has been handled."""
        zap = self.zap
        if zap is not None and zap in ready:
            for _ in range(_EVENTS_PER_ROUND):
                try:
                    self._zap_pending.append(zap.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        emptied = True
        for guard in self.guards.values():
            if self._zap_pending or guard.monitor in ready:
                emptied = guard.drain() and emptied
        if self._zap_pending and emptied:
            for request in self._zap_pending:
                _zap_allow(zap, request)
            self._zap_pending.clear()

    def check(self, now: float) -> None:
        """At most once per _PROBE_INTERVAL: is a descriptor still free? (one open and close)"""
        if now < self._next_probe:
            return
        self._next_probe = now + _PROBE_INTERVAL
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._counters["fds_exhausted"] += 1
                self._warn("fds_exhausted", "the broker is out of file descriptors (limit %d; %d "
                           "held by connections): nothing can be accepted and libzmq retries in a busy "
                           "loop; lower max_connections or raise the limit (LimitNOFILE=)",
                           fd_limit(), self.held())
            return
        os.close(fd)

    def held(self) -> int:
        """Descriptors held by accepted connections, all endpoints together."""
        return sum(guard.count.held for guard in self.guards.values())

    def close(self) -> None:
        for guard in self.guards.values():
            guard.close()
        if self.zap is not None:
            self.zap.close(0)
            self.zap = None


class ConnectionGuard:
    """Enforces a ConnectionCount on one ROUTER, from its socket monitor, in the broker loop."""

    def __init__(self, router: zmq.Socket, side: str, cap: int, counters, warn, clock, on_accepted=None,
                 on_disconnected=None):
        self.side = side
        self._on_accepted = on_accepted
        self._on_disconnected = on_disconnected
        self.count = ConnectionCount(cap)
        self._router = router
        self._counters = counters
        self._warn = warn  # engine.bad_input_log.warn: at most a few lines per reason and window
        self._clock = clock
        self._endpoint = ""  # read once bound (a tcp port 0 is resolved then)
        self._address = None  # the listener's local address, as getsockname() shows it
        self._next_audit = 0.0
        self.monitor: zmq.Socket | None = router.get_monitor_socket(EVENTS)

    def close(self) -> None:
        if self.monitor is not None:
            try:
                self._router.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(0)
            self.monitor = None

    def drain(self) -> bool:
        """Handle the monitor events waiting (bounded per round; the poll brings us back).
        True when none is left."""
        recv, count = self.monitor.recv_multipart, self.count
        for _ in range(_EVENTS_PER_ROUND):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            event, value = _EVENT_HEADER.unpack_from(frames[0])
            if event == _ACCEPTED:
                if self._on_accepted is not None:
                    self._on_accepted(value)
                if not count.accepted(value):
                    self._refuse(value)
            elif event == _DISCONNECTED:
                count.disconnected(value)
                if self._on_disconnected is not None:
                    self._on_disconnected(value)
        return False

    def _refuse(self, fd: int) -> None:
        count = self.count
        self._counters["connections_refused"] += 1
        now = self._clock()
        if now >= self._next_audit:  # only at the cap, and rarely: it costs a syscall per fd
            self._next_audit = now + _AUDIT_INTERVAL
            self._audit()
        address = self._listener_address()
        self._warn("connections_refused", "%s %s holds %d connections (max_connections %d): "
                   "refusing new ones (%d refused so far)", self.side, self._endpoint,
                   len(count.admitted), count.cap, count.refused)
        if not _shutdown_if_ours(fd, address):
            # Already closed by libzmq (its DISCONNECTED follows), or the fd is something else now.
            count.refusing.discard(fd)

    def _audit(self) -> None:
        """Forget admitted fds that no longer are connections of this listener (lost events)."""
        address = self._listener_address()
        stale = [fd for fd in self.count.admitted if not _is_ours(fd, address)]
        if stale:
            log.warning("%s: %d connections were closed without a monitor event; forgetting them",
                        self.side, len(stale))
            self.count.forget(stale)

    def _listener_address(self):
        if not self._endpoint:
            self._endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._address = listener_address(self._endpoint)
        return self._address


def _zap_allow(zap: zmq.Socket, request: list[bytes]) -> None:
    """Answer one ZAP request (RFC 27) 200 OK, with no user id and no metadata."""
    try:
        delimiter = request.index(b"")
        request_id = request[delimiter + 2]
    except (ValueError, IndexError):
        return  # not a ZAP request: libzmq never sends one
    try:
        zap.send_multipart(request[:delimiter + 1] + [b"1.0", request_id, b"200", b"OK", b"", b""], zmq.NOBLOCK)
    except zmq.ZMQError:
        pass  # the connection is gone


def listener_address(endpoint: str):
    """What getsockname() of a connection accepted on ``endpoint`` shows: ('tcp', port) or
    ('ipc', path); None for a transport we do not check (then nothing is shut down)."""
    if endpoint.startswith("tcp://"):
        try:
            return "tcp", int(endpoint.rsplit(":", 1)[1])
        except ValueError:
            return None
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        return "ipc", "\0" + path[1:] if path.startswith("@") else path
    return None


@contextlib.contextmanager
def _borrowed(fd: int):
    """A socket object on libzmq's ``fd`` that we never own: no dup(), detached (not closed) on
    the way out; None when the fd is closed meanwhile or is not a socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        yield None
        return
    try:
        yield sock
    finally:
        sock.detach()


def _is_ours(fd: int, address) -> bool:
    """Is ``fd`` a stream socket accepted on the listener at ``address``? (no fd is used)"""
    if address is None:
        return False
    with _borrowed(fd) as sock:
        return sock is not None and _matches(sock, address)


def _shutdown_if_ours(fd: int, address) -> bool:
    """Shut the connection on ``fd`` down, if it still is one of the listener's; libzmq then
    reads EOF and closes the fd itself. True if it was shut down."""
    if address is None:
        return False
    with _borrowed(fd) as sock:
        if sock is None or not _matches(sock, address):
            return False
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the peer is gone already: libzmq is closing it anyway
            return False
        return True


def _matches(sock: socket.socket, address) -> bool:
    if sock.type != socket.SOCK_STREAM:
        return False
    kind, where = address
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):  # the listener itself
            return False
        local = sock.getsockname()
    except OSError:
        return False
    if kind == "tcp":
        return sock.family in (socket.AF_INET, socket.AF_INET6) and local[1] == where
    if isinstance(local, bytes):  # an abstract ipc name
        local = local.decode("utf-8", "surrogateescape")
    return sock.family == socket.AF_UNIX and local == where
