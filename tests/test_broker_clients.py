"""ClientConnections (zrpc/_broker/_clients.py): which connection each client sends on, fed the
frontend monitor's events and each message's descriptor, with descriptors reused."""
from __future__ import annotations

from zrpc._broker._clients import ClientConnections


def test_a_closed_connection_names_the_clients_last_seen_on_it():
    connections = ClientConnections()
    connections.accepted(12)
    connections.accepted(13)
    assert connections.sent_on(b"a", 12) and connections.sent_on(b"b", 12) and connections.sent_on(b"c", 13)
    assert sorted(connections.disconnected(12)) == [b"a", b"b"]
    assert connections.fd_of(b"a") is None and connections.fd_of(b"c") == 13
    assert connections.disconnected(12) == [] and len(connections) == 1


def test_a_descriptor_reused_by_a_new_connection_does_not_take_its_clients_with_the_old_one():
    connections = ClientConnections()
    connections.accepted(12)
    assert connections.sent_on(b"old", 12)
    assert connections.disconnected(12) == [b"old"]
    connections.accepted(12)  # a new connection on the same descriptor
    assert connections.sent_on(b"new", 12)
    connections.accepted(14)
    assert connections.sent_on(b"moved", 14)
    assert connections.sent_on(b"moved", 12)  # a client seen on another connection: recorded there
    assert sorted(connections.disconnected(12)) == [b"moved", b"new"]
    assert connections.disconnected(14) == [] and len(connections) == 0


def test_a_client_whose_connection_closed_before_its_message_was_read_is_not_recorded():
    """It sent and went at once: DISCONNECTED was read before its message. Recorded, it would
    stay for ever (no close is coming); instead sent_on says so and its calls end at once."""
    connections = ClientConnections()
    connections.accepted(12)
    assert connections.disconnected(12) == []
    assert not connections.sent_on(b"gone", 12)
    assert connections.fd_of(b"gone") is None and len(connections) == 0
    assert not connections.sent_on(b"never-accepted", 99)  # no ACCEPTED seen: not an open connection


class _Monitor:
    """The frontend monitor's events, waiting until the loop reads them (drain_side)."""

    def __init__(self, broker, clients: ClientConnections):
        self.waiting: list[tuple[str, int]] = []
        self.reads = 0

        def drain_side(side: str) -> bool:
            self.reads += 1
            for event, fd in self.waiting:
                if event == "accepted":
                    clients.accepted(fd)
                else:
                    for client in clients.disconnected(fd):
                        broker.engine.client_disconnected(client, 0.0)
            self.waiting.clear()
            return True

        broker.connections.drain_side = drain_side


def _broker_and_clients():
    from zrpc import Broker, BrokerConfig

    broker = Broker(BrokerConfig(frontend="tcp://127.0.0.1:1", backend="tcp://127.0.0.1:2"))  # never bound
    clients = ClientConnections()
    return broker, clients, _Monitor(broker, clients)


def test_a_client_that_names_itself_and_reconnects_on_the_same_descriptor_keeps_its_new_calls():
    """Review: a peer with its own routing id closed its connection and opened another, which
    the kernel gave the same (lowest free) descriptor. Its next message matched the recorded
    descriptor, so the monitor was not read first; the old connection's close, read later,
    then cancelled the call sent on the new one. A routing id libzmq did not make is now always
    looked up afresh; one it made (zero byte, counter) is never reused by another connection."""
    broker, clients, monitor = _broker_and_clients()
    monitor.waiting.append(("accepted", 12))
    assert not broker._from_closed_connection(clients, b"A", 12, 0.0)
    assert monitor.reads == 1 and clients.fd_of(b"A") == 12
    monitor.waiting += [("disconnected", 12), ("accepted", 12)]  # closed, and a new connection on 12
    assert not broker._from_closed_connection(clients, b"A", 12, 0.0)  # its new connection's message
    assert monitor.reads == 2
    assert broker.engine.counters["client_disconnected"] == 0  # it held no call: nothing to end
    assert clients.disconnected(12) == [b"A"]  # recorded on the new connection, which this closes
    made = b"\x00\x12\x34\x56\x78"  # libzmq's: looked up once, then trusted on the same descriptor
    monitor.waiting.append(("accepted", 13))
    assert not broker._from_closed_connection(clients, made, 13, 0.0)
    assert not broker._from_closed_connection(clients, made, 13, 0.0)
    assert monitor.reads == 3


def test_a_message_read_after_its_connection_closed_is_dropped_unread():
    """Review: it was handled (its call dispatched to a free worker: REQUEST, then CANCEL), and
    a handler could start for nobody."""
    broker, clients, monitor = _broker_and_clients()
    monitor.waiting += [("accepted", 12), ("disconnected", 12)]  # it sent, and went, before we read
    assert broker._from_closed_connection(clients, b"\x00\x00\x00\x00\x07", 12, 0.0)
    assert broker.engine.counters["from_closed_connections"] == 1
    assert len(clients) == 0
