"""busy_poll: after a message the broker and the worker poll without sleeping for a while, then
sleep again; timers keep working meanwhile; the CLI flags reach them."""
from __future__ import annotations

import os
import threading
import time

import pytest
import zmq

import zrpc
from workers.echo import Echo, echo_pb2
from zrpc import Broker, BrokerConfig, Worker
from zrpc._worker import _runtime

from ._services import HangingEcho
from .conftest import wait_for, wait_until_served, zrpc_cli

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
HELLO = echo_pb2.EchoRequest(payload=b"hello")


class RecordingPoller(zmq.Poller):
    """zmq.Poller that records the timeout of every poll made by the broker's loop thread."""

    timeouts: list[tuple[float, int]] = []

    def poll(self, timeout=None):
        if threading.current_thread().name == "zrpc-broker":
            RecordingPoller.timeouts.append((time.monotonic(), timeout))
        return super().poll(timeout)


@pytest.fixture
def recorded_polls(monkeypatch):
    RecordingPoller.timeouts = []
    monkeypatch.setattr(zmq, "Poller", RecordingPoller)  # the broker makes its poller at run()
    return RecordingPoller.timeouts


def _broker(endpoints, busy_poll: float) -> Broker:
    frontend, backend = endpoints
    return Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0,
                               busy_poll=busy_poll, log_level="WARNING")).start()


def test_the_broker_polls_without_sleeping_after_a_message_then_sleeps_again(endpoints, recorded_polls):
    window = 0.3
    broker = _broker(endpoints, window)
    try:
        # A long heartbeat: the worker's own messages would open the window again.
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
            busy = [at for at, t in after if t == 0]
            assert len(busy) >= 10  # it polled, again and again, without sleeping
            first_sleep = next(at for at, t in after if t > 0 and at > busy[0])
            assert first_sleep - busy[0] >= window * 0.8  # for the window, not a turn or two
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


@pytest.mark.parametrize("busy_poll", [0.0, 0.3])
def test_the_worker_reads_every_loop_turn_for_the_window_then_sleeps(endpoints, monkeypatch, busy_poll):
    reads = [0]
    receive = _runtime.Worker._receive

    def counting_receive(self, link):
        reads[0] += 1
        receive(self, link)

    monkeypatch.setattr(_runtime.Worker, "_receive", counting_receive)
    broker = _broker(endpoints, 0.0)
    try:
        with Worker([Echo()], brokers=broker.backend_endpoint, heartbeat_interval=30.0,
                    busy_poll=busy_poll), \
                zrpc.Client(broker.frontend_endpoint, timeout=10.0) as client:
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
            before = reads[0]
            assert client.stub(ECHO).Say(HELLO).payload == b"hello"

            def settled() -> bool:  # no read for a while: the worker sleeps
                seen = reads[0]
                threading.Event().wait(busy_poll + 0.2)  # a bounded look, not synchronisation
                return reads[0] == seen
            wait_for(settled, timeout=10.0, message="the worker to stop reading")
            if busy_poll:
                assert reads[0] - before >= 20  # a read every loop turn of the window
            else:
                assert reads[0] - before <= 5  # a read when the socket signals, no more
    finally:
        broker.stop()


def test_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="busy_poll"):
        BrokerConfig(busy_poll=-0.1).validate()
    with pytest.raises(ValueError, match="busy_poll"):
        BrokerConfig(busy_poll=2.0).validate()
    with pytest.raises(ValueError, match="busy_poll"):
        Worker([Echo()], busy_poll=5.0)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_cli_flags_reach_broker_and_worker_and_both_rest_when_calls_stop(spawn, endpoints):
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--unknown-service-grace", "0", "--busy-poll", "0.2"))
    broker.wait_line("zrpc broker ready")
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend,
                             "--heartbeat-interval", "30", "--busy-poll", "0.2"))
    worker.wait_line("zrpc worker ready")
    wait_until_served(frontend, ECHO.full_name)
    with zrpc.Client(frontend, timeout=10.0) as client:
        for _ in range(50):
            assert client.stub(ECHO).Say(HELLO).payload == b"hello"

    def resting(pid: int):
        def check() -> bool:
            used = _cpu_seconds(pid)
            threading.Event().wait(0.5)  # a bounded look, not synchronisation
            return _cpu_seconds(pid) - used < 0.1  # under a fifth of a core: not polling
        return check
    wait_for(resting(broker.pid), timeout=15.0, message="the broker to stop polling")
    wait_for(resting(worker.pid), timeout=15.0, message="the worker to stop polling")


@pytest.mark.parametrize("command", [["broker", "start"], ["worker", "run", "workers.echo:Echo"]])
def test_the_cli_refuses_a_window_over_a_second(spawn, command):
    process = spawn(*zrpc_cli(*command, "--busy-poll", "2"))
    assert process.popen.wait(30) == 2
    wait_for(lambda: any("--busy-poll" in line for line in process.errors), timeout=5.0,
             message="the usage error")
