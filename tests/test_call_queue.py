"""A service's queue on its own: clients' turns, the look-ahead of a rollout, and what a full
queue pushes out (the engine's tests drive the same through the wire format)."""
from __future__ import annotations

import collections

from zrpc._broker._state import Call, CallQueue, CallState, _ClientCalls


def _call(client: bytes, number: int, enqueued_at: float = 0.0) -> Call:
    return Call(client, number, None, "svc.S", "M", b"", 1000, enqueued_at + 1.0, enqueued_at, tenant=client)


def _queue(*spec: tuple[bytes, int]) -> tuple[CallQueue, dict]:
    """A queue of these (client, number) calls, appended in order; the calls by (client, number)."""
    queue, calls = CallQueue(), {}
    for client, number in spec:
        call = calls[client, number] = _call(client, number)
        queue.append(call)
    return queue, calls


def _answer(queue: CallQueue, call: Call) -> None:
    call.state = CallState.DONE
    queue.discard(call)


def test_the_look_ahead_follows_the_turns_and_takes_from_the_middle():
    queue, calls = _queue((b"a", 1), (b"a", 2), (b"a", 3), (b"b", 1), (b"c", 1), (b"c", 2))
    assert queue.head() is calls[b"a", 1]
    behind = list(queue.behind_head(64))
    assert [(c.client, c.client_request_id) for _, c in behind] == [
        (b"b", 1), (b"c", 1), (b"a", 2), (b"c", 2), (b"a", 3)]
    assert [c.client for _, c in queue.behind_head(2)] == [b"b", b"c"]  # bounded
    position = next(position for position, call in queue.behind_head(64) if call is calls[b"c", 1])
    assert queue.take(position) is calls[b"c", 1]
    assert len(queue) == 5
    taken = [queue.popleft() for _ in range(5)]
    assert [(c.client, c.client_request_id) for c in taken] == [
        (b"a", 1), (b"b", 1), (b"c", 2), (b"a", 2), (b"a", 3)]
    assert not queue and queue.head() is None


def test_answered_calls_are_counted_out_and_skipped_in_turn():
    queue, calls = _queue((b"a", 1), (b"a", 2), (b"b", 1))
    _answer(queue, calls[b"a", 1])
    _answer(queue, calls[b"b", 1])
    assert len(queue) == 1 and list(queue) == [calls[b"a", 2]]
    assert queue.popleft() is calls[b"a", 2]
    assert not queue and queue.head() is None


def test_a_full_queue_finds_the_biggest_holder_again_once_its_calls_went():
    """The holder remembered as biggest cancels all its calls: the next push-out looks again
    instead of refusing because that one holds nothing now."""
    queue, calls = _queue(*[(b"a", n) for n in range(6)], *[(b"b", n) for n in range(3)])
    for n in range(6):
        _answer(queue, calls[b"a", n])
    assert queue.push_out(b"c") is calls[b"b", 2]
    assert queue.push_out(b"c") is calls[b"b", 1]
    assert queue.push_out(b"c") is None  # b holds 1, c none: within one of each other
    assert queue.push_out(b"b") is None  # the biggest holder never pushes its own out
    assert len(queue) == 1


def test_taking_the_calls_that_waited_too_long_spans_every_client():
    queue = CallQueue()
    order = [(b"a", 1, 0.0), (b"b", 1, 0.1), (b"a", 2, 0.5), (b"c", 1, 0.2), (b"b", 2, 0.9)]
    for client, number, at in order:
        queue.append(_call(client, number, at))
    queue.popleft()  # a's first: b's turn, then c's, then a's
    taken = queue.take_enqueued_by(0.5)
    assert [(c.client, c.client_request_id) for c in taken] == [(b"b", 1), (b"c", 1), (b"a", 2)]
    assert len(queue) == 1 and [c.client_request_id for c in queue] == [2]
    assert queue.popleft().client == b"b"


def test_a_full_queue_sheds_the_biggest_holders_in_turn_when_they_tie():
    """Review: the holder remembered as biggest stayed so on a tie, and every push-out hit it:
    A went from 5 to 1 calls while B kept 5. Ties now alternate, and the counts meet."""
    queue, _ = _queue(*[(b"A", n) for n in range(5)], *[(b"B", n) for n in range(5)])
    shed = []
    for newcomer in (b"C", b"D", b"E", b"F"):
        shed.append(queue.push_out(newcomer).client)
        queue.append(_call(newcomer, 0))
    assert shed == [b"A", b"B", b"A", b"B"]
    counts = collections.Counter(call.client for call in queue)
    assert (counts[b"A"], counts[b"B"]) == (3, 3)


def test_a_push_out_looks_at_no_other_client_once_the_holders_are_counted(monkeypatch):
    """Review: with thousands of connections holding a call or two each, every push-out
    scanned every client (371 us per arriving call at 4,000). Counted once, then kept."""
    queue, _ = _queue(*[(b"c%d" % n, k) for n in range(1000) for k in range(2)])
    looked = collections.Counter()
    original = _ClientCalls.waiting

    def waiting(self):
        looked["waiting"] += 1
        return original(self)

    monkeypatch.setattr(_ClientCalls, "waiting", waiting)
    assert queue.push_out(b"new0") is not None  # counts the holders: one look at each
    first = looked["waiting"]
    assert first >= 1000
    for n in range(1, 500):
        assert queue.push_out(b"new%d" % n) is not None
        queue.append(_call(b"new%d" % n, 0))
    assert looked["waiting"] - first <= 5 * 499


def test_the_biggest_holder_is_found_after_its_calls_went_one_by_one():
    queue, calls = _queue(*[(b"A", n) for n in range(3)], *[(b"B", n) for n in range(5)], (b"Z", 0), (b"Z", 1))
    assert queue.push_out(b"X").client == b"B"  # counted: B 5 -> 4
    for n in range(3):
        _answer(queue, calls[b"A", n])
    assert queue.push_out(b"Z").client == b"B"  # Z holds 2, B 3
    assert queue.push_out(b"Z") is None  # B 2 now


def _entries(queue: CallQueue) -> int:
    """Calls the queue still references, answered ones included (their payloads with them)."""
    return sum(len(waiting.calls) for waiting in queue._turns)


def test_calls_answered_while_waiting_do_not_stay_referenced_per_client():
    """An adversarial tester: each connection queued 64 calls behind a busy worker, then
    cancelled them or closed. Counted per client, every connection's 64 stayed (6.4 GB for
    100 connections of 1 MiB calls). A line none of whose calls waits is let go at once, and
    answered entries across the queue never outnumber the waiting calls past 64."""
    queue, calls = _queue((b"head", 0), *[(b"c%d" % n, k) for n in range(100) for k in range(64)])
    for n in range(100):
        for k in range(64):
            _answer(queue, calls[b"c%d" % n, k])
    assert len(queue) == 1 and _entries(queue) == 1
    assert len(queue._turns) <= 1 + 65  # the emptied lines' records go in bulk, too

    queue, calls = _queue(*[(b"c%d" % n, k) for n in range(100) for k in range(65)])
    for n in range(100):
        for k in range(64):  # one call of each client still waits
            _answer(queue, calls[b"c%d" % n, k + 1])
    assert len(queue) == 100 and _entries(queue) <= 100 + 100
