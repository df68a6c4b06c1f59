"""A broker that shuts down drains: the calls it holds are answered, new ones are refused as never
run (so a client may send them to another broker), and a second signal or the grace ends it."""
from __future__ import annotations

import contextlib
import signal

import pytest

import zrpc
from workers.echo import echo_pb2
from zrpc import Broker, BrokerConfig, Client, Worker, broker_service_pb2

from ._services import SlowEcho
from .conftest import wait_for, wait_until_served, zrpc_cli

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
HEALTH = broker_service_pb2.HealthReply


def _in_flight(client: Client) -> int:
    raw = client.call("zrpc.Broker", "ListServices", b"", timeout=5.0)
    return sum(s.in_flight + s.queue_depth for s in broker_service_pb2.ListServicesReply.FromString(raw).services)


def _health(client: Client) -> int:
    raw = client.call("zrpc.Broker", "Health", broker_service_pb2.HealthRequest().SerializeToString(), timeout=5.0)
    return HEALTH.FromString(raw).status


def _start(spawn, endpoints, drain_grace: str, worker: str | None = None):
    """A CLI broker with ``--drain-grace``, and a CLI worker of ``worker`` (MODULE:CLASS) that
    stops at once when told; returns the broker's process once the service is served."""
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--unknown-service-grace", "0", "--drain-grace", drain_grace))
    broker.wait_line("zrpc broker ready")
    if worker is not None:
        spawn(*zrpc_cli("worker", "run", worker, "--broker", backend, "--drain-grace", "0")).wait_line("zrpc worker ready")
    wait_until_served(frontend, ECHO.full_name)
    return broker


def test_sigterm_answers_the_calls_held_refuses_new_ones_then_exits_0(spawn, endpoints):
    broker = _start(spawn, endpoints, "30", "tests._services:SlowEcho")
    with Client(endpoints[0], timeout=20.0) as client:
        echo = client.stub(ECHO)
        slow = [echo.Say.future(echo_pb2.EchoRequest(payload=b"held %d" % i), metadata={"sleep_ms": "1500"})
                for i in range(3)]
        wait_for(lambda: _in_flight(client) == 3, message="the broker to hold the three calls")
        broker.signal(signal.SIGTERM)
        wait_for(lambda: _health(client) == HEALTH.NOT_SERVING, timeout=10.0, message="Health to say NOT_SERVING")
        # A new call is refused as never run: not idempotent (Echo/Say is), and yet retried by
        # the client's policy; with this one broker, every attempt is refused the same way.
        with pytest.raises(zrpc.Error) as refused:
            client.call("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"new").SerializeToString())
        assert refused.value.code == zrpc.StatusCode.UNAVAILABLE
        assert refused.value.details.get("zrpc-retry") == "draining"
        assert refused.value.details.get("zrpc-attempts") == "3"  # the default policy's attempts
        assert "shutting down" in refused.value.message
        # The calls held when the signal came are answered, then the broker exits 0.
        assert sorted(f.result(timeout=20).payload.split(b":", 1)[1] for f in slow) == [b"held 0", b"held 1", b"held 2"]
    assert broker.popen.wait(15) == 0
    assert any("draining" in line for line in broker.errors)


def test_the_grace_bounds_the_drain_and_a_second_signal_ends_it_at_once(spawn, endpoints):
    broker = _start(spawn, endpoints, "0.5", "tests._services:HangingEcho")
    with Client(endpoints[0], timeout=30.0) as client:
        # Not idempotent: the client's policy would send it again, and wait for a broker.
        hung = client.call_future("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"x").SerializeToString(),
                                  metadata={"hang_s": "20"})
        wait_for(lambda: _in_flight(client) == 1, message="the broker to hold the call")
        broker.signal(signal.SIGTERM)
        assert broker.popen.wait(10) == 0  # the grace (0.5 s), not the hung call's 20 s
        with pytest.raises(zrpc.Error) as lost:
            hung.result(timeout=10)
        assert lost.value.code == zrpc.StatusCode.UNAVAILABLE  # its connection closed: at once
    assert any("drain grace over: 1 calls still held" in line for line in broker.errors)

    second = _start(spawn, endpoints, "60")  # the worker re-registers with the new broker
    with Client(endpoints[0], timeout=30.0) as client:
        client.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"x"), metadata={"hang_s": "20"})
        wait_for(lambda: _in_flight(client) == 1, message="the broker to hold the call")
        second.signal(signal.SIGTERM)
        wait_for(lambda: any("draining" in line for line in second.errors), timeout=10.0,
                 message="the broker to begin draining")
        second.signal(signal.SIGTERM)
        assert second.popen.wait(10) == 0  # not the 60 s grace


def test_a_call_refused_by_a_draining_broker_goes_to_another(ipc_dir):
    with contextlib.ExitStack() as stack:
        brokers = []
        for name in ("first", "second"):
            broker = Broker(BrokerConfig(frontend=f"ipc://{ipc_dir}/{name}-f", backend=f"ipc://{ipc_dir}/{name}-b",
                                         unknown_service_grace=0.0, log_level="WARNING")).start()
            stack.callback(broker.stop)
            brokers.append(broker)
        worker = Worker([SlowEcho()], brokers=[b.backend_endpoint for b in brokers], heartbeat_interval=0.2)
        stack.enter_context(worker)
        for broker in brokers:
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
        first, second = brokers
        # A call held keeps the first broker draining (with none it would end at once).
        only_first = stack.enter_context(Client(first.frontend_endpoint, timeout=10.0))
        held = only_first.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"held"), metadata={"sleep_ms": "5000"})
        wait_for(lambda: first.engine.calls_held == 1, message="the first broker to hold a call")
        first.drain(30.0)
        wait_for(lambda: first.engine.draining, message="the first broker to drain")
        client = stack.enter_context(Client([b.frontend_endpoint for b in brokers], timeout=10.0))
        raw = echo_pb2.EchoRequest(payload=b"once").SerializeToString()
        for _ in range(10):  # not idempotent: only a refusal that says "never ran" lets it go again
            reply = echo_pb2.EchoReply.FromString(client.call("echo.Echo", "Say", raw, idempotent=False))
            assert reply.payload.endswith(b":once")
        assert second.engine.counters["requests"] >= 10
        assert first.engine.counters["refused_draining"] >= 1  # the dealing sent some there first
        assert first.engine.counters["code_OK"] == 0
        assert held.result(timeout=10).payload.endswith(b":held")  # and the held call is answered


def test_an_in_process_broker_drained_with_nothing_held_ends_its_loop(endpoints):
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, log_level="WARNING")).start()
    try:
        broker.drain(30.0)
        wait_for(lambda: not broker._thread.is_alive(), timeout=10.0, message="the loop to end")
    finally:
        broker.stop()
