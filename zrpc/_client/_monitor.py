"""What a client learns from the socket monitor of each of its DEALERs (one per broker):
connections that open and close, and handshakes a broker refuses. Both client flavours feed each monitor
message to :func:`on_event`.

- A connection that closes (the broker stopped, or its host vanished: ZMTP heartbeats notice)
  takes the calls it carried with it: no reply can come, since a restarted broker knows nothing
  of them and a DEALER that reconnects gets a new routing id. The replies that arrived before
  the close are read first; the core then fails the rest UNAVAILABLE at once (see
  ``ClientCore.connection_closed``) instead of leaving them to their deadlines, the retry policy
  sends the idempotent ones again, and the flavour replaces the DEALER (see :func:`drain`).
- CURVE: a client whose key the broker refuses, or that holds the wrong broker key, never gets a
  connection: ZeroMQ retries the handshake forever, its calls stay unsent (calls go only over a
  link whose handshake succeeded), and the caller would see only DEADLINE_EXCEEDED.
  :class:`HandshakeWatch` turns the refusal into a clear UNAUTHENTICATED error (issue 5).
"""
from __future__ import annotations

import os
import socket as _os_socket
from typing import NamedTuple

import zmq

from .. import _frames
from .._errors import Error
from .._status import StatusCode
from ._core import ClientCore, Outcome, logger

# Messages read from a closed connection's socket before it is replaced: every loop in the client
# is bounded, and this one well above what a DEALER holds (its receive high-water mark, 1,000).
_READ_LEFT_MAX = 100 * 1000

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def connected_to_itself(fd: int) -> bool:
    """Whether the TCP connection on ``fd`` (the value of a monitor's EVENT_CONNECTED) is one
    from a socket to itself.

    A DEALER that reconnects to a loopback port where nothing listens may be given that very
    port as its own (one inside the kernel's ip_local_port_range, 32768-60999 on Linux), and TCP
    then connects it to itself. A new-user tester's worker so heard its own heartbeats, took
    them for a broker's, and held the port: no broker could bind it again. Its client hung so.
    """
    try:
        connection = _os_socket.socket(fileno=os.dup(fd))  # a copy: libzmq's stays open
    except OSError:  # closed meanwhile, or not a socket
        return False
    try:
        return (connection.family in (_os_socket.AF_INET, _os_socket.AF_INET6)
                and connection.getsockname() == connection.getpeername())
    except OSError:
        return False
    finally:
        connection.close()


def self_connection_warning(endpoint: str) -> str:
    return (f"connected to itself at {endpoint}: nothing listens there, and the kernel gave our end that "
            f"same port; reconnecting. A broker port below the local port range "
            f"(/proc/sys/net/ipv4/ip_local_port_range: 32768 and up on Linux) cannot be taken so")


def refusal_reason(event: int, value: int, curve: bool = True) -> str | None:
    """Why a handshake failed, for a person; None for an event that is not a refusal. ``curve``:
    we use CURVE (without it, only a broker that requires CURVE refuses us)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if curve:
            return "the broker there does not use CURVE: drop --broker-key and --curve-secret"
        # A tester's plain client waited out its whole deadline, then read "is a broker running?"
        return "the broker there requires CURVE: give its public key (--broker-key) and a secret key (--curve-secret)"
    if not curve:
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"our key is not allowed (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"CURVE protocol error {value:#x} (is --broker-key the broker's public key?)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "handshake failed (is --broker-key the broker's public key, and is CURVE on at the broker?)"
    return None


# A plain peer at a broker that requires CURVE mostly sees only its connection closed during
# the handshake (EVENT_HANDSHAKE_FAILED_NO_DETAIL; the explicit mechanism mismatch came 1 time
# in 29 here). A broker at its connection cap closes connections that way too, so this is only
# a hint, said once, after this many in a row with none accepted.
CLOSED_IN_HANDSHAKE_HINT_AFTER = 2


class HandshakeCloses:
    """A plain peer's handshakes that its brokers closed, in a row per endpoint (the client's
    HandshakeWatch and the worker's BrokerLink both feed it their monitor's events)."""

    def __init__(self) -> None:
        self._in_a_row: dict[str, int] = {}

    def hint(self, event: int, endpoint: str) -> str | None:
        """The hint, once per run of closes (when it reaches CLOSED_IN_HANDSHAKE_HINT_AFTER)."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._in_a_row.pop(endpoint, None)
        if event != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            return None
        times = self._in_a_row[endpoint] = self._in_a_row.get(endpoint, 0) + 1
        if times != CLOSED_IN_HANDSHAKE_HINT_AFTER:
            return None
        return (f"the broker at {endpoint} closed our connection during the handshake {times} times: if it "
                f"requires CURVE, give its public key (--broker-key) and a secret key (--curve-secret); "
                f"or it is at its connection limit; or what listens there is not a zrpc broker")


class HandshakeWatch:
    """Per endpoint: is the broker there accepting our handshake?

    After a refusal the client disconnects the endpoint (stopping ZeroMQ's retry loop) and
    connects it again when new calls come (``to_retry``), so a key added to the broker's list is
    picked up. Once every broker has refused us, the calls in flight fail UNAUTHENTICATED.
    """

    def __init__(self, endpoints: list[str], curve: bool = True):
        self.curve = curve
        self.refused: dict[str, str] = {}  # endpoint -> why, while disconnected after a refusal
        self.retrying: dict[str, str] = {}  # endpoint -> why it was refused last, connected again
        self.accepted: set[str] = set()
        self._endpoints = list(endpoints)
        self._closes = HandshakeCloses()  # plain: see CLOSED_IN_HANDSHAKE_HINT_AFTER

    def hint(self, event: int, endpoint: str) -> str | None:
        """Once per run of them: the hint a plain client's handshakes closed by the broker give."""
        return None if self.curve else self._closes.hint(event, endpoint)

    def on_event(self, event: int, value: int, endpoint: str) -> Error | None:
        """Record one monitor event; returns the error for pending calls when no endpoint is left."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.accepted.add(endpoint)
            self.refused.pop(endpoint, None)
            self.retrying.pop(endpoint, None)
            return None
        if event == zmq.EVENT_DISCONNECTED:
            self.accepted.discard(endpoint)  # another broker's refusal may now leave none
            return None
        reason = refusal_reason(event, value, self.curve)
        if reason is None:
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and endpoint in self.retrying:
            # A closed handshake says less than the refusal before it (a tester's CURVE client at
            # a plain broker read "drop --broker-key", then failed "is CURVE on at the broker?").
            # Said as the earlier attempt's: the reason may have changed since (review).
            reason = f"the broker closed the handshake; the attempt before was refused: {self.retrying[endpoint]}"
        self.accepted.discard(endpoint)
        self.retrying.pop(endpoint, None)
        self.refused[endpoint] = reason
        if self.accepted or len(self.refused) < len(self._endpoints):
            return None  # another broker may still take the calls
        return self.error(endpoint)

    def error(self, endpoint: str | None = None) -> Error:
        endpoint = endpoint or next(iter(self.refused), self._endpoints[0])
        reason = self.refused.get(endpoint, "handshake failed")
        return Error(StatusCode.UNAUTHENTICATED,
                     f"handshake refused by broker at {endpoint}: {reason}",
                     {"zrpc-endpoint": endpoint})

    def to_retry(self) -> list[str]:
        """Endpoints to connect again now that calls wait (once per refusal)."""
        endpoints = list(self.refused)
        self.retrying.update(self.refused)
        self.refused.clear()
        return endpoints


def parse_event(frames: list[bytes]) -> tuple[int, int, str]:
    """(event, value, endpoint) from a monitor message."""
    from zmq.utils.monitor import parse_monitor_message

    message = parse_monitor_message(frames)
    return message["event"], message["value"], message["endpoint"].decode("utf-8", "replace")


class Drained(NamedTuple):
    """What a monitor's events did: the calls they ended, and whether the DEALER must be replaced."""

    outcomes: list[Outcome]
    replace: bool


def drain(monitor: zmq.Socket, core: ClientCore, link: int, endpoint: str, watch: HandshakeWatch | None,
          socket: zmq.Socket) -> Drained | None:
    """Feed every event waiting on the monitor of ``link`` to :func:`on_event`; None when there
    was no event.

    ``replace``: a connection that was up closed. The flavour must then close ``socket`` and this
    monitor and open new ones (see _dealer._connect): ZeroMQ would send what it still queues for
    the closed connection over its next one. Events after that one are the old socket's, and are
    left with it.
    """
    outcomes: list[Outcome] = []
    seen = False
    while True:
        # Asked before every send: most times there is nothing, and a recv that raises
        # zmq.Again costs 5 % of a busy client's time, ZMQ_EVENTS a fraction of that.
        if not _frames.readable(monitor):
            return Drained(outcomes, False) if seen else None
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return Drained(outcomes, False) if seen else None
        seen = True
        ended, replace = on_event(frames, core, link, endpoint, watch, socket)
        outcomes += ended
        if replace:
            return Drained(outcomes, True)


def on_event(frames: list[bytes], core: ClientCore, link: int, endpoint: str, watch: HandshakeWatch | None,
             socket: zmq.Socket) -> Drained:
    """Feed one message of the monitor of ``link`` (the DEALER ``socket``, connected to
    ``endpoint``) to the client's core and CURVE watch: the calls it ends, and whether ``socket``
    must be replaced (see drain)."""
    event, value, _ = parse_event(frames)  # the endpoint as we connected it, not as libzmq says it
    outcomes = []
    replace = False
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        core.connection_up(link)
    elif event == zmq.EVENT_CONNECTED:
        if connected_to_itself(value):  # no call went over it: it never had a handshake event
            logger.warning("zrpc client: %s", self_connection_warning(endpoint))
            return Drained(outcomes, True)
        core.connected(link)
    elif event == zmq.EVENT_CONNECT_RETRIED:
        outcomes = core.reconnect_scheduled(link)
    elif event == zmq.EVENT_DISCONNECTED:
        replace = core.link_is_up(link)
        if replace:  # what the broker answered before it went is settled, not failed (the
            # asyncio flavour's reader may be waiting on the socket: a plain shadow reads it)
            outcomes = read_replies(zmq.Socket.shadow(socket.underlying), core, link, _READ_LEFT_MAX)
        outcomes += core.connection_closed(link, endpoint)
    if watch is None:
        return Drained(outcomes, replace)
    hint = watch.hint(event, endpoint)
    if hint is not None:
        logger.warning("zrpc client: %s", hint)
    error = watch.on_event(event, value, endpoint)
    if refusal_reason(event, value, watch.curve) is not None and endpoint in watch.refused:  # said once, not at each event
        logger.warning("zrpc client: handshake refused by broker at %s: %s", endpoint, watch.refused[endpoint])
        try:  # stops ZeroMQ retrying the handshake until new calls come (HandshakeWatch.to_retry)
            socket.disconnect(endpoint)
        except zmq.ZMQError:
            pass
    if error is not None:
        outcomes += core.fail_all(error)
    return Drained(outcomes, replace)


def read_replies(socket: zmq.Socket, core: ClientCore, link: int, most: int) -> list[Outcome]:
    """The outcomes of the messages the plain DEALER ``socket`` of ``link`` holds now, at most
    ``most`` of them, read without waiting."""
    outcomes: list[Outcome] = []
    for _ in range(most):
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        outcomes += core.handle_message(frames, link)
    return outcomes
