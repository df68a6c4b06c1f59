"""scripts/bench.py still runs end to end: a short run of zrpc and the C proxy, read as JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_bench_measures_zrpc_and_the_c_proxy():
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--duration", "0.3", "--concurrency", "2",
         "--systems", "a,ap,b,c", "--rounds", "2", "--json",
         "--queued", "1000"],  # the extras run too, at a size that keeps this test quick
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    rows = {row["system"]: row for row in report["rows"]}
    # (c)'s peer answers in batches (§4c), and takes them; (ap) is (a) with busy_poll on
    assert set(rows) == {"a", "ap", "b", "c"}
    for row in rows.values():
        assert row["concurrency"] == 2
        assert row["calls_per_s"] > 0, row
        assert row["errors"] == {}, row
    assert rows["a"]["vs_b"]["calls_per_s"] > 0
    # The CPU-bound ceiling: every process's CPU per call, summed, against the machine's cores.
    for row in rows.values():
        spent = sum(row["cpu_us_per_call"].values())
        assert row["cpu_us_per_call_total"] == pytest.approx(spent, rel=0.01)
        assert row["cores"] == report["machine"]["cpus_usable"]
        assert row["cpu_bound_calls_per_s"] == pytest.approx(row["cores"] * 1e6 / row["cpu_us_per_call_total"], abs=1)
        assert 0 < row["cores_busy_percent"]
        assert row["vs_b"]["cpu_bound"] > 0
        assert set(row["run_queue_wait_us_per_call"]) <= {"broker", "worker", "proxy", "peer"}
    # Two alternating rounds: the row keeps both, and its ratio is their median (the mean of two).
    rounds = [r["vs_b"]["calls_per_s"] for r in rows["a"]["rounds"]]
    assert len(rounds) == 2 and len(rows["b"]["rounds"]) == 2
    assert rows["a"]["vs_b"]["calls_per_s"] == pytest.approx(sum(rounds) / 2, abs=0.01)
    assert report["rounds"] == 2
    assert report["machine"]["cpu_count"] >= 1
    assert report["queued_rss"]["queue_depth_seen"] == 999  # one of the 1000 is at the stuck worker
    assert all(row["calls_per_s"] > 0 for row in report["large_payload_rows"])


def test_bench_engine_drives_the_engine_and_counts_every_answer():
    """scripts/bench_engine.py: the engine alone; it checks that every call of a round was
    dispatched and answered, so a short run that prints a figure served them all."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_engine.py"), "--rounds", "20", "--runs", "2",
         "--in-flight", "12", "--per-message", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.startswith("broker engine: ")
    assert "12 calls in flight, 5 per client message" in completed.stdout
