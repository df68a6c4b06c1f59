"""The soak run (scripts/soak.py) for about 45 s: workers killed -9 at random, the broker once."""
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
    assert run.returncode == 0
