"""The broker's deadline structure (zrpc/_broker/_deadlines.py): earliest first, whatever the order
calls arrive in; answered calls skipped and compacted away."""
from __future__ import annotations

import random

from zrpc._broker._deadlines import Deadlines
from zrpc._broker._state import Call, CallState


def call(deadline: float) -> Call:
    return Call(b"c", 1, None, "svc.S", "M", b"", 1000, deadline, 0.0)


def test_calls_come_out_earliest_first_in_any_arrival_order():
    rng = random.Random(7)
    deadlines = Deadlines()
    calls = [call(rng.choice([10.0, 30.0]) + i * 0.001 * rng.choice([1, -1])) for i in range(500)]
    for c in calls:
        deadlines.add(c)
    assert deadlines.earliest() == min(c.deadline for c in calls)
    out = []
    while (c := deadlines.pop_due(100.0)) is not None:
        out.append(c.deadline)
    assert out == sorted(c.deadline for c in calls)
    assert deadlines.earliest() == float("inf")


def test_only_calls_due_come_out_and_answered_ones_never():
    deadlines = Deadlines()
    early, answered, late = call(1.0), call(2.0), call(3.0)
    for c in (early, answered, late):
        deadlines.add(c)
    answered.state = CallState.DONE
    assert deadlines.pop_due(0.5) is None
    assert deadlines.pop_due(2.5) is early
    assert deadlines.pop_due(2.5) is None  # the answered one is skipped, the late one not due
    assert deadlines.earliest() == 3.0
    assert deadlines.pop_due(3.0) is late


def test_compact_drops_every_answered_call_behind_a_live_one():
    deadlines = Deadlines()
    held = call(1.0)
    deadlines.add(held)
    later = [call(2.0 + i) for i in range(100)]
    for c in later:
        deadlines.add(c)
        c.state = CallState.DONE
    deadlines.add(call(0.5))  # earlier than the last one added: kept apart, still ordered
    assert len(deadlines) == 102 and deadlines.earliest() == 0.5
    deadlines.compact()
    assert len(deadlines) == 2
    assert [deadlines.pop_due(10.0).deadline, deadlines.pop_due(10.0).deadline] == [0.5, 1.0]
