"""The soak run (scripts/soak.py) for about 45 s: workers killed -9 at random, the broker once; its checker."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_soak_under_worker_and_broker_kills_loses_and_duplicates_nothing():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--duration", "45", "--workers", "3",
                          "--clients", "4", "--kill-every", "3", "--seed", "20261125", "--json"],
                         check=False, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    print("soak 45s:", figures)
    assert figures["faults_injected"].get("worker_kill_9", 0) >= 5
    assert figures["faults_injected"].get("broker_kill_9") == 1
    assert figures["lost"] == 0 and figures["duplicated"] == 0 and figures["misrouted"] == 0
    assert figures["OK"] > 0.9 * figures["calls_sent"]
    # I4/I5 from the workers' execution logs: every OK was executed, none twice, none late.
    assert figures["executions"] >= figures["OK"]
    assert figures["executed_twice"] == 0 and figures["executed_late"] == 0 and figures["executed_unknown"] == 0
    assert run.returncode == 0


def test_soak_checker_catches_double_and_late_execution(monkeypatch):
    """The I4/I5 checker itself: it must see what it is there to see."""
    monkeypatch.setattr(sys, "path", [str(REPO / "scripts"), *sys.path])
    monkeypatch.delitem(sys.modules, "soak", raising=False)
    import soak
    say = soak.Attempt("c0-1", 1, 1, "Say", start=10.0, deadline=12.0)
    sleep = soak.Attempt("c0-2", 2, 1, "Sleep", start=10.0, deadline=12.0)
    ok = [{"payload": "c0-1/1", "dispatch": 1, "t": 10.1}, {"payload": "c0-1/1", "dispatch": 2, "t": 10.5},
          {"payload": "c0-2/1", "dispatch": 1, "t": 10.2}]
    assert soak.judge_executions([say, sleep], ok) == {
        "executions": 3, "redispatched_executions": 1, "executed_twice": 0, "executed_late": 0,
        "executed_unknown": 0}
    bad = [{"payload": "c0-1/1", "dispatch": 1, "t": 10.1}, {"payload": "c0-1/1", "dispatch": 1, "t": 10.3},
           {"payload": "c0-2/1", "dispatch": 2, "t": 10.2}, {"payload": "c0-2/1", "dispatch": 1, "t": 12.2},
           {"payload": "c9-9/1", "dispatch": 1, "t": 10.0}]
    figures = soak.judge_executions([say, sleep], bad)
    assert (figures["executed_twice"], figures["executed_late"], figures["executed_unknown"]) == (2, 1, 1)
