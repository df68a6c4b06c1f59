"""A client given several brokers sends only to the ones it is connected to (clients and workers
may connect to several brokers at once), so a broker that is down costs no later call."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

import zrpc
from zrpc import AsyncClient, Broker, BrokerConfig, Client, Worker, _protocol, broker_service_pb2
from workers.echo import Echo, echo_pb2

from ._fake_frontend import FakeFrontend
from .conftest import wait_for

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]


def _broker(ipc_dir: str, name: str) -> Broker:
    return Broker(BrokerConfig(frontend=f"ipc://{ipc_dir}/{name}-front", backend=f"ipc://{ipc_dir}/{name}-back",
                               unknown_service_grace=0.0))


def _serves_echo(broker: Broker) -> bool:
    state = broker.engine.services.get("echo.Echo")
    return bool(state and state.workers)


def _two_brokers_one_worker(stack: contextlib.ExitStack, ipc_dir: str) -> tuple[Broker, Broker]:
    """Two running brokers and one Echo worker serving both (stopped by ``stack``)."""
    first, second = _broker(ipc_dir, "first"), _broker(ipc_dir, "second")
    for broker in (first, second):
        stack.enter_context(broker)
    stack.enter_context(Worker([Echo()], [first.backend_endpoint, second.backend_endpoint],
                               concurrency=4, heartbeat_interval=0.2))
    wait_for(lambda: _serves_echo(first) and _serves_echo(second))
    return first, second


def test_a_broker_in_the_list_that_never_ran_costs_no_call(ipc_dir):
    never_ran = f"ipc://{ipc_dir}/never-bound"
    with _broker(ipc_dir, "live") as broker, Worker([Echo()], broker.backend_endpoint, heartbeat_interval=0.2):
        wait_for(lambda: _serves_echo(broker))
        endpoints = [never_ran, broker.frontend_endpoint]
        for attempt in range(3):  # a fresh client each time, as each CLI command makes: its first call too
            with Client(endpoints, timeout=5.0) as client:
                echo = client.stub(ECHO)
                for i in range(4):
                    payload = b"%d-%d" % (attempt, i)
                    assert echo.Say(echo_pb2.EchoRequest(payload=payload)).payload == payload

        async def concurrent_calls() -> list[bytes]:
            async with AsyncClient(endpoints, timeout=5.0) as client:
                echo = client.stub(ECHO)
                replies = await asyncio.gather(*(echo.Say(echo_pb2.EchoRequest(payload=b"%d" % i)) for i in range(32)))
                return [reply.payload for reply in replies]

        assert asyncio.run(concurrent_calls()) == [b"%d" % i for i in range(32)]


def test_calls_made_while_no_broker_is_up_leave_when_one_comes_up(ipc_dir):
    broker = _broker(ipc_dir, "late")
    endpoint = broker.config.frontend

    async def call_before_the_broker_binds() -> bytes:
        async with AsyncClient(endpoint, timeout=10.0) as client:
            echo = client.stub(ECHO)
            pending = asyncio.ensure_future(echo.Say(echo_pb2.EchoRequest(payload=b"early")))
            for _ in range(500):  # until the writer has found no broker to send to (5 s at most)
                if client._send_blocked:
                    break
                await asyncio.sleep(0.01)
            assert client._send_blocked and not pending.done()
            with broker, Worker([Echo()], broker.config.backend, heartbeat_interval=0.2):
                return (await pending).payload

    assert asyncio.run(call_before_the_broker_binds()) == b"early"


def test_a_broker_that_stops_costs_no_later_call(ipc_dir):
    with contextlib.ExitStack() as stack:
        first, second = _two_brokers_one_worker(stack, ipc_dir)
        client = stack.enter_context(Client([first.frontend_endpoint, second.frontend_endpoint], timeout=5.0))
        echo = client.stub(ECHO)
        for i in range(20):
            assert echo.Say(echo_pb2.EchoRequest(payload=b"%d" % i)).payload == b"%d" % i
        assert first.engine.counters["requests"] > 0 and second.engine.counters["requests"] > 0

        second.stop()
        # A call sent in the instant before the client saw the connection close may be lost with
        # the broker; every call after that must be served by the first.
        outcomes = []
        for i in range(40):
            try:
                echo.Say(echo_pb2.EchoRequest(payload=b"after"), timeout=1.0)
                outcomes.append(True)
            except zrpc.Error:
                outcomes.append(False)
            if outcomes[-20:] == [True] * 20:
                break
        assert outcomes[-20:] == [True] * 20, outcomes
        assert outcomes.count(False) <= 2, outcomes


def test_a_broker_that_lost_its_workers_costs_a_call_a_wait_not_the_call(ipc_dir):
    """Workers went away from one broker (its host partitioned, say) but serve the other: that
    broker refuses each call after unavailable_wait as never run (`zrpc-retry: not-run`), and
    the client sends it to the other broker, though Sleep is not idempotent."""
    stranded = Broker(BrokerConfig(frontend=f"ipc://{ipc_dir}/stranded-front",
                                   backend=f"ipc://{ipc_dir}/stranded-back", unavailable_wait=0.2))
    with contextlib.ExitStack() as stack:
        stack.enter_context(stranded)
        live = stack.enter_context(_broker(ipc_dir, "live"))
        stack.enter_context(Worker([Echo()], live.backend_endpoint, heartbeat_interval=0.2))
        with Worker([Echo()], stranded.backend_endpoint, heartbeat_interval=0.2):
            wait_for(lambda: _serves_echo(stranded) and _serves_echo(live))
        wait_for(lambda: not _serves_echo(stranded), message="the stranded broker's worker gone")
        assert "echo.Echo" in stranded.engine.services  # known, with no live worker
        client = stack.enter_context(Client([stranded.frontend_endpoint, live.frontend_endpoint], timeout=5.0))
        request = echo_pb2.SleepRequest(ms=0).SerializeToString()
        for _ in range(6):  # dealt in turn: half go to the stranded broker first
            client.call("echo.Echo", "Sleep", request, idempotent=False)
        assert stranded.engine.counters["code_UNAVAILABLE"] >= 2  # it was tried, and refused


def test_a_service_only_one_of_two_brokers_knows_is_found_by_every_call(ipc_dir):
    """A tester's greeter worker served one of two brokers (as while a worker registers): the
    calls dealt to the other failed NOT_FOUND. That refusal never ran (`zrpc-retry: not-run`),
    so the client tries each other broker once; a service none has stays NOT_FOUND."""
    from workers.greeter import Greeter, helloworld_pb2

    with contextlib.ExitStack() as stack:
        knows, other = _broker(ipc_dir, "knows"), _broker(ipc_dir, "other")
        for broker in (knows, other):
            stack.enter_context(broker)
        stack.enter_context(Worker([Greeter()], knows.backend_endpoint, heartbeat_interval=0.2))
        wait_for(lambda: "helloworld.Greeter" in knows.engine.services)
        client = stack.enter_context(Client([other.frontend_endpoint, knows.frontend_endpoint], timeout=5.0))
        greeter = client.stub(helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"])
        for i in range(6):  # dealt in turn: half reach the broker without it first
            assert greeter.SayHello(helloworld_pb2.HelloRequest(name=str(i))).message == f"Hello, {i}!"
        assert other.engine.counters["code_NOT_FOUND"] >= 2

        async def rounds() -> list[str]:  # concurrent: other calls move the turn between (review)
            async with AsyncClient([other.frontend_endpoint, knows.frontend_endpoint], timeout=5.0) as client:
                stub = client.stub(helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"])
                replies = []
                for _ in range(5):
                    replies += await asyncio.gather(*(stub.SayHello(helloworld_pb2.HelloRequest(name=str(i)))
                                                      for i in range(8)))
                return [reply.message for reply in replies]

        assert asyncio.run(rounds()) == [f"Hello, {i}!" for _ in range(5) for i in range(8)]
        with pytest.raises(zrpc.Error) as caught:
            client.call("nowhere.S", "M", b"")
        assert caught.value.code == zrpc.StatusCode.NOT_FOUND and caught.value.details["zrpc-attempts"] == "2"


def test_an_async_client_that_started_before_its_broker_goes_back_to_early_sends(ipc_dir):
    """Its first early send found no broker; once one takes a REQUEST, calls leave in batches of
    PIPELINE_PAIRS again instead of only at the end of each loop turn."""
    import zmq

    from zrpc._client._async import PIPELINE_PAIRS

    broker = _broker(ipc_dir, "later")

    async def main() -> None:
        async with AsyncClient(broker.config.frontend, timeout=10.0) as client:
            echo = client.stub(ECHO)
            first = [asyncio.ensure_future(echo.Say(echo_pb2.EchoRequest(payload=b"1"))) for _ in range(PIPELINE_PAIRS)]
            await asyncio.sleep(0)  # the calls run up to their send; the writer task has not run yet
            assert client._send_blocked
            with broker, Worker([Echo()], broker.config.backend, heartbeat_interval=0.2):
                # Connected before the writer runs (the loop is held here): its send succeeds.
                wait_for(lambda: _serves_echo(broker), 5)  # its grace is 0: a call before the worker is NOT_FOUND
                wait_for(lambda: zmq.Socket.get(client._sockets[0], zmq.EVENTS) & zmq.POLLOUT, 5)
                assert [reply.payload for reply in await asyncio.gather(*first)] == [b"1"] * PIPELINE_PAIRS
                assert not client._send_blocked

    asyncio.run(main())


def test_a_cancel_reaches_whichever_broker_holds_the_call(ipc_dir):
    """A CANCEL goes to the broker holding the call (the client has a DEALER per broker)."""
    with contextlib.ExitStack() as stack:
        first, second = _two_brokers_one_worker(stack, ipc_dir)
        held = lambda: first.engine.calls_held + second.engine.calls_held
        for flavour in ("sync", "async"):
            if flavour == "sync":
                client = Client([first.frontend_endpoint, second.frontend_endpoint], timeout=30.0)
                sleep = client.stub(ECHO).Sleep
                futures = []
                for i in range(2):  # one message each: the client deals them to both brokers in turn
                    futures.append(sleep.future(echo_pb2.SleepRequest(ms=20_000)))
                    wait_for(lambda: held() == i + 1)
                assert first.engine.calls_held == second.engine.calls_held == 1
                for future in futures:
                    future.cancel()
                wait_for(lambda: held() == 0, 5, message="both calls cancelled")
                client.close()
            else:
                async def cancel_two() -> None:
                    async with AsyncClient([first.frontend_endpoint, second.frontend_endpoint], timeout=30.0) as client:
                        sleep = client.stub(ECHO).Sleep
                        tasks = []
                        for i in range(2):
                            tasks.append(asyncio.ensure_future(sleep(echo_pb2.SleepRequest(ms=20_000))))
                            for _ in range(500):  # until a broker holds it (5 s at most)
                                if held() == i + 1:
                                    break
                                await asyncio.sleep(0.01)
                        assert first.engine.calls_held == second.engine.calls_held == 1
                        for task in tasks:
                            task.cancel()
                        for _ in range(500):
                            if held() == 0:
                                return
                            await asyncio.sleep(0.01)
                        raise AssertionError("the calls were not cancelled at both brokers")

                asyncio.run(cancel_two())
        assert first.engine.counters["cancelled"] == second.engine.counters["cancelled"] == 2


class _StuckFrontend(FakeFrontend):
    """A broker whose loop is stuck: its connections stay up (libzmq answers ZMTP heartbeats on
    its own) and it answers nothing, Health included, until ``answering`` is set; then it
    answers Health (a loop that came back), and still no call."""

    thread_name = "stuck-frontend"
    answering = False  # set by the test; read by the frontend's thread

    def answer(self, header, payload: bytes):
        if self.answering and (header.service, header.method) == ("zrpc.Broker", "Health"):
            reply = broker_service_pb2.HealthReply(status=broker_service_pb2.HealthReply.SERVING)
            return _protocol.encode_ok_reply_header(header.request_id), reply.SerializeToString()
        return None


def _stuck_and_live(stack: contextlib.ExitStack, ipc_dir: str) -> tuple[_StuckFrontend, list[str]]:
    """A stuck broker and a live one serving Echo; the endpoints, the stuck one first (the
    first link offered the first call)."""
    stuck = _StuckFrontend(f"ipc://{ipc_dir}/stuck-front")
    stack.callback(stuck.stop)
    live = stack.enter_context(_broker(ipc_dir, "live"))
    stack.enter_context(Worker([Echo()], live.backend_endpoint, heartbeat_interval=0.2))
    wait_for(lambda: _serves_echo(live))
    return stuck, [stuck.endpoint, live.frontend_endpoint]


STUCK_TIMEOUT = 3.0  # the stuck broker is probed 1 s after the call and found silent 1 s later


def _check_the_stuck_call(error: zrpc.Error, stuck: _StuckFrontend) -> None:
    assert error.code == zrpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details["zrpc-endpoint"] == stuck.endpoint
    assert "has answered nothing" in error.message and "not even a Health call" in error.message
    assert stuck.count("Health") >= 1  # the probe went to the stuck broker


def test_a_broker_that_answers_nothing_gets_no_calls_until_it_answers_again(ipc_dir, caplog):
    caplog.set_level(logging.INFO, logger="zrpc.client")
    with contextlib.ExitStack() as stack:
        stuck, endpoints = _stuck_and_live(stack, ipc_dir)
        client = stack.enter_context(Client(endpoints, timeout=STUCK_TIMEOUT))
        request = echo_pb2.EchoRequest(payload=b"x").SerializeToString()
        hung = None
        for _ in range(20):  # calls go round the links: one reaches the stuck broker
            future = client.call_future("echo.Echo", "Say", request, idempotent=True)
            wait_for(lambda: future.done() or stuck.count("Say"))
            if not future.done():
                hung = future
                break
        assert hung is not None
        # Idempotent, it goes to the live broker once the stuck one is found silent, within its
        # deadline, and the stuck one is told to cancel it (for when its loop runs again).
        assert hung.result(STUCK_TIMEOUT + 5) == request
        [held] = [header.request_id for header in stuck.requests if header.method == "Say"]
        stuck.wait_for(lambda: held in stuck.cancels)
        assert "answered nothing" in caplog.text and "1 idempotent call(s) sent to it go there too" in caplog.text
        assert stuck.count("Health") >= 1  # the probe went to the stuck broker
        # Silent: every call goes to the live broker, none waits at the stuck one.
        for _ in range(30):
            assert client.call("echo.Echo", "Say", request, timeout=2.0) == request
        assert stuck.count("Say") == 1
        # Its loop comes back: its next probe is answered, and calls go round both again.
        stuck.answering = True
        wait_for(lambda: "answers again" in caplog.text)
        futures = [client.call_future("echo.Echo", "Say", request) for _ in range(4)]
        wait_for(lambda: stuck.count("Say") > 1)
        for future in futures:
            future.cancel()


def test_calls_kept_by_a_silent_broker_move_once_another_broker_comes_up(ipc_dir, caplog):
    """With no other broker up when it fell silent, the idempotent call stays (nowhere else to
    go); once a live broker connects, it moves there within its deadline."""
    caplog.set_level(logging.INFO, logger="zrpc.client")
    with contextlib.ExitStack() as stack:
        stuck = _StuckFrontend(f"ipc://{ipc_dir}/stuck-front")
        stack.callback(stuck.stop)
        later = _broker(ipc_dir, "later")  # not started yet: its endpoint has no broker
        client = stack.enter_context(Client([stuck.endpoint, later.config.frontend], timeout=STUCK_TIMEOUT + 6))
        request = echo_pb2.EchoRequest(payload=b"x").SerializeToString()
        held = client.call_future("echo.Echo", "Say", request, idempotent=True)
        wait_for(lambda: "no other broker can take calls, so they still go to it" in caplog.text)
        assert not held.done()
        stack.enter_context(later)
        stack.enter_context(Worker([Echo()], later.backend_endpoint, heartbeat_interval=0.2))
        assert held.result(STUCK_TIMEOUT + 6) == request
        assert "1 idempotent call(s) sent to it go to another broker, which can take calls now" in caplog.text
        [sent] = [header.request_id for header in stuck.requests if header.method == "Say"]
        stuck.wait_for(lambda: sent in stuck.cancels)


def test_an_async_client_sends_no_calls_to_a_broker_that_answers_nothing(ipc_dir, caplog):
    caplog.set_level(logging.INFO, logger="zrpc.client")
    with contextlib.ExitStack() as stack:
        stuck, endpoints = _stuck_and_live(stack, ipc_dir)
        request = echo_pb2.EchoRequest(payload=b"x").SerializeToString()

        async def scenario() -> None:
            async with AsyncClient(endpoints, timeout=STUCK_TIMEOUT) as client:
                hung = None
                for _ in range(20):  # one call at a time, round the links: one reaches the stuck broker
                    call = asyncio.ensure_future(client.call("echo.Echo", "Say", request))
                    for _ in range(200):  # bounded: either broker takes it within 10 s
                        if call.done() or stuck.count("Say"):
                            break
                        await asyncio.sleep(0.05)
                    if not call.done():
                        hung = call
                        break
                assert hung is not None
                with pytest.raises(zrpc.Error) as failed:
                    await asyncio.wait_for(hung, STUCK_TIMEOUT + 5)
                _check_the_stuck_call(failed.value, stuck)
                sent_there = stuck.count("Say")
                assert sent_there == 1
                replies = await asyncio.gather(*(client.call("echo.Echo", "Say", request, timeout=2.0)
                                                 for _ in range(64)))
                assert replies == [request] * 64
                assert stuck.count("Say") == sent_there
                stuck.answering = True
                for _ in range(100):  # bounded: the next probe comes within 2 s
                    if "answers again" in caplog.text:
                        break
                    await asyncio.sleep(0.05)
                assert "answers again" in caplog.text
                more = [asyncio.ensure_future(client.call("echo.Echo", "Say", request)) for _ in range(4)]
                for _ in range(100):
                    if stuck.count("Say") > sent_there:
                        break
                    await asyncio.sleep(0.05)
                assert stuck.count("Say") > sent_there
                for call in more:
                    call.cancel()

        asyncio.run(scenario())


def test_a_worker_serving_two_brokers_shares_one_capacity_between_them(ipc_dir):
    """§7b: what one broker holds at a worker is not offered to the other. Calls past the
    worker's capacity wait in the second broker's queue, where it shows and where another
    worker could take them, not inside the worker."""
    with contextlib.ExitStack() as stack:
        first, second = _broker(ipc_dir, "first"), _broker(ipc_dir, "second")
        for broker in (first, second):
            stack.enter_context(broker)
        worker = stack.enter_context(Worker([Echo()], [first.backend_endpoint, second.backend_endpoint],
                                            concurrency=2, heartbeat_interval=0.2))
        wait_for(lambda: _serves_echo(first) and _serves_echo(second))
        to_first = stack.enter_context(Client(first.frontend_endpoint, timeout=10.0))
        to_second = stack.enter_context(Client(second.frontend_endpoint, timeout=10.0))
        held = [to_first.stub(ECHO).Sleep.future(echo_pb2.SleepRequest(ms=8000)) for _ in range(2)]
        wait_for(lambda: worker.running == 2)
        [at_second] = second.engine.workers.values()
        wait_for(lambda: at_second.capacity == 0)  # told: the first broker holds both slots
        later = to_second.stub(ECHO).Say.future(echo_pb2.EchoRequest(payload=b"later"))
        wait_for(lambda: second.engine.queue_depth() == 1)
        assert not at_second.in_flight and worker.running == 2 and not worker._admission.waiting
        for future in held:  # CANCEL: the slots free, the second broker hears of it and sends
            future.cancel()
        assert later.result(timeout=10.0).payload == b"later"
        wait_for(lambda: at_second.capacity == 2)
        [at_first] = first.engine.workers.values()
        assert at_first.capacity == 2


def test_a_broker_that_registers_a_busy_worker_again_hears_its_share_at_once(ipc_dir):
    """A READY announces the whole capacity; a worker whose other broker holds calls follows it
    with what this one may hold (a broker restarted on its endpoint, say)."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(_broker(ipc_dir, "first"))
        second = _broker(ipc_dir, "second").start()
        try:
            worker = stack.enter_context(Worker([Echo()], [first.backend_endpoint, second.backend_endpoint],
                                                concurrency=3, heartbeat_interval=0.2))
            wait_for(lambda: _serves_echo(first) and _serves_echo(second))
            client = stack.enter_context(Client(first.frontend_endpoint, timeout=10.0))
            held = [client.stub(ECHO).Sleep.future(echo_pb2.SleepRequest(ms=8000)) for _ in range(2)]
            wait_for(lambda: worker.running == 2)
        finally:
            second.stop()
        again = stack.enter_context(_broker(ipc_dir, "second"))
        wait_for(lambda: _serves_echo(again))
        [worker_there] = again.engine.workers.values()
        wait_for(lambda: worker_there.capacity == 1)
        assert worker_there.announced_capacity == 3
        for future in held:
            future.cancel()
        wait_for(lambda: worker_there.capacity == 3)
