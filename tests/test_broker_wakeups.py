"""The broker never sleeps on a message it holds (zrpc/_broker/_poller.py).

The loop waits in poll() on its sockets' ZMQ_FDs, which are edge-triggered: any send or receive
may take a socket's signal, so the loop must mark every socket it used and ask it before it
sleeps. A use left unmarked does not lose a call outright: the message waits until something
else wakes the loop (a tick, a heartbeat, a client's probe), so ordinary tests see only a slower
call. Here everything else that wakes the broker is pushed out of the test's reach (a 120 s
tick, 30 s worker heartbeats, client probes after 300 s): a message the loop sleeps on waits
until the earliest held call's 10 s deadline, and the test's bounded wait (5 s) or that call's
deadline fails it. Whether a burst's messages are pending together depends on timing, so the
burst tests run several times (one run caught a missing mark 9 times in 15, in a review).

The load crosses every way the loop uses a socket: reads stopped at a small batch bound, replies
sent while more requests arrive, many clients at once, and connections opening and closing
(the monitors' events, read in the same loop).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

import zrpc
from workers.echo import Echo, echo_pb2
from zrpc import Broker, BrokerConfig, Worker
from zrpc._broker import _loop
from zrpc._client import _core, _silence

from .conftest import wait_for, wait_until_served

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
CALL_TIMEOUT = 10.0  # far beyond any call here, far below the broker's tick
PIPELINED = 64  # asyncio calls in flight
SEQUENTIAL_CLIENTS = 3
CALLS_EACH = 150
SHORT_LIVED_CLIENTS = 15
BURST = 12  # calls sent at once, several times the read bound
GATED_WORKERS = 4


ROUNDS = 4  # runs of each burst test


@pytest.fixture
def nothing_else_wakes_the_broker(monkeypatch):
    monkeypatch.setattr(_silence, "PROBE_AFTER", 300.0)  # a client probes a silent broker after this
    # ...and its deadline error says "that broker answers" after this, as if it had probed it.
    monkeypatch.setattr(_core, "_SILENCE_KNOWN_AFTER", 300.0)
    monkeypatch.setattr(_loop, "_BATCH", 2)  # reads stop at the bound: the next round must read on


def _broker(endpoints, **settings) -> Broker:
    frontend, backend = endpoints
    settings.setdefault("unknown_service_grace", 0.0)
    return Broker(BrokerConfig(frontend=frontend, backend=backend, tick_interval=120.0,
                               log_level="WARNING", **settings)).start()


class GatedEcho(Echo):
    """echo.Echo whose Say answers once ``gate`` is set (bounded: it answers anyway after 20 s)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()

    def Say(self, request, context):
        with self._lock:
            self.waiting += 1
        self.gate.wait(20.0)
        return echo_pb2.EchoReply(payload=request.payload)


async def _burst(frontend: str, until_sent=None) -> list[bytes]:
    """BURST calls at once, each from a client of its own (one message each: a client coalesces
    its calls); ``until_sent`` runs in a thread meanwhile, and the calls are awaited after it."""
    clients = [zrpc.AsyncClient(frontend, timeout=CALL_TIMEOUT) for _ in range(BURST)]
    calls = [asyncio.ensure_future(client.stub(ECHO).Say(echo_pb2.EchoRequest(payload=b"%d" % i)))
             for i, client in enumerate(clients)]
    try:
        if until_sent is not None:
            await asyncio.get_running_loop().run_in_executor(None, until_sent)
        return [reply.payload for reply in await asyncio.gather(*calls)]
    finally:
        for client in clients:
            await client.close()
        await asyncio.gather(*calls, return_exceptions=True)  # a failure above already says why


@pytest.mark.parametrize("run", range(ROUNDS))
def test_requests_left_at_the_read_bound_are_read_with_nothing_else_arriving(endpoints, nothing_else_wakes_the_broker, run):
    """No worker yet: the requests only queue, so no round sends anything that would mark the
    frontend used. The broker must read the whole burst on its own (a queue of BURST calls)."""
    broker = _broker(endpoints, unknown_service_grace=60.0)  # calls wait for a worker to come
    frontend, backend = endpoints
    worker = Worker([Echo()], brokers=backend, heartbeat_interval=30.0)
    try:
        def all_queued() -> None:
            wait_for(lambda: broker.engine.queue_depth() == BURST, timeout=5.0,
                     message=f"the broker to read all {BURST} requests")
            worker.start()  # then they are served

        assert asyncio.run(_burst(frontend, all_queued)) == [b"%d" % i for i in range(BURST)]
    finally:
        worker.stop()
        broker.stop()


@pytest.mark.parametrize("run", range(ROUNDS))
def test_replies_left_at_the_read_bound_are_read_with_nothing_else_arriving(endpoints, nothing_else_wakes_the_broker, run):
    """Every call is held at a worker, then all are answered at once: the replies of several
    workers arrive together, and no request follows them (nothing more to send to a worker)."""
    frontend, backend = endpoints
    broker = _broker(endpoints)
    service = GatedEcho()
    with contextlib.ExitStack() as workers:
        try:
            for _ in range(GATED_WORKERS):
                workers.enter_context(Worker([service], brokers=backend, heartbeat_interval=30.0,
                                             concurrency=BURST // GATED_WORKERS))
            wait_for(lambda: broker.engine.workers and len(broker.engine.workers) == GATED_WORKERS,
                     message="the workers to register")

            def all_at_the_workers() -> None:
                wait_for(lambda: service.waiting == BURST, timeout=5.0, message="every call to reach a worker")
                service.gate.set()

            assert asyncio.run(_burst(frontend, all_at_the_workers)) == [b"%d" % i for i in range(BURST)]
        finally:
            service.gate.set()
            broker.stop()


def _sequential_calls(frontend: str, name: str, results: dict) -> None:
    """(a thread) Its replies, or the error that ended it, in ``results[name]``."""
    try:
        with zrpc.Client(frontend, timeout=CALL_TIMEOUT) as client:
            stub = client.stub(ECHO)
            results[name] = [stub.Say(echo_pb2.EchoRequest(payload=f"{name}-{i}".encode())).payload
                             for i in range(CALLS_EACH)]
    except Exception as exc:  # noqa: BLE001 - the test's assertion shows it
        results[name] = exc


def _short_lived_clients(frontend: str, results: dict) -> None:
    """(a thread) As _sequential_calls, each call from a client of its own, in ``results["brief"]``."""
    answers = []
    try:
        for i in range(SHORT_LIVED_CLIENTS):  # each opens a connection, makes one call, closes it
            with zrpc.Client(frontend, timeout=CALL_TIMEOUT) as client:
                answers.append(client.stub(ECHO).Say(echo_pb2.EchoRequest(payload=b"brief-%d" % i)).payload)
        results["brief"] = answers
    except Exception as exc:  # noqa: BLE001 - the test's assertion shows it
        results["brief"] = exc


async def _pipelined_calls(frontend: str) -> list[bytes]:
    async with zrpc.AsyncClient(frontend, timeout=CALL_TIMEOUT) as client:
        stub = client.stub(ECHO)

        async def caller(task: int) -> list[bytes]:
            return [(await stub.Say(echo_pb2.EchoRequest(payload=b"%d-%d" % (task, i)))).payload
                    for i in range(CALLS_EACH // 5)]

        return await asyncio.gather(*(caller(task) for task in range(PIPELINED)))


def test_no_call_waits_for_a_tick_under_mixed_load(endpoints, nothing_else_wakes_the_broker):
    """Pipelined asyncio calls, sequential clients and short-lived ones at once (monitor events)."""
    frontend, backend = endpoints
    broker = _broker(endpoints)
    try:
        with Worker([Echo()], brokers=backend, heartbeat_interval=30.0):
            wait_until_served(frontend, ECHO.full_name)
            results: dict = {}
            threads = [threading.Thread(target=_sequential_calls, args=(frontend, f"seq{n}", results))
                       for n in range(SEQUENTIAL_CLIENTS)]
            threads.append(threading.Thread(target=_short_lived_clients, args=(frontend, results)))
            for thread in threads:
                thread.start()
            try:
                pipelined = asyncio.run(_pipelined_calls(frontend))
            finally:
                for thread in threads:
                    thread.join(timeout=3 * CALL_TIMEOUT)
            assert not any(thread.is_alive() for thread in threads)
            assert pipelined == [[b"%d-%d" % (task, i) for i in range(CALLS_EACH // 5)] for task in range(PIPELINED)]
            for n in range(SEQUENTIAL_CLIENTS):
                assert results[f"seq{n}"] == [f"seq{n}-{i}".encode() for i in range(CALLS_EACH)]
            assert results["brief"] == [b"brief-%d" % i for i in range(SHORT_LIVED_CLIENTS)]
            assert broker.engine.counters["deadline_exceeded"] == 0
    finally:
        broker.stop()
