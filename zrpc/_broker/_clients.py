"""Which connection each client routing id sends on, so that a closed connection ends its calls.

A client killed with kill -9 (or whose host vanished) sends no CANCEL: its calls, queued or at
workers, used to run to their deadlines for nobody, non-idempotent side effects included (a
new-user tester's five queued 1 s calls ran one after another at a worker after their client
had died). libzmq does not say which routing id a closed connection carried (ZMQ_ROUTER_NOTIFY
is a draft option, absent from released builds), but the frontend's socket monitor reports each
connection's ACCEPTED and DISCONNECTED with its file descriptor, in order, and every message
carries the descriptor it came on (ZMQ_SRCFD, 0.13 us to read). A descriptor is reused once
closed, so each is counted by how often it was accepted: a client is taken to have gone only
when the connection it last sent on, that same acceptance of the descriptor, closes.

Order makes that sound. libzmq reports DISCONNECTED before it closes the descriptor, so before a
later connection can be given it, and reports ACCEPTED before that connection's handshake, so
before its first message. The broker reads all waiting monitor events before it records a
client's connection (``ConnectionLimits.drain_side``), and reads them before each message of a
peer that named itself (it may reconnect under its name on the same descriptor): the record
then carries the acceptance its message came on, never an earlier one. It may carry a later
one: a client that sent and went, whose descriptor a new connection took before its message
was read, is recorded on that connection, and its calls end when that one closes.
"""
from __future__ import annotations


class ClientConnections:
    """Client routing id -> (descriptor, acceptance) of the connection it last sent on; no I/O."""

    __slots__ = ("_accepts", "_open", "_by_client", "_by_fd")

    def __init__(self) -> None:
        self._accepts: dict[int, int] = {}  # descriptor -> how many times a connection was accepted on it
        self._open: set[int] = set()  # descriptors whose last acceptance has not closed
        self._by_client: dict[bytes, tuple[int, int]] = {}
        self._by_fd: dict[int, set[bytes]] = {}

    def fd_of(self, client: bytes) -> int | None:
        """The descriptor ``client`` last sent on (None when unknown): the loop's per-message check."""
        known = self._by_client.get(client)
        return None if known is None else known[0]

    def accepted(self, fd: int) -> None:
        self._accepts[fd] = self._accepts.get(fd, 0) + 1
        self._open.add(fd)

    def sent_on(self, client: bytes, fd: int) -> bool:
        """``client`` sent on ``fd``: the monitor's events up to its connection were read first.
        False when that connection has closed already (a client that sent and went at once):
        the client is not recorded, and the caller ends its calls itself."""
        self.forget(client)
        if fd not in self._open:
            return False
        self._by_client[client] = (fd, self._accepts.get(fd, 0))
        self._by_fd.setdefault(fd, set()).add(client)
        return True

    def disconnected(self, fd: int) -> list[bytes]:
        """The connection on ``fd`` closed: the clients that last sent on it, forgotten."""
        self._open.discard(fd)
        clients = self._by_fd.pop(fd, ())
        current = (fd, self._accepts.get(fd, 0))
        gone = [client for client in clients if self._by_client.get(client) == current]
        for client in gone:
            del self._by_client[client]
        return gone

    def forget(self, client: bytes) -> None:
        known = self._by_client.pop(client, None)
        if known is not None:
            clients = self._by_fd.get(known[0])
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self._by_fd[known[0]]

    def __len__(self) -> int:
        return len(self._by_client)
