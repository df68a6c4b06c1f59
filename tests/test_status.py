"""``zrpc status``: the broker's per-service counters and the table built from them."""
from __future__ import annotations

import signal

import pytest
import zmq
from click.testing import CliRunner

from zrpc import Broker, BrokerConfig, Client, Error, StatusCode, Worker
from zrpc import broker_service_pb2 as pb
from zrpc._cli._status_cmd import format_status
from zrpc._cli.main import main
from workers.echo import Echo, echo_pb2

from .conftest import wait_for, zrpc_cli
from .test_security import Keys

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]


@pytest.fixture
def served(endpoints):
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0)).start()
    worker = Worker([Echo()], backend, concurrency=2, heartbeat_interval=0.2, drain_grace=0.0).start()
    wait_for(lambda: broker.engine.services.get("echo.Echo") and broker.engine.services["echo.Echo"].workers)
    try:
        yield broker
    finally:
        worker.stop(grace=0.5)
        broker.stop()


def test_list_services_carries_calls_errors_and_p99(served):
    with Client(served.frontend_endpoint, timeout=5.0) as client:
        stub = client.stub(ECHO)
        for _ in range(10):
            stub.Say(echo_pb2.EchoRequest(payload=b"x"))
        with pytest.raises(Error):
            stub.Fail(echo_pb2.FailRequest(code=StatusCode.INTERNAL))
        reply = pb.ListServicesReply.FromString(client.call("zrpc.Broker", "ListServices", b""))
    echo = next(service for service in reply.services if service.name == "echo.Echo")
    assert (echo.calls_total, echo.errors_total) == (11, 1)
    assert 0 < echo.p99_ms < 30_000


def test_status_prints_one_table_when_not_watching(served):
    with Client(served.frontend_endpoint, timeout=5.0) as client:
        stub = client.stub(ECHO)
        for _ in range(5):
            stub.Say(echo_pb2.EchoRequest(payload=b"x"))
    result = CliRunner().invoke(main, ["status", "--broker", served.frontend_endpoint, "--interval", "0.05"],
                                prog_name="zrpc")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"broker {served.frontend_endpoint}: 1 service(s)")
    assert lines[0].endswith("p99 over the last minute, errors since the broker started")
    assert lines[1].split() == ["SERVICE", "WORKERS", "BUSY", "QUEUE", "IN-FLIGHT", "CALLS/S", "ERRORS/S", "P99", "MS",
                                "ERRORS"]
    name, workers, busy, queue, in_flight, rate, error_rate, p99, errors = lines[2].split()
    assert (name, workers, busy, queue, in_flight, errors) == ("echo.Echo", "1", "0", "0", "0", "0")
    assert float(rate) == float(error_rate) == 0.0 and float(p99) > 0  # no calls between the two snapshots
    assert "\x1b" not in result.output  # plain when piped


def test_calls_per_second_is_the_difference_of_two_snapshots():
    def snapshot(calls: int, errors: int = 2) -> pb.ListServicesReply:
        reply = pb.ListServicesReply()
        service = reply.services.add(name="kv.KeyValue", live_workers=2, queue_depth=3, in_flight=4,
                                     calls_total=calls, errors_total=errors, p99_ms=12.5)
        service.workers.add(name="a", capacity=2, in_flight=2)
        service.workers.add(name="b", capacity=2, in_flight=1)
        reply.services.add(name="zrpc.Broker")
        return reply

    text = format_status(snapshot(100), snapshot(150), 2.0, "tcp://b:5555")
    row = text.splitlines()[2].split()
    assert row == ["kv.KeyValue", "2", "1", "3", "4", "25.0", "0.0", "12.5", "2"]
    assert "zrpc.Broker" not in text
    # Overload: most calls answered are refusals (a new-user tester read 24,519 calls/s as busy).
    overloaded = format_status(snapshot(100, errors=2), snapshot(5100, errors=4902), 2.0, "tcp://b:5555")
    assert overloaded.splitlines()[2].split()[5:7] == ["2500.0", "2450.0"]
    quiet = snapshot(150)
    quiet.services[0].p99_ms = 0.0  # nothing answered in the last minute
    assert format_status(quiet, quiet, 2.0, "tcp://b:5555").splitlines()[2].split()[7] == "-"
    assert "no services" in format_status(pb.ListServicesReply(), pb.ListServicesReply(), 1.0, "x")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_watch_refreshes_until_interrupted(spawn, served, signum):
    watcher = spawn(*zrpc_cli("status", "--broker", served.frontend_endpoint, "--watch", "--interval", "0.05"))
    wait_for(lambda: sum(line.startswith("broker ") for line in watcher.lines) >= 2, message="two refreshes")
    watcher.signal(signum)
    assert watcher.popen.wait(10) == 0
    assert not any("Traceback" in line for line in watcher.errors)


def test_watch_of_a_broker_that_does_not_answer_ends_with_its_failure_status(spawn, ipc_dir):
    """A tester's watch of a broker that never answered exited 0 on Ctrl-C."""
    nobody = f"ipc://{ipc_dir}/nobody-home"
    watcher = spawn(*zrpc_cli("status", "--broker", nobody, "--watch", "--interval", "0.05", "--timeout", "0.2"))
    wait_for(lambda: sum(line.startswith(f"broker {nobody}: ") for line in watcher.lines) >= 2,
             message="two refreshes saying the broker does not answer")
    watcher.signal(signal.SIGINT)
    assert watcher.popen.wait(10) == 24  # 10 + UNAVAILABLE, as without --watch
    assert not any("Traceback" in line for line in watcher.errors)


def test_watch_interrupted_before_its_first_view_says_why_it_fails(spawn, ipc_dir):
    """Ctrl-C before the first refresh of a broker that did not answer exited 24, silently."""
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    silent.linger = 0
    try:
        endpoint = f"ipc://{ipc_dir}/silent"
        silent.bind(endpoint)
        watcher = spawn(*zrpc_cli("status", "--broker", endpoint, "--watch", "--interval", "60", "--timeout", "0.5"))
        # The first snapshot asks ListServices once Ctrl-C is being watched for.
        wait_for(lambda: silent.poll(100) and b"ListServices" in b"".join(silent.recv_multipart()), 20,
                 message="the watcher's first question")
        watcher.signal(signal.SIGINT)
        assert watcher.popen.wait(10) == 24
    finally:
        silent.close()
    assert any(line.startswith(f"error: no answer from broker at {endpoint}") for line in watcher.errors), \
        watcher.errors


def test_ctrl_c_before_the_second_snapshot_exits_130(spawn, served):
    once = spawn(*zrpc_cli("status", "--broker", served.frontend_endpoint, "--interval", "60"))
    # Its requests: DescribeService is not asked; ListServices is the first snapshot.
    wait_for(lambda: served.engine.counters["requests"] >= 1, message="the first snapshot")
    once.signal(signal.SIGINT)
    assert once.popen.wait(10) == 130


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_status_reaches_a_curve_broker_with_the_keys_it_is_given(tmp_path):
    keys = Keys(tmp_path)
    broker = Broker(keys.config()).start()
    try:
        def status(key: str):
            return CliRunner().invoke(main, ["status", "--broker", broker.frontend_endpoint, "--interval", "0.05",
                                             "--curve-secret", str(keys.secret(key)),
                                             "--broker-key", str(keys.broker_public)], prog_name="zrpc")
        admitted = status("alice")
        assert admitted.exit_code == 0, admitted.output
        assert admitted.output.startswith(f"broker {broker.frontend_endpoint}: 0 service(s)")
        refused = status("w1")  # a worker key is not admitted on the frontend
        assert refused.exit_code == 10 + StatusCode.UNAUTHENTICATED
        assert "handshake refused" in refused.stderr
    finally:
        broker.stop()
