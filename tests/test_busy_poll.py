"""busy_poll: after a message the broker and the worker poll without sleeping for a while, then
sleep again; timers keep working meanwhile; the CLI flags reach them."""
from __future__ import annotations

import os
import threading
import time

import pytest

import zrpc
from workers.echo import Echo, echo_pb2
from zrpc import Broker, BrokerConfig, Worker
from zrpc._broker._poller import SocketPoller
from zrpc._worker import _runtime

from ._services import HangingEcho
from .conftest import wait_for, wait_until_served, zrpc_cli

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
HELLO = echo_pb2.EchoRequest(payload=b"hello")


@pytest.fixture
def recorded_polls(monkeypatch):
    """The timeout of every wait of the broker's loop thread, with when it began."""
    timeouts: list[tuple[float, int]] = []
    poll = SocketPoller.poll

    def recording(self, timeout_ms):
        if threading.current_thread().name == "zrpc-broker":
            timeouts.append((time.monotonic(), timeout_ms))
        return poll(self, timeout_ms)

    monkeypatch.setattr(SocketPoller, "poll", recording)
    return timeouts


def _broker(endpoints, busy_poll: float) -> Broker:
    frontend, backend = endpoints
    return Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0,
                               busy_poll=busy_poll, log_level="WARNING")).start()


def _longest_polling_run(polls: list[tuple[float, int]]) -> float:
    """Seconds from the first to the last poll of the longest run of zero-timeout polls."""
    longest, run_start = 0.0, None
    for at, timeout in polls:
        if timeout == 0:
            run_start = at if run_start is None else run_start
            longest = max(longest, at - run_start)
        else:
            run_start = None
    return longest


def test_the_broker_polls_without_sleeping_after_a_message_then_sleeps_again(endpoints, recorded_polls):
    window = 0.3
    broker = _broker(endpoints, window)
    try:
        # A long heartbeat: fewer messages that are not calls (they do not open the window).
        with Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=30.0), \
                zrpc.Client(broker.frontend_endpoint, timeout=10.0) as client:
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
            wait_for(lambda: recorded_polls and recorded_polls[-1][1] > 0, message="the broker to sleep in poll")
            called_at = time.monotonic()
            assert client.stub(ECHO).Say(HELLO).payload == b"hello"
            # Back to sleeping (a poll with a timeout) once the window after the last message closes.
            wait_for(lambda: any(t > 0 and at > called_at + window for at, t in list(recorded_polls)),
                     timeout=10.0, message="the broker to sleep again")
            after = [(at, t) for at, t in list(recorded_polls) if at >= called_at]
            assert sum(1 for _, t in after if t == 0) >= 10  # it looked, again and again
            assert _longest_polling_run(after) >= window * 0.8  # for the window, not a turn or two
    finally:
        broker.stop()


def test_heartbeats_alone_do_not_keep_the_broker_polling(endpoints, recorded_polls):
    broker = _broker(endpoints, 1.0)  # a window longer than the heartbeat interval
    try:
        with Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=0.05):
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
            # Twenty heartbeats each way with no call: the broker sleeps between them.
            settled_at = time.monotonic() + 1.0  # the window the registration call opened
            wait_for(lambda: any(at > settled_at + 1.0 for at, _ in list(recorded_polls)), timeout=10.0,
                     message="a second of heartbeats")
            idle = [(at, t) for at, t in list(recorded_polls) if at > settled_at]
            assert _longest_polling_run(idle) < 0.05
    finally:
        broker.stop()


def test_without_busy_poll_the_broker_sleeps_in_every_poll(endpoints, recorded_polls):
    broker = _broker(endpoints, 0.0)
    try:
        with Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=30.0), \
                zrpc.Client(broker.frontend_endpoint, timeout=10.0) as client:
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
            called_at = time.monotonic()
            for _ in range(20):
                assert client.stub(ECHO).Say(HELLO).payload == b"hello"
            # Only a timer due at that very moment makes a zero timeout: never one per message.
            zero = [t for at, t in list(recorded_polls) if at >= called_at and t == 0]
            assert len(zero) < 5
    finally:
        broker.stop()


def test_broker_deadlines_expire_while_it_polls(endpoints):
    broker = _broker(endpoints, 1.0)  # the longest window: it polls all the time it is watched
    try:
        with Worker([HangingEcho()], brokers=broker.backend_endpoint, heartbeat_interval=0.1), \
                zrpc.Client(broker.frontend_endpoint, timeout=10.0) as client:
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
            with pytest.raises(zrpc.Error) as caught:
                client.stub(ECHO).Say(HELLO, timeout=0.3, metadata={"hang_s": "2"})
            assert caught.value.code == zrpc.StatusCode.DEADLINE_EXCEEDED
            # The broker's own timer expired it (and told the worker), not only the client's.
            wait_for(lambda: broker.engine.counters["deadline_exceeded"] >= 1, timeout=5.0,
                     message="the broker to expire the call")
    finally:
        broker.stop()


@pytest.fixture
def worker_reads(monkeypatch):
    """How many times workers of this test read their broker links (Worker._receive calls)."""
    reads = [0]
    receive = _runtime.Worker._receive

    def counting_receive(self, link):
        reads[0] += 1
        receive(self, link)

    monkeypatch.setattr(_runtime.Worker, "_receive", counting_receive)
    return reads


def _settled(reads: list[int], look: float):
    def check() -> bool:  # no read for a while: the worker sleeps
        seen = reads[0]
        threading.Event().wait(look)  # a bounded look, not synchronisation
        return reads[0] == seen
    return check


@pytest.mark.parametrize("busy_poll", [0.0, 0.3])
def test_the_worker_reads_every_loop_turn_for_the_window_then_sleeps(endpoints, worker_reads, busy_poll):
    broker = _broker(endpoints, 0.0)
    try:
        with Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=30.0,
                    busy_poll=busy_poll), \
                zrpc.Client(broker.frontend_endpoint, timeout=10.0) as client:
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
            wait_for(_settled(worker_reads, busy_poll + 0.2), timeout=10.0, message="the worker to rest")
            before = worker_reads[0]
            assert client.stub(ECHO).Say(HELLO).payload == b"hello"
            wait_for(_settled(worker_reads, busy_poll + 0.2), timeout=10.0, message="the worker to stop reading")
            if busy_poll:
                assert worker_reads[0] - before >= 20  # a read every loop turn of the window
            else:
                assert worker_reads[0] - before <= 5  # a read when the socket signals, no more
    finally:
        broker.stop()


def test_heartbeats_and_reconnects_do_not_keep_the_worker_polling(endpoints, ipc_dir, worker_reads):
    broker = _broker(endpoints, 0.0)
    try:
        # One link to a broker that heartbeats every 50 ms, one to a broker that is not there
        # (it reconnects at every silence limit). A window of a second would span them all.
        nowhere = f"ipc://{ipc_dir}/nobody"
        with Worker([Echo()], brokers=[broker.backend_endpoint, nowhere], heartbeat_interval=0.05,
                    liveness=2, busy_poll=1.0):
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
            before = worker_reads[0]
            threading.Event().wait(1.0)  # the span observed, not synchronisation
            # About 20 heartbeats arrive in that second; polling would read thousands of times.
            assert worker_reads[0] - before < 200
    finally:
        broker.stop()


@pytest.mark.parametrize("value", [-0.1, 2.0, float("nan"), True, "0.5"])
def test_windows_that_cannot_work_are_refused(value):
    with pytest.raises(ValueError, match="busy_poll"):
        BrokerConfig(busy_poll=value).validate()
    with pytest.raises(ValueError, match="busy_poll"):
        Worker([Echo()], busy_poll=value)


@pytest.mark.parametrize("line, problem", [
    ("busy_poll = true", "busy_poll must be a finite number, not True"),
    ('queue_size = "5"', "queue_size must be a finite number, not '5'"),
    ("queue_size = 5.5", "queue_size must be a whole number, not 5.5"),
    ("unavailable_wait = false", "unavailable_wait must be a finite number, not False"),
    ("drain_grace = nan", "drain_grace must be a finite number, not nan"),
])
def test_a_config_file_value_of_the_wrong_type_names_its_setting(spawn, tmp_path, endpoints, line, problem):
    frontend, backend = endpoints
    config = tmp_path / "broker.toml"
    config.write_text(f"[broker]\n{line}\n")
    process = spawn(*zrpc_cli("broker", "start", "--config", str(config), "--frontend", frontend,
                              "--backend", backend))
    assert process.popen.wait(30) == 2
    wait_for(lambda: any(problem in error for error in process.errors), timeout=5.0,
             message=f"the error {problem!r}")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_cli_flags_reach_broker_and_worker_and_both_rest_when_calls_stop(spawn, endpoints):
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--unknown-service-grace", "0", "--busy-poll", "1"))
    broker.wait_line("zrpc broker ready")
    wait_for(lambda: any("broker bound: " in line and line.endswith(" busy_poll=1s") for line in broker.errors),
             message="the broker's log of its endpoints and busy polling")
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend, "--busy-poll", "1"))
    worker.wait_line("zrpc worker ready")
    wait_until_served(frontend, ECHO.full_name)
    with zrpc.Client(frontend, timeout=10.0) as client:
        for _ in range(20):
            assert client.stub(ECHO).Say(HELLO).payload == b"hello"
        # Within the second after the last call, both poll: each takes a good part of a core.
        used = {process.pid: _cpu_seconds(process.pid) for process in (broker, worker)}
        threading.Event().wait(0.4)  # the span measured, not synchronisation
        for process in (broker, worker):
            assert _cpu_seconds(process.pid) - used[process.pid] >= 0.08, process.args

    def resting(pid: int):
        def check() -> bool:
            used = _cpu_seconds(pid)
            threading.Event().wait(0.5)  # a bounded look, not synchronisation
            return _cpu_seconds(pid) - used < 0.1  # under a fifth of a core: not polling
        return check
    wait_for(resting(broker.pid), timeout=15.0, message="the broker to stop polling")
    wait_for(resting(worker.pid), timeout=15.0, message="the worker to stop polling")


@pytest.mark.parametrize("command", [["broker", "start"], ["worker", "run", "workers.echo:Echo"]])
@pytest.mark.parametrize("flag, value, problem", [
    ("--busy-poll", "2", "--busy-poll"),  # click's range check names the flag
    ("--drain-grace", "nan", "'nan' is not a finite number"),  # click's range check alone let nan pass
])
def test_the_cli_refuses_times_that_cannot_work(spawn, command, flag, value, problem):
    process = spawn(*zrpc_cli(*command, flag, value))
    assert process.popen.wait(30) == 2
    wait_for(lambda: any(problem in line for line in process.errors), timeout=5.0, message="the usage error")

