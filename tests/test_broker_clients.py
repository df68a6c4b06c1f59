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
