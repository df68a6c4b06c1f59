"""A service's queue on its own: clients' turns, the look-ahead of a rollout, and what a full
queue pushes out (the engine's tests drive the same through the wire format)."""
from __future__ import annotations

from zrpc._broker._state import Call, CallQueue, CallState


def _call(client: bytes, number: int, enqueued_at: float = 0.0) -> Call:
    return Call(client, number, None, "svc.S", "M", b"", 1000, enqueued_at + 1.0, enqueued_at)


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
