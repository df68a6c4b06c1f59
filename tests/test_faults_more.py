"""More faults with real processes: a stopped worker, a hung worker, overload, client churn,
peers that do not read or that flood, a reused routing id, and a network partition (issue 3).

Each scenario records what every call got (RawClient keeps duplicates too) and prints its
figures: calls, OK, errors by code, lost, duplicated, faults injected.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

import zrpc
from zrpc import StatusCode
from zrpc import _protocol as p
from workers.echo import echo_pb2

from .conftest import wait_for, zrpc_cli
from .test_faults import HEARTBEAT, RawClient, list_services, start_worker

LIVENESS = 3


class Peer(RawClient):
    """A RawClient whose DEALER may carry a chosen routing id or a small receive high-water mark."""

    def __init__(self, endpoint: str, routing_id: bytes | None = None, rcvhwm: int | None = None):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        if rcvhwm is not None:
            self.socket.rcvhwm = rcvhwm
        self.socket.connect(endpoint)
        self.sent = {}
        self.replies = collections.defaultdict(list)


def figures(name: str, raw: RawClient, faults: int = 0, **extra) -> dict:
    """Print and return one scenario's figures; lost and duplicated are judged by the caller."""
    codes = collections.Counter(StatusCode(r[0][0].code).name for i, r in raw.replies.items() if r and i in raw.sent)
    result = {
        "calls": len(raw.sent), "OK": codes.pop("OK", 0), "errors": dict(codes),
        "lost": sum(1 for i in raw.sent if not raw.replies.get(i)),
        "duplicated": sum(len(r) - 1 for r in raw.replies.values() if len(r) > 1),
        "faults": faults, **extra,
    }
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result.items()))
    return result


def say(raw: RawClient, request_id: int, sleep_ms: int = 0, deadline_ms: int = 10_000, payload: bytes | None = None,
        **metadata: str) -> None:
    body = echo_pb2.EchoRequest(payload=payload if payload is not None else b"%d" % request_id).SerializeToString()
    raw.send(request_id, "echo.Echo", "Say", body, deadline_ms=deadline_ms, idempotent=True,
             metadata={"sleep_ms": str(sleep_ms), **metadata})


def served_by(raw: RawClient, request_id: int) -> int:
    header, payload, _ = raw.replies[request_id][0]
    assert header.code == StatusCode.OK, header
    return int(echo_pb2.EchoReply.FromString(payload).payload.split(b":")[0])


@pytest.fixture
def thread_broker(endpoints):
    """Start an in-process Broker (its engine's tables can be read); stopped at the end."""
    started = []

    def start(**settings) -> zrpc.Broker:
        frontend, backend = endpoints
        settings.setdefault("unknown_service_grace", 0.0)
        settings.setdefault("heartbeat_liveness", LIVENESS)
        broker = zrpc.Broker(zrpc.BrokerConfig(frontend=frontend, backend=backend, **settings)).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def wait_workers(broker: zrpc.Broker, count: int, timeout: float = 15.0) -> None:
    wait_for(lambda: len(broker.engine.workers) == count, timeout, message=f"{count} registered workers")


def in_flight_total(frontend: str, service: str = "echo.Echo") -> int:
    return sum(w.in_flight for w in list_services(frontend)[service].workers)


# --------------------------------------------------------------------------- 1. SIGSTOP


def test_sigstopped_worker_expires_its_calls_move_and_after_sigcont_it_re_registers(thread_broker, spawn):
    broker = thread_broker()
    frontend, backend = broker.frontend_endpoint, broker.backend_endpoint
    # A long worker-side liveness: on SIGCONT it has not given up on the broker, so it sends its
    # late replies on the old connection and the broker must refuse them and tell it to re-register.
    victim = start_worker(spawn, backend, "--concurrency", "8", "--liveness", "20")
    survivor = start_worker(spawn, backend, "--concurrency", "8")
    wait_workers(broker, 2)
    raw = RawClient(frontend)
    try:
        for i in range(1, 9):
            say(raw, i, sleep_ms=1500)
        for i in range(9, 17):
            raw.send(i, "echo.Echo", "Sleep", echo_pb2.SleepRequest(ms=1500, payload=b"%d" % i).SerializeToString(),
                     deadline_ms=10_000)
        wait_for(lambda: in_flight_total(frontend) == 16, 10, message="16 calls running")
        victim.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_for(lambda: broker.engine.counters["workers_expired"] >= 1, 5, message="the stopped worker expired")
            expired_after = time.monotonic() - stopped_at
            raw.collect(until_all_answered=10, quiet=0)
            answered = {i: r[0] for i, r in raw.replies.items()}
            assert set(answered) == set(raw.sent)
        finally:
            victim.signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        joined_before = broker.engine.counters["workers_joined"]
        # Its first message after SIGCONT is answered DISCONNECT (unknown worker); it sends READY.
        wait_for(lambda: broker.engine.counters["workers_joined"] > joined_before and len(broker.engine.workers) == 2,
                 10, message="the resumed worker registered again")
        rejoined_after = time.monotonic() - resumed_at
        raw.collect(until_all_answered=0, quiet=2.0)  # its late replies (1.5 s handlers) must not get through
        counters = dict(broker.engine.counters)
        # Afterwards it serves again: 16 slow calls need both workers' 8 slots.
        for i in range(101, 117):
            say(raw, i, sleep_ms=300)
        raw.collect(until_all_answered=10, quiet=0.2)
    finally:
        raw.close()
    result = figures("SIGSTOP", raw, faults=1, expired_after_s=round(expired_after, 3),
                     rejoined_after_s=round(rejoined_after, 3), unknown_worker=counters.get("unknown_worker", 0),
                     redispatched=counters.get("redispatched", 0))
    assert result["lost"] == 0 and result["duplicated"] == 0
    budget = LIVENESS * float(HEARTBEAT)
    # Silence counts from its last message, up to one interval before SIGSTOP.
    assert budget - float(HEARTBEAT) - 0.05 <= expired_after < budget + 1.0
    assert counters.get("unknown_worker", 0) >= 1
    assert [answered[i][0].code for i in range(1, 9)] == [StatusCode.OK] * 8
    assert {served_by(raw, i) for i in range(1, 9)} == {survivor.pid}  # re-dispatched there
    sleeps = collections.Counter(answered[i][0].code for i in range(9, 17))
    assert set(sleeps) <= {StatusCode.OK, StatusCode.UNAVAILABLE} and sleeps[StatusCode.UNAVAILABLE] >= 1
    for i in range(9, 17):
        header, _, at = answered[i]
        if header.code == StatusCode.UNAVAILABLE:
            assert "in flight" in header.message and at - stopped_at < budget + 1.0
    assert {served_by(raw, i) for i in range(101, 117)} == {victim.pid, survivor.pid}


# --------------------------------------------------------------------------- 2. hung handler


def test_hung_worker_calls_time_out_on_time_get_cancelled_and_it_gets_no_more_work(thread_broker, spawn, ipc_dir):
    broker = thread_broker()
    frontend, backend = broker.frontend_endpoint, broker.backend_endpoint
    hung = spawn(*zrpc_cli("worker", "run", "tests._services:HangingEcho", "--broker", backend,
                           "--heartbeat-interval", HEARTBEAT, "--concurrency", "2", "--drain-grace", "0"))
    hung.wait_line("zrpc worker ready")
    wait_workers(broker, 1)
    raw = RawClient(frontend)
    markers = [os.path.join(ipc_dir, f"cancelled-{i}") for i in (1, 2)]
    try:
        for i in (1, 2):
            say(raw, i, deadline_ms=400, cancel_marker=markers[i - 1])
        raw.collect(until_all_answered=5, quiet=0)
        late_ms = [round((raw.replies[i][0][2] - raw.sent[i]) * 1000, 1) for i in (1, 2)]
        wait_for(lambda: all(os.path.exists(m) for m in markers), 5, message="the hung handlers saw CANCEL")
        assert in_flight_total(frontend) == 2, "a cancelled call keeps its slot until the worker replies"
        healthy = start_worker(spawn, backend, "--concurrency", "4")
        wait_workers(broker, 2)
        for i in range(3, 13):
            say(raw, i, deadline_ms=5_000)
        raw.collect(until_all_answered=10, quiet=0.2)
        slots = {w.name.split(":")[1]: w.in_flight for w in list_services(frontend)["echo.Echo"].workers}
    finally:
        raw.close()
        hung.signal(signal.SIGKILL)  # its handlers would hang on: stop it by its PID, now
    result = figures("hung worker", raw, faults=1, answered_after_deadline_ms=late_ms)
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert [raw.replies[i][0][0].code for i in (1, 2)] == [StatusCode.DEADLINE_EXCEEDED] * 2
    assert all(-50 <= late <= 100 for late in late_ms), f"answered {late_ms} ms after the deadline"
    assert {served_by(raw, i) for i in range(3, 13)} == {healthy.pid}
    assert slots[str(hung.pid)] == 2


# --------------------------------------------------------------------------- 6. routing id reuse


def test_second_connection_reusing_a_routing_id_does_not_take_over_the_first_ones_calls(thread_broker, spawn):
    broker = thread_broker()
    frontend, backend = broker.frontend_endpoint, broker.backend_endpoint
    worker = start_worker(spawn, backend, "--concurrency", "8")
    wait_workers(broker, 1)
    first = Peer(frontend, routing_id=b"same-id")
    second = Peer(frontend, routing_id=b"same-id")
    try:
        say(first, 1, sleep_ms=300, payload=b"first")
        wait_for(lambda: broker.engine.calls_held == 1, 5, message="the first call held")
        # The impostor reuses the id and even the request id; it also asks for more.
        say(second, 1, sleep_ms=0, payload=b"second")
        say(second, 2, sleep_ms=0, payload=b"second")
        first.collect(until_all_answered=5, quiet=0.5)
        second.collect(until_all_answered=1, quiet=0)
        still_first = Peer(frontend)  # a fresh client is served as usual
        say(still_first, 5)
        still_first.collect(until_all_answered=5, quiet=0)
        still_first.close()
    finally:
        first.close()
        second.close()
    result = figures("routing id reuse", first, faults=1, impostor_replies=sum(map(len, second.replies.values())))
    assert result["lost"] == 0 and result["duplicated"] == 0
    header, payload, _ = first.replies[1][0]
    assert header.code == StatusCode.OK and echo_pb2.EchoReply.FromString(payload).payload == b"%d:first" % worker.pid
    assert sum(map(len, second.replies.values())) == 0 or all(
        echo_pb2.EchoReply.FromString(r[1]).payload.endswith(b"second") for rs in second.replies.values() for r in rs)
    assert still_first.replies[5][0][0].code == StatusCode.OK
