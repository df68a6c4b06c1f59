"""The client's DEALER socket: endpoints and options, the same for both flavours."""
from __future__ import annotations

import re
from typing import Sequence

import zmq

from .. import _security

# ZMTP heartbeats notice a dead TCP peer (a broker host that vanished without a FIN) so ZeroMQ
# reconnects instead of queueing into a connection that will never deliver.
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000

# libzmq answers an endpoint without a transport with a bare EINVAL ("Invalid argument"), and
# the asyncio client would only connect at its first call: check the form at construction.
_TRANSPORT = re.compile(r"^[a-z][a-z0-9+.-]*://.+$")
_EXPECTED = "expected a ZeroMQ endpoint such as tcp://host:port or ipc://path"


def bad_endpoint(endpoint: str, why: str = _EXPECTED) -> ValueError:
    return ValueError(f"bad broker endpoint {endpoint!r}: {why}")


def endpoint_list(endpoints: str | Sequence[str]) -> list[str]:
    """One endpoint or several, as a non-empty list of strings, each with a transport."""
    found = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not found or not all(isinstance(e, str) and e for e in found):
        raise ValueError(f"endpoints must be a non-empty string or list of strings, got {endpoints!r}")
    for endpoint in found:
        if not _TRANSPORT.match(endpoint):
            raise bad_endpoint(endpoint)
    return found


def open_dealer(context: zmq.Context, endpoints: Sequence[str],
                curve: tuple[_security.KeyPair, bytes] | None = None) -> zmq.Socket:
    """A DEALER connected to every endpoint (ZeroMQ round-robins requests across them).

    ``curve`` is (our key pair, the broker's public key) for CURVE, or None for plain TCP.
    """
    socket = context.socket(zmq.DEALER)
    try:
        if curve is not None:
            _security.apply_client_curve(socket, *curve)
        # Closing must never wait for unsent requests: their callers have already been answered.
        socket.setsockopt(zmq.LINGER, 0)
        # Requests go only to brokers we are connected to. Without IMMEDIATE, ZeroMQ keeps a queue
        # for every endpoint from the start, and keeps it while a broker is down: round-robin then
        # parks requests in a dead broker's queue (a client's first call always went to the first
        # endpoint, up or not). With it, a send blocks while no broker is connected; both flavours
        # keep such calls unsent until one is, and their deadlines bound the wait.
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        _security.allow_ipv6_for(socket, endpoints)
        for endpoint in endpoints:
            try:
                socket.connect(endpoint)
            except zmq.ZMQError as exc:
                # e.g. tcp://host without a port, or an unknown transport: libzmq's message
                # names neither the problem nor the form it expects.
                raise bad_endpoint(endpoint, f"{zmq.strerror(exc.errno)}; {_EXPECTED}") from None
    except BaseException:
        socket.close(linger=0)
        raise
    return socket
