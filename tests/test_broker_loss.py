"""A broker that dies takes the calls it holds with it: the client fails them UNAVAILABLE at once
(not at their deadlines), the retry policy sends the idempotent ones again once a broker is back,
and calls another broker holds are untouched. The brokers that die are processes, killed by PID."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import pytest
import zmq

import zrpc
from zrpc import AsyncClient, Broker, BrokerConfig, CircuitBreaker, Client, StatusCode, Worker
from zrpc import _protocol as p
from workers.echo import Echo, echo_pb2

from ._fake_frontend import FakeFrontend
from .conftest import wait_for, wait_until_served, zrpc_cli

# Long enough that only the feature under test can end these calls within the test's bounds.
CALL_TIMEOUT = 60.0
ANSWER_WITHIN = 20.0  # how long a test waits for an outcome (well under CALL_TIMEOUT)


def _start_broker(spawn, ipc_dir: str, name: str, grace: float = 0.0):
    """A `zrpc broker start` process; returns (process, frontend, backend)."""
    frontend, backend = f"ipc://{ipc_dir}/{name}-front", f"ipc://{ipc_dir}/{name}-back"
    process = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                              "--unknown-service-grace", str(grace)))
    process.wait_line("zrpc broker ready")
    return process, frontend, backend


def _sleep_request(ms: int, payload: bytes = b"") -> bytes:
    return echo_pb2.SleepRequest(ms=ms, payload=payload).SerializeToString()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_calls_held_by_a_broker_that_dies_fail_unavailable_at_once(spawn, ipc_dir, flavour):
    broker, frontend, backend = _start_broker(spawn, ipc_dir, "dies")
    with Worker([Echo()], backend, concurrency=4, heartbeat_interval=0.2, drain_grace=0.5) as worker:
        wait_until_served(frontend, "echo.Echo")
        if flavour == "sync":
            with Client(frontend, timeout=CALL_TIMEOUT) as client:
                future = client.call_future("echo.Echo", "Sleep", _sleep_request(30_000))
                wait_for(lambda: worker.running == 1, message="the call to reach the worker")
                broker.signal(signal.SIGKILL)
                error = future.exception(timeout=ANSWER_WITHIN)
        else:
            async def call_then_kill() -> BaseException | None:
                async with AsyncClient(frontend, timeout=CALL_TIMEOUT) as client:
                    task = asyncio.ensure_future(client.call("echo.Echo", "Sleep", _sleep_request(30_000)))
                    for _ in range(1000):  # until the worker runs it (10 s at most)
                        if worker.running == 1:
                            break
                        await asyncio.sleep(0.01)
                    assert worker.running == 1
                    broker.signal(signal.SIGKILL)
                    done, _ = await asyncio.wait([task], timeout=ANSWER_WITHIN)
                    assert done, "the call was not answered"
                    return task.exception()

            error = asyncio.run(call_then_kill())
    assert isinstance(error, zrpc.Error), error
    assert error.code == StatusCode.UNAVAILABLE, error
    assert "lost the connection to the broker" in error.message and frontend in error.message
    assert error.details["zrpc-endpoint"] == frontend


def test_an_idempotent_call_survives_a_broker_restart(spawn, ipc_dir):
    """DESIGN: after a broker restart, idempotent calls are retried per the retry policy."""
    broker, frontend, backend = _start_broker(spawn, ipc_dir, "restarts", grace=10.0)
    with Worker([Echo()], backend, concurrency=4, heartbeat_interval=0.2, drain_grace=0.5) as worker, \
            Client(frontend, timeout=CALL_TIMEOUT) as client:
        wait_until_served(frontend, "echo.Echo")
        future = client.call_future("echo.Echo", "Sleep", _sleep_request(1_000, b"again"), idempotent=True)
        wait_for(lambda: worker.running == 1, message="the call to reach the worker")
        broker.signal(signal.SIGKILL)
        broker.popen.wait(10)
        # The retry waits, unsent, until a broker is connected again; the new one waits (its
        # grace) for the worker to register anew.
        _start_broker(spawn, ipc_dir, "restarts", grace=10.0)
        reply = echo_pb2.EchoReply.FromString(future.result(timeout=ANSWER_WITHIN))
    assert reply.payload == b"again"


def _echo_calls(broker: Broker) -> int:
    """Calls to echo.Echo the broker has answered."""
    totals = broker.stats.services.get("echo.Echo")
    return totals.calls if totals is not None else 0


@pytest.mark.parametrize("idempotent", [False, True])
def test_with_two_brokers_only_the_calls_of_the_one_that_dies_fail(spawn, ipc_dir, idempotent):
    """The client holds a DEALER per broker, so it knows which calls a broker that dies takes
    with it: those fail UNAVAILABLE (or, idempotent, are sent again to the other broker), and the
    other broker's call is untouched."""
    doomed, doomed_front, doomed_back = _start_broker(spawn, ipc_dir, "doomed")
    survivor = Broker(BrokerConfig(frontend=f"ipc://{ipc_dir}/survivor-front", backend=f"ipc://{ipc_dir}/survivor-back",
                                   unknown_service_grace=0.0))
    with survivor, Worker([Echo()], [doomed_back, survivor.backend_endpoint], concurrency=4,
                          heartbeat_interval=0.2, drain_grace=0.5) as worker, \
            Client([doomed_front, survivor.frontend_endpoint], timeout=CALL_TIMEOUT,
                   # A lost connection is no failure of the service: its circuit stays closed.
                   circuit_breaker=CircuitBreaker(failure_threshold=1, reset_timeout=60.0)) as client:
        for frontend in (doomed_front, survivor.frontend_endpoint):
            wait_until_served(frontend, "echo.Echo")
        for dealer in client._dealers:  # both connected: the two calls go one to each broker
            wait_for(lambda: zmq.Socket.get(dealer, zmq.EVENTS) & zmq.POLLOUT, message="a connected broker")
        # Echo calls only: the client may ask a broker that owes it answers for its Health (_silence).
        requests_before = _echo_calls(survivor)
        futures = []
        for i in range(2):
            futures.append(client.call_future("echo.Echo", "Sleep", _sleep_request(1_000, b"%d" % i),
                                              idempotent=idempotent))
            wait_for(lambda: worker.running == i + 1, message=f"call {i} to reach the worker")
        doomed.signal(signal.SIGKILL)
        errors = [future.exception(timeout=ANSWER_WITHIN) for future in futures]
        requests = _echo_calls(survivor) - requests_before
    if idempotent:
        assert errors == [None, None], errors
        assert requests == 2  # its own call, and the other sent again
    else:
        assert [error is None for error in errors].count(True) == 1, errors
        failed = next(error for error in errors if error is not None)
        assert failed.code == StatusCode.UNAVAILABLE and failed.details["zrpc-endpoint"] == doomed_front
        assert requests == 1
    replies = {echo_pb2.EchoReply.FromString(future.result()).payload for future in futures if future.exception() is None}
    assert len(replies) == (2 if idempotent else 1) and replies <= {b"0", b"1"}


def test_a_call_sent_after_a_restart_the_client_has_not_read_yet_is_not_failed(spawn, ipc_dir):
    """A busy client that has not yet read that its broker's connection closed, nor that it came
    back, must not send over the new connection under the old one's number: the late close
    would fail a call the new broker runs."""
    broker, frontend, backend = _start_broker(spawn, ipc_dir, "restarts")
    with Worker([Echo()], backend, concurrency=4, heartbeat_interval=0.2, drain_grace=0.5):
        wait_until_served(frontend, "echo.Echo")

        async def restart_while_the_loop_is_busy() -> bytes:
            async with AsyncClient(frontend, timeout=CALL_TIMEOUT) as client:
                await client.call("echo.Echo", "Sleep", _sleep_request(0))  # connected
                # No await from here to the call: the loop reads no monitor event meanwhile.
                broker.signal(signal.SIGKILL)
                broker.popen.wait(10)
                _start_broker(spawn, ipc_dir, "restarts")
                wait_until_served(frontend, "echo.Echo")
                wait_for(lambda: zmq.Socket.get(client._sockets[0], zmq.EVENTS) & zmq.POLLOUT,
                         message="the client's new connection")
                return await client.call("echo.Echo", "Sleep", _sleep_request(0, b"after"))  # not idempotent

        reply = asyncio.run(restart_while_the_loop_is_busy())
    assert echo_pb2.EchoReply.FromString(reply).payload == b"after"


def test_the_broker_after_one_that_is_down_gets_no_more_than_its_share(ipc_dir):
    """Calls a broker that is down passes on are spread over the others, not all given to the
    next in the list."""
    brokers = [Broker(BrokerConfig(frontend=f"ipc://{ipc_dir}/{name}-front", backend=f"ipc://{ipc_dir}/{name}-back",
                                   unknown_service_grace=0.0)) for name in ("second", "third")]
    with brokers[0], brokers[1], \
            Worker([Echo()], [b.backend_endpoint for b in brokers], concurrency=4, heartbeat_interval=0.2), \
            Client([f"ipc://{ipc_dir}/down", *(b.frontend_endpoint for b in brokers)], timeout=10.0) as client:
        for broker in brokers:
            wait_until_served(broker.frontend_endpoint, "echo.Echo")
        for dealer in client._dealers[1:]:
            wait_for(lambda: zmq.Socket.get(dealer, zmq.EVENTS) & zmq.POLLOUT, message="a connected broker")
        before = [broker.engine.counters["requests"] for broker in brokers]
        for i in range(20):
            client.call("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"%d" % i).SerializeToString())
        served = [broker.engine.counters["requests"] - count for broker, count in zip(brokers, before)]
    assert served == [10, 10], served


def test_an_endpoint_listed_twice_is_one_broker():
    with Client(["ipc:///tmp/zrpc-twice", "ipc:///tmp/zrpc-twice"], timeout=1.0) as client:
        assert client.endpoints == ["ipc:///tmp/zrpc-twice"] and len(client._dealers) == 1


def test_a_retry_with_no_broker_left_says_why_it_ran_out_of_time(spawn, ipc_dir):
    broker, frontend, backend = _start_broker(spawn, ipc_dir, "gone")
    with Worker([Echo()], backend, concurrency=4, heartbeat_interval=0.2, drain_grace=0.5) as worker, \
            Client(frontend, timeout=CALL_TIMEOUT) as client:
        wait_until_served(frontend, "echo.Echo")
        future = client.call_future("echo.Echo", "Sleep", _sleep_request(30_000), idempotent=True, timeout=2.0)
        wait_for(lambda: worker.running == 1, message="the call to reach the worker")
        broker.signal(signal.SIGKILL)  # and it stays down: the retry waits, unsent, for its deadline
        error = future.exception(timeout=ANSWER_WITHIN)
    assert isinstance(error, zrpc.Error) and error.code == StatusCode.DEADLINE_EXCEEDED, error
    assert "no broker took it in time" in error.message
    assert "attempt 1 had failed with UNAVAILABLE: lost the connection to the broker" in error.message


def test_a_worker_says_once_that_its_broker_went_silent_and_when_it_answers_again(spawn, ipc_dir, caplog):
    broker, frontend, backend = _start_broker(spawn, ipc_dir, "flaps")
    caplog.set_level(logging.DEBUG, logger="zrpc.worker")
    with Worker([Echo()], backend, heartbeat_interval=0.2, drain_grace=0.5):
        wait_until_served(frontend, "echo.Echo")
        messages = lambda: [record.getMessage() for record in caplog.records]
        # Heard from (a worker that never was says "no answer yet", not "silent").
        wait_for(lambda: any("registered with broker" in m for m in messages()), message="the registration")
        broker.signal(signal.SIGKILL)
        # Two reconnections at least (the silence limit is 3 x 0.2 s), said once as a warning.
        wait_for(lambda: any("still silent after" in m for m in messages()), message="a second reconnection")
        _start_broker(spawn, ipc_dir, "flaps")
        wait_for(lambda: any("answers again after" in m for m in messages()), message="the broker back")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "silent for" in r.getMessage()]
    assert len(warnings) == 1, warnings


def test_clients_reach_an_in_process_broker_over_inproc():
    """inproc has no ZMTP handshake, so no monitor event says the link is up: it is from the start."""
    context = zmq.Context()
    broker = Broker(BrokerConfig(frontend="inproc://loss-frontend", backend="inproc://loss-backend"),
                    context=context).start()
    try:
        with Client("inproc://loss-frontend", timeout=5.0, context=context) as client:
            assert client.call("zrpc.Broker", "ListServices", b"") is not None

        async def call_async() -> bytes:
            async with AsyncClient("inproc://loss-frontend", timeout=5.0, context=context) as client:
                return await client.call("zrpc.Broker", "ListServices", b"")

        assert asyncio.run(call_async()) is not None
    finally:
        broker.stop()
        context.term()


def test_calls_that_expire_while_no_broker_is_up_are_let_go():
    """Nothing is kept of a call that expired unsent (an outage must not grow the client)."""
    from zrpc._client._core import ClientCore

    now = [0.0]
    core = ClientCore(clock=lambda: now[0], endpoints=["ipc:///nowhere"])  # its link never comes up
    for _ in range(200):
        assert core.add(core.prepare("s.S", "M", b"x" * 4096, timeout=0.01)) is None
    assert core.has_unsent() and not core.link_order()
    now[0] = 1.0
    assert len(core.advance(now[0])) == 200
    assert not core.has_unsent() and core.unsent() == 0 and core.in_flight == 0


def _serve_pairs(router: zmq.Socket, stop: threading.Event) -> None:
    """A stand-in broker on ``router``: answers every call of a REQUEST with its own payload."""
    while not stop.is_set():
        if not router.poll(50):
            continue
        identity, *frames = router.recv_multipart()
        if frames[1] == p.REQUEST:
            router.send_multipart([identity, *p.reply_message(
                (p.encode_ok_reply_header(p.request_id_of(header)), payload)
                for header, payload in p.pairs(frames[2:]))])


def test_replies_read_after_their_broker_restarted_are_answers_and_the_client_lives_on(ipc_dir):
    """A broker answers, then goes, while the client's I/O thread is busy in a done-callback; a
    new broker takes the endpoint. libzmq used to drop the replies the client had not read (its
    DEALERs were IMMEDIATE), or abort the process (`!_more`, fq.cpp) when that happened mid-message.
    The replies are answers now, and the client goes on with the new broker."""
    endpoint = f"ipc://{ipc_dir}/restarts"
    # A context of its own, ended here: libzmq closes sockets (and unlinks their ipc files) in
    # its own thread, so with the shared instance the teardown could outlive ipc_dir's removal
    # and leave the directory behind.
    context = zmq.Context()
    first = context.socket(zmq.ROUTER)
    first.bind(endpoint)
    in_callback, release = threading.Event(), threading.Event()
    with Client(endpoint, timeout=CALL_TIMEOUT, retry=None) as client:
        futures = [client.call_future("echo.Echo", "Say", b"%d" % i) for i in range(50)]
        futures[0].add_done_callback(lambda _: (in_callback.set(), release.wait(ANSWER_WITHIN)))
        requests = []
        while len(requests) < 50:  # in one or more REQUEST messages
            assert first.poll(ANSWER_WITHIN * 1000), "the client's requests did not come"
            identity, *frames = first.recv_multipart()
            requests += p.pairs(frames[2:])
        answer = [(p.encode_ok_reply_header(p.request_id_of(header)), payload) for header, payload in requests]
        first.send_multipart([identity, *p.reply_message(answer[:1])])
        assert in_callback.wait(ANSWER_WITHIN)  # the client's I/O thread is now busy
        for pair in answer[1:]:  # the rest, unread, each a message of several frames
            first.send_multipart([identity, *p.reply_message([pair])])
        first.close(linger=5000)  # flushed, then the connection closes
        second = context.socket(zmq.ROUTER)
        accepted = second.get_monitor_socket(zmq.EVENT_ACCEPTED)
        second.bind(endpoint)
        stop = threading.Event()
        server = threading.Thread(target=_serve_pairs, args=(second, stop))
        try:
            # The client's ZeroMQ reconnected: it has seen the first connection close.
            assert accepted.poll(ANSWER_WITHIN * 1000), "the client did not reconnect"
            release.set()
            assert [future.result(ANSWER_WITHIN) for future in futures] == [b"%d" % i for i in range(50)]
            server.start()
            assert client.call("echo.Echo", "Say", b"after", timeout=ANSWER_WITHIN) == b"after"
        finally:
            release.set()
            stop.set()
            if server.is_alive():
                server.join(ANSWER_WITHIN)
            second.disable_monitor()
            accepted.close(0)
            second.close(0)
            context.term()


def test_the_async_client_too_keeps_replies_that_arrived_before_its_broker_restarted(ipc_dir):
    """As above, with the event loop blocked (a done-callback) while the broker answers, goes
    and comes back: the DEALER's data and the monitor's close are then seen in one loop turn."""
    endpoint = f"ipc://{ipc_dir}/restarts-async"
    in_callback, release, stop = threading.Event(), threading.Event(), threading.Event()
    failures: list[str] = []

    def brokers() -> None:  # the first answers and goes, the second takes the endpoint
        context = zmq.Context.instance()
        first = context.socket(zmq.ROUTER)
        first.bind(endpoint)
        requests = []
        while len(requests) < 50:
            if not first.poll(ANSWER_WITHIN * 1000):
                failures.append("the client's requests did not come")
                return first.close(0)
            identity, *frames = first.recv_multipart()
            requests += p.pairs(frames[2:])
        answer = [(p.encode_ok_reply_header(p.request_id_of(header)), payload) for header, payload in requests]
        first.send_multipart([identity, *p.reply_message(answer[:1])])
        if not in_callback.wait(ANSWER_WITHIN):
            failures.append("the first answer was not read")
            return first.close(0)
        for pair in answer[1:]:
            first.send_multipart([identity, *p.reply_message([pair])])
        first.close(linger=5000)
        second = context.socket(zmq.ROUTER)
        accepted = second.get_monitor_socket(zmq.EVENT_ACCEPTED)
        second.bind(endpoint)
        if not accepted.poll(ANSWER_WITHIN * 1000):
            failures.append("the client did not reconnect")
        release.set()
        second.disable_monitor()  # a monitor closed while still enabled stalls the new handshakes
        accepted.close(0)
        _serve_pairs(second, stop)
        second.close(0)

    async def calls() -> tuple[list, bytes]:
        async with AsyncClient(endpoint, timeout=CALL_TIMEOUT, retry=None) as client:
            tasks = [asyncio.ensure_future(client.call("echo.Echo", "Say", b"%d" % i)) for i in range(50)]
            tasks[0].add_done_callback(lambda _: (in_callback.set(), release.wait(ANSWER_WITHIN)))
            done, _ = await asyncio.wait(tasks, timeout=ANSWER_WITHIN)
            assert len(done) == 50, "calls were not answered"
            after = await client.call("echo.Echo", "Say", b"after", timeout=ANSWER_WITHIN)
            return [task.result() for task in tasks], after

    server = threading.Thread(target=brokers)
    server.start()
    try:
        replies, after = asyncio.run(calls())
    finally:
        release.set()
        stop.set()
        server.join(ANSWER_WITHIN)
    assert failures == []
    assert replies == [b"%d" % i for i in range(50)] and after == b"after"


class _DrainingFrontend(FakeFrontend):
    """A broker's frontend that refuses every call as a draining broker does (spec §11)."""

    thread_name = "fake-draining-frontend"

    def answer(self, header, payload: bytes) -> tuple[bytes, bytes]:
        return p.encode_reply_header(header.request_id, StatusCode.UNAVAILABLE, "shutting down", p.DRAINING), b""


@pytest.mark.parametrize("other", ["down", "draining"])
def test_a_client_waiting_for_room_at_one_broker_does_not_spin_on_another_that_takes_nothing(ipc_dir, monkeypatch,
                                                                                            other):
    """Without IMMEDIATE a DEALER is writable before it ever connects, and a draining broker's
    always: asking either for POLLOUT while another broker's queue is full made the sync
    client's I/O loop spin (32,312 turns in 2 s; 5,704 in 0.5 s for the draining one)."""
    turns = []
    poll = zmq.Poller.poll

    def counted(self, timeout=None):
        if threading.current_thread().name == "zrpc-client-io":
            turns.append(1)
        return poll(self, timeout)

    monkeypatch.setattr(zmq.Poller, "poll", counted)
    full = f"ipc://{ipc_dir}/never-reads"
    stalled = zmq.Context.instance().socket(zmq.ROUTER)
    stalled.rcvhwm = 1
    stalled.bind(full)
    draining = _DrainingFrontend(f"ipc://{ipc_dir}/draining") if other == "draining" else None
    first = draining.endpoint if draining is not None else f"ipc://{ipc_dir}/never-bound"
    try:
        with Client([first, full], timeout=CALL_TIMEOUT, retry=None) as client:
            if draining is not None:  # its first call, to the first broker, marks it draining
                wait_for(lambda: client._core.link_is_up(0) and client._core.link_is_up(1),
                         message="both connections up")
                with pytest.raises(zrpc.Error) as refused:
                    client.call("echo.Echo", "Say", b"")
                assert refused.value.details.get("zrpc-retry") == "draining"
            payload = b"x" * 100_000
            futures = []
            for _ in range(10_000):  # until the queue to the broker that never reads is full
                futures.append(client.call_future("echo.Echo", "Say", payload))
                if any(client._pollout):
                    break
                time.sleep(0.001)  # lets the I/O thread send what came so far
            wait_for(lambda: any(client._pollout), message="a send blocked on the full queue")
            before = len(turns)
            time.sleep(0.5)  # a window to count loop turns in, not a synchronisation
            assert len(turns) - before < 50, f"{len(turns) - before} I/O loop turns in 0.5 s while waiting"
            for future in futures:
                future.cancel()
    finally:
        stalled.close(0)
        if draining is not None:
            draining.stop()


def test_a_call_dispatched_to_a_worker_whose_connection_is_gone_runs_at_the_next_worker(ipc_dir):
    """The ROUTER cannot send to a worker that left without a word: the call never reached it,
    so it goes to the next worker, idempotent or not, instead of waiting for the first to expire."""
    frontend, backend = f"ipc://{ipc_dir}/front", f"ipc://{ipc_dir}/back"
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, unavailable_wait=30.0,
                                 log_level="WARNING")).start()
    context = zmq.Context()
    try:
        # A worker that registers, then goes without DISCONNECT; its heartbeat interval (an hour)
        # keeps the broker from expiring it for that long.
        ghost = context.socket(zmq.DEALER)
        ghost.connect(backend)
        ghost.send_multipart(p.ready_message(p.Ready(services=["echo.Echo"], capacity=1, heartbeat_ms=3_600_000,
                                                     name="ghost")))
        wait_for(lambda: len(broker.engine.workers) == 1, message="the ghost to register")
        backend_connections = broker.connections.guards["backend"].count
        ghost.close(linger=0)
        wait_for(lambda: backend_connections.held == 0, message="the broker to see the ghost's connection close")
        with Client(frontend, timeout=20.0, retry=None) as client:
            answer = client.call_future("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"x").SerializeToString())
            wait_for(lambda: broker.engine.counters["requeued_undelivered"] == 1, message="the call to come back")
            assert not broker.engine.workers  # the ghost is gone, and known to be
            with Worker([Echo()], brokers=backend):
                assert echo_pb2.EchoReply.FromString(answer.result(timeout=20)).payload.endswith(b"x")
    finally:
        context.term()
        broker.stop()


def test_a_worker_started_before_its_broker_says_none_answers_yet_not_that_it_went_silent(ipc_dir, caplog):
    caplog.set_level(logging.INFO, logger="zrpc.worker")
    config = BrokerConfig(frontend=f"ipc://{ipc_dir}/late-front", backend=f"ipc://{ipc_dir}/late-back")
    messages = lambda: [record.getMessage() for record in caplog.records]
    with Worker([Echo()], config.backend, heartbeat_interval=0.05, liveness=2):
        wait_for(lambda: any("no answer from a broker at" in m for m in messages()), message="the warning")
        with Broker(config):
            wait_for(lambda: any("registered with broker" in m for m in messages()), message="the registration")
    assert not any("silent for" in m or "answers again" in m for m in messages())
