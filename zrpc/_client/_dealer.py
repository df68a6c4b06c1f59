"""The client's DEALER sockets, one per broker: endpoints and options, the same for both flavours."""
from __future__ import annotations

from typing import Sequence

import zmq

from .. import _security
from .._endpoints import EXPECTED

# ZMTP heartbeats notice a dead TCP peer (a broker host that vanished without a FIN) so ZeroMQ
# reconnects instead of queueing into a connection that will never deliver.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000

def bad_endpoint(endpoint: str, why: str) -> ValueError:
    return ValueError(f"bad broker endpoint {endpoint!r}: {why}")


def open_dealers(context: zmq.Context, endpoints: Sequence[str],
                 curve: tuple[_security.KeyPair, bytes] | None = None) -> list[zmq.Socket]:
    """One DEALER per endpoint, each connected to its broker (see ClientCore: one per broker,
    so the client knows which broker holds which call).

    ``curve`` is (our key pair, the broker's public key) for CURVE, or None for plain TCP.
    """
    sockets: list[zmq.Socket] = []
    try:
        for endpoint in endpoints:
            sockets.append(_open_dealer(context, endpoint, curve))
    except BaseException:
        for socket in sockets:
            socket.close(linger=0)
        raise
    return sockets


def _open_dealer(context: zmq.Context, endpoint: str, curve: tuple[_security.KeyPair, bytes] | None) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    try:
        if curve is not None:
            _security.apply_client_curve(socket, *curve)
        # Closing must never wait for unsent requests: their callers have already been answered.
        socket.setsockopt(zmq.LINGER, 0)
        # Requests go only to a broker we are connected to. Without IMMEDIATE, ZeroMQ keeps a
        # queue for the endpoint from the start, and keeps it while the broker is down, parking
        # requests for a dead broker. With it, a send fails (EAGAIN) while the broker is not
        # connected; both flavours then offer the calls to another broker or keep them unsent
        # until one is connected, and their deadlines bound the wait.
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        _security.allow_ipv6_for(socket, [endpoint])
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as exc:
            # e.g. tcp://host without a port, or an unknown transport: libzmq's message
            # names neither the problem nor the form it expects.
            raise bad_endpoint(endpoint, f"{zmq.strerror(exc.errno)}; {EXPECTED}") from None
    except BaseException:
        socket.close(linger=0)
        raise
    return socket
