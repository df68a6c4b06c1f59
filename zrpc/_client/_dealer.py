"""The client's DEALER sockets, one per broker: endpoints and options, the same for both flavours."""
from __future__ import annotations

import uuid
from typing import Sequence

import zmq

from .. import _security
from .._endpoints import EXPECTED
from ._monitor import HANDSHAKE_EVENTS

# What a client's monitors report: connections that open and close, attempts that fail (a broker
# not running: see ClientCore.reconnect_scheduled), and how handshakes end (a refusal matters with CURVE).
MONITORED = HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED

# ZMTP heartbeats notice a dead TCP peer (a broker host that vanished without a FIN) so ZeroMQ
# reconnects instead of queueing into a connection that will never deliver.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000

def bad_endpoint(endpoint: str, why: str) -> ValueError:
    return ValueError(f"bad broker endpoint {endpoint!r}: {why}")


def open_dealers(context: zmq.Context, endpoints: Sequence[str], curve: tuple[_security.KeyPair, bytes] | None = None
                 ) -> tuple[list[zmq.Socket], list[zmq.Socket]]:
    """One DEALER per endpoint, each connected to its broker (see ClientCore: one per broker,
    so the client knows which broker holds which call), and the monitor of each (see
    open_monitor).

    ``curve`` is (our key pair, the broker's public key) for CURVE, or None for plain TCP.
    """
    sockets: list[zmq.Socket] = []
    monitors: list[zmq.Socket] = []
    try:
        for endpoint in endpoints:
            socket, monitor = open_dealer(context, endpoint, curve)
            sockets.append(socket)
            monitors.append(monitor)
    except BaseException:
        for socket, monitor in zip(sockets, monitors):
            close_dealer(socket, monitor)
        raise
    return sockets, monitors


def open_dealer(context: zmq.Context, endpoint: str, curve: tuple[_security.KeyPair, bytes] | None = None
                ) -> tuple[zmq.Socket, zmq.Socket]:
    """One DEALER connected to ``endpoint``, and its monitor (see open_dealers)."""
    socket = context.socket(zmq.DEALER, socket_class=zmq.Socket)  # plain, whatever the context
    try:
        monitor = open_monitor(socket)  # before connect: an event missed is a link lost
    except BaseException:
        socket.close(linger=0)
        raise
    try:
        _connect(socket, endpoint, curve)
    except BaseException:
        close_dealer(socket, monitor)
        raise
    return socket, monitor


def close_dealer(socket: zmq.Socket, monitor: zmq.Socket, linger: int = 0) -> None:
    """Close a DEALER and its monitor; ``linger`` ms for what it still sends (a CANCEL)."""
    try:
        socket.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)
    socket.close(linger=linger)


def open_monitor(socket: zmq.Socket, events: int = MONITORED) -> zmq.Socket:
    """A plain (blocking-API) PAIR receiving ``socket``'s monitor events, whichever flavour the
    socket is: both clients read it with NOBLOCK, before each send too (see _monitor.on_event)."""
    address = f"inproc://zrpc-client-monitor-{uuid.uuid4().hex}"
    socket.monitor(address, events)
    monitor = zmq.Context.shadow(socket.context.underlying).socket(zmq.PAIR)
    monitor.linger = 0
    monitor.connect(address)
    return monitor


def _connect(socket: zmq.Socket, endpoint: str, curve: tuple[_security.KeyPair, bytes] | None) -> None:
    """Set the client options on ``socket`` and connect it to ``endpoint``."""
    if curve is not None:
        _security.apply_client_curve(socket, *curve)
    # Closing must never wait for unsent requests: their callers have already been answered.
    socket.setsockopt(zmq.LINGER, 0)
    # Not ZMQ_IMMEDIATE. With it, libzmq drops the connection's queue the moment the connection
    # closes, even while we are reading a message from it, and libzmq 4.3.5 then aborts the
    # process (`Assertion failed: !_more (src/fq.cpp:80)`: a broker that restarts while the
    # client has replies unread). Without it ZeroMQ keeps one queue for the endpoint for the
    # socket's life, across reconnections, so: requests go out only over a link whose
    # handshake the monitor reported (ClientCore.link_order), and when a connection that was up
    # closes, the client reads what it holds, then replaces the socket (see _monitor.drain), so
    # that requests still queued for the closed connection do not reach the next one late, with
    # deadlines measured long before. That holds when the client sees the close within ZeroMQ's
    # reconnect interval (100 ms): a client busier than that (a slow done-callback, a blocked
    # event loop) may have them sent over the next connection first.
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    _security.allow_ipv6_for(socket, [endpoint])
    try:
        socket.connect(endpoint)
    except zmq.ZMQError as exc:
        # e.g. tcp://host without a port, or an unknown transport: libzmq's message
        # names neither the problem nor the form it expects.
        raise bad_endpoint(endpoint, f"{zmq.strerror(exc.errno)}; {EXPECTED}") from None
