"""A broker that shuts down drains: the calls it holds are answered, new ones are refused as never
run (so a client may send them to another broker), and a second signal or the grace ends it."""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time
from typing import Iterator

import pytest

import zrpc
from workers.echo import Echo, echo_pb2
from zrpc import Broker, BrokerConfig, Client, Worker, broker_service_pb2
from zrpc.testing import serve

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


def _start(spawn, endpoints, drain_grace: str, worker: str | None = None, served: bool = True,
           unknown_service_grace: str = "0"):
    """A CLI broker with ``--drain-grace``, and a CLI worker of ``worker`` (MODULE:CLASS) that
    stops at once when told; returns the broker's process (once echo is served if ``served``)."""
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--unknown-service-grace", unknown_service_grace, "--drain-grace", drain_grace))
    broker.wait_line("zrpc broker ready")
    if worker is not None:
        spawn(*zrpc_cli("worker", "run", worker, "--broker", backend, "--drain-grace", "0")).wait_line("zrpc worker ready")
    if served:
        wait_until_served(frontend, ECHO.full_name)
    return broker


def test_sigterm_answers_the_calls_held_refuses_new_ones_then_exits_0(spawn, endpoints):
    broker = _start(spawn, endpoints, "30", "tests._services:SlowEcho")
    with Client(endpoints[0], timeout=30.0) as client, Client(endpoints[0], timeout=30.0) as newcomer:
        echo = client.stub(ECHO)
        slow = [echo.Say.future(echo_pb2.EchoRequest(payload=b"held %d" % i), metadata={"sleep_ms": "3000"})
                for i in range(3)]
        wait_for(lambda: _in_flight(client) == 3, message="the broker to hold the three calls")
        broker.signal(signal.SIGTERM)
        # The broker tells its clients it drains (DISCONNECT{drain}): they send it nothing more.
        wait_for(lambda: client._core._link_draining[0], timeout=10.0, message="the drain notice")
        # A client it did not know yet still asks: Health says NOT_SERVING, and a new call is
        # refused as never run. Not idempotent, it may go again all the same: with no other
        # broker, it waits for this one's successor, as the first client's does unsent.
        with Client(endpoints[0], timeout=5.0) as prober:
            wait_for(lambda: _health(prober) == HEALTH.NOT_SERVING, timeout=10.0, message="NOT_SERVING")
        raw = echo_pb2.EchoRequest(payload=b"new").SerializeToString()
        refused = newcomer.call_future("echo.Echo", "Say", raw)
        held = client.call_future("echo.Echo", "Say", raw)
        # The calls held when the signal came are answered, then the broker exits 0.
        assert sorted(f.result(timeout=20).payload.split(b":", 1)[1] for f in slow) == [b"held 0", b"held 1", b"held 2"]
        assert broker.popen.wait(15) == 0
        wait_for(lambda: any("3 calls held at the start, 0 left at workers; 1 calls refused" in line
                             for line in broker.errors), timeout=5.0, message="the drain's summary")
        assert not refused.done() and not held.done()  # no broker to take them
        # The successor on the same endpoints: the worker registers again, and the calls run there
        # (they may come first: they wait for the worker, as any call to an unknown service).
        _start(spawn, endpoints, "30", unknown_service_grace="20")
        for future in (refused, held):
            assert echo_pb2.EchoReply.FromString(future.result(timeout=20)).payload.split(b":", 1)[1] == b"new"


@contextlib.contextmanager
def _draining_with_a_held_call(endpoints, sleep_ms: int) -> Iterator[tuple[Broker, Client, concurrent.futures.Future]]:
    """An in-process broker holding one call (SlowEcho, ``sleep_ms``), told to drain; yields it,
    the client that made the call, and the call's future."""
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0,
                                 log_level="WARNING")).start()
    try:
        with Worker([SlowEcho()], brokers=backend, concurrency=1, drain_grace=0.0), \
                Client(frontend, timeout=20.0) as client:
            wait_until_served(frontend, ECHO.full_name)
            held = client.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"a"),
                                                metadata={"sleep_ms": str(sleep_ms)})
            wait_for(lambda: broker.engine.calls_held == 1, message="the call to be held")
            broker.drain(30.0)
            wait_for(lambda: broker.engine.draining, message="the drain to begin")
            yield broker, client, held
            assert held.result(timeout=10).payload.endswith(b"a")
    finally:
        broker.stop()


def test_a_client_with_one_broker_gives_up_on_a_draining_one_at_its_deadline(endpoints):
    with _draining_with_a_held_call(endpoints, sleep_ms=3000) as (broker, client, _):
        wait_for(lambda: client._core._link_draining[0], message="the drain notice")
        before = broker.engine.counters["requests"]
        with pytest.raises(zrpc.Error) as late:
            client.call("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"b").SerializeToString(), timeout=1.0)
        assert late.value.code == zrpc.StatusCode.DEADLINE_EXCEEDED
        assert "no broker took it in time (none connected, or shutting down" in late.value.message
        assert broker.engine.counters["requests"] == before  # told of the drain: "b" was never sent


def test_a_client_that_does_not_wait_for_brokers_gets_a_draining_refusal_at_once(endpoints):
    """The tester's `zrpc call` at a draining broker: refused as never run, its retry waited for
    the broker to close, then said only "nothing accepted the connection (is the broker running
    there?)". With no other broker and wait_for_broker off, the refusal is the answer, at once."""
    with _draining_with_a_held_call(endpoints, sleep_ms=1000) as (broker, _, held):
        with Client(endpoints[0], timeout=10.0, wait_for_broker=False) as late_client:
            with pytest.raises(zrpc.Error) as late:
                late_client.call("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"b").SerializeToString())
            assert not held.done() and broker._thread.is_alive()  # at once: the drain goes on
        assert late.value.code == zrpc.StatusCode.UNAVAILABLE
        assert late.value.message.startswith("broker is shutting down")
        assert late.value.details["zrpc-retry"] == "draining"


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
    wait_for(lambda: any("drain grace over: 1 calls at workers" in line for line in broker.errors), timeout=5.0,
             message="the broker's last warning")  # read by a thread: maybe not yet

    second = _start(spawn, endpoints, "60")  # the worker re-registers with the new broker
    with Client(endpoints[0], timeout=30.0) as client:
        client.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"x"), metadata={"hang_s": "20"})
        wait_for(lambda: _in_flight(client) == 1, message="the broker to hold the call")
        second.signal(signal.SIGTERM)
        wait_for(lambda: any("draining" in line for line in second.errors), timeout=10.0,
                 message="the broker to begin draining")
        second.signal(signal.SIGTERM)
        assert second.popen.wait(10) == 0  # not the 60 s grace


@contextlib.contextmanager
def _two_brokers_first_draining(ipc_dir) -> Iterator[tuple[Broker, Broker, concurrent.futures.Future]]:
    """Two in-process brokers and a SlowEcho worker serving both; the first drains, kept at it by
    a call it holds for 5 s. Yields (first, second, the held call's future)."""
    with contextlib.ExitStack() as stack:
        brokers = []
        for name in ("first", "second"):
            broker = Broker(BrokerConfig(frontend=f"ipc://{ipc_dir}/{name}-f", backend=f"ipc://{ipc_dir}/{name}-b",
                                         unknown_service_grace=0.0, log_level="WARNING")).start()
            stack.callback(broker.stop)
            brokers.append(broker)
        stack.enter_context(Worker([SlowEcho()], brokers=[b.backend_endpoint for b in brokers],
                                   heartbeat_interval=0.2, concurrency=64))
        for broker in brokers:
            wait_until_served(broker.frontend_endpoint, ECHO.full_name)
        first, second = brokers
        only_first = stack.enter_context(Client(first.frontend_endpoint, timeout=10.0))
        held = only_first.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"held"), metadata={"sleep_ms": "5000"})
        wait_for(lambda: first.engine.calls_held == 1, message="the first broker to hold a call")
        yield first, second, held


def _connected(client: Client, brokers: list[Broker]) -> None:
    """Calls until every broker has served one of this client's: all its links are up."""
    raw = echo_pb2.EchoRequest(payload=b"hello").SerializeToString()
    before = [b.engine.counters["requests"] for b in brokers]
    wait_for(lambda: client.call("echo.Echo", "Say", raw) and all(
        b.engine.counters["requests"] > n for b, n in zip(brokers, before)), message="both links up")


def _links_up(client: Client) -> None:
    """Both of the client's links finished their handshake (it has sent nothing yet)."""
    wait_for(lambda: client._core.link_is_up(0) and client._core.link_is_up(1), message="both links up")


def test_a_client_told_of_the_drain_sends_that_broker_nothing_more(ipc_dir):
    with _two_brokers_first_draining(ipc_dir) as (first, second, held), \
            Client([first.frontend_endpoint, second.frontend_endpoint], timeout=10.0) as client:
        _connected(client, [first, second])  # the first broker has heard from it: it will tell it
        first.drain(30.0)
        wait_for(lambda: client._core._link_draining[0], message="the drain notice")
        before = first.engine.counters["requests"]
        raw = echo_pb2.EchoRequest(payload=b"elsewhere").SerializeToString()
        for _ in range(10):
            assert client.call("echo.Echo", "Say", raw).endswith(b":elsewhere")
        assert first.engine.counters["requests"] == before and first.engine.counters["refused_draining"] == 0
        assert held.result(timeout=10).payload.endswith(b":held")


def test_a_call_refused_by_a_draining_broker_goes_to_another(ipc_dir):
    with _two_brokers_first_draining(ipc_dir) as (first, second, held):
        first.drain(30.0)
        wait_for(lambda: first.engine.draining, message="the first broker to drain")
        # A client the broker had not heard from: it was told nothing, and learns by a refusal.
        client = Client([first.frontend_endpoint, second.frontend_endpoint], timeout=10.0)
        _links_up(client)
        raw = echo_pb2.EchoRequest(payload=b"once").SerializeToString()
        with client:
            for _ in range(10):  # not idempotent: only a refusal that says "never ran" lets it go again
                reply = echo_pb2.EchoReply.FromString(client.call("echo.Echo", "Say", raw, idempotent=False))
                assert reply.payload.endswith(b":once")
        assert first.engine.counters["refused_draining"] >= 1  # the dealing sent one there first
        assert held.result(timeout=10).payload.endswith(b":held")  # and the held call is answered


def test_many_calls_at_once_all_leave_a_draining_broker_and_the_circuit_stays_closed(ipc_dir):
    with _two_brokers_first_draining(ipc_dir) as (first, second, held):
        first.drain(30.0)
        wait_for(lambda: first.engine.draining, message="the first broker to drain")
        client = Client([first.frontend_endpoint, second.frontend_endpoint], timeout=10.0,
                        circuit_breaker=zrpc.CircuitBreaker())
        _links_up(client)
        raw = echo_pb2.EchoRequest(payload=b"many").SerializeToString()
        with client:
            for _ in range(3):  # rounds: a circuit opened by the first would fail the later ones
                futures = [client.call_future("echo.Echo", "Say", raw) for _ in range(200)]
                failed = [f.exception(timeout=20) for f in futures if f.exception(timeout=20) is not None]
                assert failed == []
        assert first.engine.counters["refused_draining"] >= 1
        held.result(timeout=10)


def test_a_handler_that_re_raises_a_draining_refusal_did_run(endpoints):
    """Its answer loses zrpc-retry: its broker would take it for the worker's own drain and
    re-queue a call that ran, and give the worker no more calls."""
    class Relay(Echo):
        def Say(self, request, context):
            raise zrpc.Error(zrpc.StatusCode.UNAVAILABLE, "the broker I called is shutting down",
                             {"zrpc-retry": "draining", "hop": "downstream"})

    with serve(Relay()) as client:
        for _ in range(2):  # the second proves the worker still takes calls
            with pytest.raises(zrpc.Error) as raised:
                client.stub(ECHO).Say(echo_pb2.EchoRequest(payload=b"x"), timeout=5.0)
            assert raised.value.code == zrpc.StatusCode.UNAVAILABLE
            assert raised.value.details.get("hop") == "downstream"
            assert "zrpc-retry" not in raised.value.details


def test_the_grace_end_refuses_queued_calls_as_never_run(endpoints, caplog):
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0,
                                 log_level="WARNING")).start()
    try:
        # No retries: with its one broker gone, a retry would wait for the next one to start.
        with Worker([SlowEcho()], brokers=backend, concurrency=1, drain_grace=0.0), \
                Client(frontend, timeout=20.0, retry=None) as client:
            wait_until_served(frontend, ECHO.full_name)
            running = client.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"a"), metadata={"sleep_ms": "5000"})
            queued = client.call_future("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"b").SerializeToString())
            wait_for(lambda: broker.engine.calls_held == 2, message="one call running, one queued")
            broker.drain(0.3)
            with pytest.raises(zrpc.Error) as refused:
                queued.result(timeout=10)
            assert refused.value.details.get("zrpc-retry") == "draining"  # never ran: safe to send on
            with pytest.raises(zrpc.Error) as lost:
                running.result(timeout=10)
            assert "zrpc-endpoint" in lost.value.details  # held at the worker: may have run
            wait_for(lambda: not broker._thread.is_alive(), timeout=10.0, message="the loop to end")
    finally:
        broker.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert any("drain grace over: 1 calls at workers" in m for m in messages)
    assert not any("stopped while draining" in m for m in messages)  # nobody called stop()


def test_an_in_process_broker_drained_with_nothing_held_ends_its_loop(endpoints):
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, log_level="WARNING")).start()
    try:
        broker.drain(30.0)
        wait_for(lambda: not broker._thread.is_alive(), timeout=10.0, message="the loop to end")
    finally:
        broker.stop()


@pytest.mark.parametrize("held, grace", [(0, 30.0), (1, 0.3), ("unserved", 30.0)],
                         ids=["nothing held", "a call held past the grace", "a call no worker can take"])
def test_a_drain_ends_on_time_whatever_the_tick_interval(endpoints, held, grace):
    """The loop wakes for the drain's own steps, not at its next tick (60 s here): the quiet
    window after the last held call, the grace's end, and the refusal of calls queued for a
    service with no worker (which would hold the drain to its grace)."""
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0,
                                 tick_interval=60.0, log_level="ERROR")).start()
    try:
        with Worker([SlowEcho()], brokers=backend, drain_grace=0.0, heartbeat_interval=30.0), \
                Client(frontend, timeout=30.0, retry=None) as client:
            wait_until_served(frontend, ECHO.full_name)
            if held == "unserved":  # a service no worker offered, waited for in the start-up grace
                broker.engine.config.unknown_service_grace = 60.0
                calls = [client.call_future("nobody.Offers", "This", b"")]
                held = 1
            else:
                calls = [client.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"a"),
                                                      metadata={"sleep_ms": "20000"}) for _ in range(held)]
            wait_for(lambda: broker.engine.calls_held == held, message=f"the broker to hold {held} calls")
            broker.drain(grace)
            wait_for(lambda: not broker._thread.is_alive(), timeout=10.0, message="the loop to end")
            for call in calls:
                with pytest.raises(zrpc.Error):  # refused, or cut off by the grace
                    call.result(timeout=10)
    finally:
        broker.stop()


def test_signals_that_keep_coming_while_the_broker_exits_do_not_kill_it(spawn, endpoints):
    """Ctrl-C twice, or a unit's stop signal repeated: the exit stays 0 (status -15 before)."""
    broker = _start(spawn, endpoints, "10", served=False)
    broker.signal(signal.SIGTERM)
    pause = threading.Event()
    for _ in range(5000):  # bounded: a signal every millisecond or so until it has exited
        if broker.popen.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(broker.pid, signal.SIGTERM)
        pause.wait(0.001)  # the pace of the signals, not synchronisation
    assert broker.popen.wait(10) == 0


def test_a_call_sent_as_the_last_held_answer_arrives_is_refused_not_lost(endpoints):
    """The drain's loop used to end in the round that sent the last answer: a call its client
    sent right then stayed unread until the frontend closed, and failed as lost ("may have
    run"). The broker now reads on until its frontend is quiet, and refuses it as never run."""
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, log_level="WARNING")).start()
    try:
        with Worker([SlowEcho()], brokers=backend, drain_grace=0.0), Client(frontend, timeout=20.0) as client, \
                Client(frontend, timeout=20.0, retry=None) as newcomer:
            wait_until_served(frontend, ECHO.full_name)
            held = client.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"held"), metadata={"sleep_ms": "500"})
            wait_for(lambda: broker.engine.calls_held == 1, message="the call to be held")
            wait_for(lambda: newcomer._core.link_is_up(0), message="the newcomer's connection")
            broker.drain(30.0)
            held.result(timeout=10)
            # Sent at once by a client the broker had not heard from (so not told of the drain);
            # not idempotent, and no retries.
            with pytest.raises(zrpc.Error) as next_call:
                newcomer.call("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"next").SerializeToString())
            assert next_call.value.details.get("zrpc-retry") == "draining", next_call.value
            # Not "calls it holds are still answered", which a tester read as about this call.
            assert "shutting down and takes no new calls (this one did not run)" in next_call.value.message
    finally:
        broker.stop()


def test_a_client_polling_health_does_not_hold_the_drain_to_its_grace(endpoints):
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, log_level="WARNING")).start()
    stop = threading.Event()

    def poll_health() -> None:  # a load balancer's probe: Health answers OK (NOT_SERVING) all along
        with Client(frontend, timeout=2.0) as client:
            for _ in range(1000):
                if stop.wait(0.05):
                    return
                try:
                    _health(client)
                except zrpc.Error:
                    return  # the broker closed
    prober = threading.Thread(target=poll_health)
    prober.start()
    try:
        wait_for(lambda: broker.engine.counters["requests"] >= 3, message="the probe to poll")
        broker.drain(60.0)  # nothing held: it ends in its quiet window, not at its grace
        wait_for(lambda: not broker._thread.is_alive(), timeout=10.0, message="the loop to end")
    finally:
        stop.set()
        prober.join(10)
        broker.stop()


def test_a_rolling_restart_of_the_only_broker_fails_no_call_that_did_not_run(spawn, endpoints):
    """The new-user tester's case: threads making non-idempotent calls back to back while the
    one broker is stopped (SIGTERM) and another started on its endpoints. A call held by the
    old broker is answered, one it refused waits for the new one: none fails."""
    broker = _start(spawn, endpoints, "30", "tests._services:SlowEcho")
    answered, failed = [], []
    stop = threading.Event()
    request = echo_pb2.EchoRequest(payload=b"x").SerializeToString()

    with Client(endpoints[0], timeout=30.0) as client:
        def caller() -> None:
            for _ in range(1000):  # bounded; ends when told
                if stop.is_set():
                    return
                try:  # not idempotent: only a call that never ran may go again
                    client.call("echo.Echo", "Say", request, metadata={"sleep_ms": "200"})
                    answered.append(time.monotonic())
                except zrpc.Error as error:
                    failed.append(error)

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(answered) >= 16, message="calls through the first broker")
            broker.signal(signal.SIGTERM)
            assert broker.popen.wait(20) == 0
            restarted_at = time.monotonic()
            _start(spawn, endpoints, "30", unknown_service_grace="20")
            wait_for(lambda: sum(1 for at in answered if at > restarted_at) >= 16, timeout=30.0,
                     message="calls through the second broker")
        finally:
            stop.set()
            for thread in threads:
                thread.join(40)
    assert failed == []


def test_services_and_status_show_a_broker_that_drains(endpoints):
    """The second tester: during a drain, `zrpc services` and `zrpc status` printed their usual
    tables (exit 0); only `zrpc health` said NOT_SERVING."""
    from click.testing import CliRunner

    from zrpc._cli.main import main

    with _draining_with_a_held_call(endpoints, sleep_ms=1000) as _:
        listing = CliRunner().invoke(main, ["services", "--broker", endpoints[0]], prog_name="zrpc")
        status = CliRunner().invoke(main, ["status", "--broker", endpoints[0], "--interval", "0.05"],
                                    prog_name="zrpc")
        as_json = CliRunner().invoke(main, ["services", "--json", "--broker", endpoints[0]], prog_name="zrpc")
    assert listing.exit_code == 0 and listing.output.startswith("DRAINING: this broker is shutting down")
    assert status.exit_code == 0 and "(DRAINING: shutting down)" in status.output.splitlines()[0]
    assert '"draining": true' in as_json.output


def test_a_call_cut_off_by_the_grace_says_so_when_its_retry_finds_no_broker(endpoints):
    """The second tester: an idempotent call held past the grace lost its connection, was
    retried, found no broker, and said only "nothing accepted the connection (is the broker
    running there?)". It says what its first attempt met too."""
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, log_level="WARNING")).start()
    try:
        with Worker([SlowEcho()], brokers=backend, concurrency=1, drain_grace=0.0), \
                Client(frontend, timeout=20.0, wait_for_broker=False) as client:
            wait_until_served(frontend, ECHO.full_name)
            held = client.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"a"), metadata={"sleep_ms": "5000"})
            wait_for(lambda: broker.engine.calls_held == 1, message="the call to be held")
            broker.drain(0.2)
            with pytest.raises(zrpc.Error) as cut:
                held.result(timeout=15)
    finally:
        broker.stop()
    assert cut.value.code == zrpc.StatusCode.UNAVAILABLE
    assert "nothing accepted the connection" in cut.value.message
    assert "attempt 1 had failed with UNAVAILABLE: lost the connection to the broker" in cut.value.message
