"""A connection flood past the broker's file-descriptor limit (issue 3, fault 11), real processes.

A `zrpc broker start` process runs under a low descriptor limit with a low max_connections; an
echo worker and a client connect before the flood; then a flooder process opens more plain TCP
connections to the frontend than the broker may hold descriptors, and holds them. Without the
cap libzmq accepted until EMFILE and then spun retrying accept (measured: 100% of a core, 3.5x
fewer calls, no new peer could connect). Prints its figures: calls and broker CPU in a quiet
window and in a flood window of the same length, descriptor counts, refusals.
"""
from __future__ import annotations

import os
import re
import sys
import time

import zrpc
from workers.echo import echo_pb2

from .conftest import wait_for, zrpc_cli
from .test_metrics import scrape, value

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
FD_LIMIT = 1024  # the broker's, soft and hard: it cannot raise it
CAP = 32  # max_connections: fits, 2 x 32 + 512 <= 1024
FLOOD = 1200  # connections the flooder opens and holds: more than FD_LIMIT
WINDOW = 2.0  # seconds of calls measured without, then with, the flood
CALL_TIMEOUT = 2.0
_TICK = os.sysconf("SC_CLK_TCK")
# Runs argv[2:] with RLIMIT_NOFILE set to argv[1] (soft and hard), in the same process (exec).
_WITH_FD_LIMIT = ("import os, resource, sys; n = int(sys.argv[1]); "
                  "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
                  "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def calls_for(say, pid: int, seconds: float) -> dict:
    """Call Say back to back for ``seconds`` (each call bounded, each reply checked)."""
    cpu_before = cpu_seconds(pid)
    end = time.monotonic() + seconds
    calls, slowest, most_fds = 0, 0.0, 0
    while time.monotonic() < end:
        calls += 1
        payload = b"call %d" % calls
        started = time.monotonic()
        assert say(echo_pb2.EchoRequest(payload=payload), timeout=CALL_TIMEOUT).payload == payload
        slowest = max(slowest, time.monotonic() - started)
        most_fds = max(most_fds, fd_count(pid))
    return {"calls_ok": calls, "slowest_ms": round(slowest * 1000, 1), "most_fds": most_fds,
            "broker_cpu_s": round(cpu_seconds(pid) - cpu_before, 2)}


def _refused_past(metrics: str, floor: int) -> float:
    refused = value(scrape(metrics), "zrpc_broker_connections_refused_total", side="frontend")
    return refused if refused > floor else 0.0


def answers(say) -> bool:
    try:
        return say(echo_pb2.EchoRequest(payload=b"ping"), timeout=0.5).payload == b"ping"
    except zrpc.Error:
        return False


def test_a_flood_past_the_fd_limit_is_capped_and_the_broker_recovers(spawn):
    broker = spawn(sys.executable, "-c", _WITH_FD_LIMIT, str(FD_LIMIT), *zrpc_cli(
        "broker", "start", "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://127.0.0.1:0",
        "--unknown-service-grace", "0", "--max-connections", str(CAP), "--metrics-port", "0")[1:])
    ready = broker.wait_line("zrpc broker ready")
    frontend, backend, metrics = re.search(r"frontend=(\S+) backend=(\S+) metrics=(\S+)", ready).groups()
    host, port = frontend[len("tcp://"):].rsplit(":", 1)
    spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend, "--heartbeat-interval", "0.5"))

    with zrpc.Client(frontend, timeout=5.0) as client:
        say = client.stub(ECHO).Say
        wait_for(lambda: answers(say), 15, message="the echo worker to answer")
        baseline_fds = fd_count(broker.pid)
        quiet = calls_for(say, broker.pid, WINDOW)

        # The flood window starts as the flooder does: the refusals' cost is in its CPU figure.
        flooder = spawn(sys.executable, "-m", "tests._flooder", host, port, str(FLOOD))
        flooded = calls_for(say, broker.pid, WINDOW)  # the client connected before keeps working
        reached = int(flooder.wait_line("opened").split()[-1])
        assert broker.popen.poll() is None
        # More connections reached the broker than it has descriptors; /metrics still accepts.
        refused = wait_for(lambda: _refused_past(metrics, FD_LIMIT - CAP), 10,
                           message=f"more than {FD_LIMIT - CAP} refusals")
        during = scrape(metrics)
        assert value(during, "zrpc_broker_connections", side="frontend") <= CAP
        assert value(during, "zrpc_broker_fds_exhausted_total") == 0
        assert flooded["most_fds"] < FD_LIMIT
        wait_for(lambda: any("refusing new ones" in line for line in broker.errors), 5,
                 message="the broker to log the refusals")

        flooder.stop()  # the flood ends: its connections close
        wait_for(lambda: fd_count(broker.pid) <= baseline_fds + 2, 10,
                 message=f"the broker's descriptors back near {baseline_fds}")
        after_fds = fd_count(broker.pid)
        with zrpc.Client(frontend, timeout=5.0) as newcomer:  # a brand-new connection gets in
            assert newcomer.stub(ECHO).Say(echo_pb2.EchoRequest(payload=b"new"), timeout=5.0).payload == b"new"
        assert answers(say)
    assert value(scrape(metrics), "zrpc_broker_fds_exhausted_total") == 0
    print(f"connection flood: {FLOOD} connections held against fd limit {FD_LIMIT}, max_connections {CAP}; "
          f"{WINDOW:g} s quiet: {quiet}; {WINDOW:g} s flooded: {flooded}; fds baseline {baseline_fds}, "
          f"after {after_fds}; {reached} reached the broker, {refused:.0f} refused")
