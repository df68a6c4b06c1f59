"""A broker that dies takes the calls it holds with it: the client fails them UNAVAILABLE at once
(not at their deadlines), the retry policy sends the idempotent ones again once a broker is back,
and calls another broker holds are untouched. Brokers are real processes, killed by PID."""
from __future__ import annotations

import asyncio
import signal

import pytest

import zrpc
from zrpc import AsyncClient, Client, StatusCode, Worker
from workers.echo import Echo, echo_pb2

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


def test_a_broker_that_dies_fails_only_the_calls_it_may_hold(spawn, ipc_dir):
    """With several brokers, a call is failed once every connection open when it was sent has
    closed (the DEALER does not say which broker took it): a call sent while only the first
    broker was connected survives the death of a second one that came up later, and fails when
    the first dies."""
    first, first_front, first_back = _start_broker(spawn, ipc_dir, "first")
    second_front, second_back = f"ipc://{ipc_dir}/second-front", f"ipc://{ipc_dir}/second-back"
    with Worker([Echo()], [first_back, second_back], concurrency=4, heartbeat_interval=0.2, drain_grace=0.5) as worker, \
            Client([first_front, second_front], timeout=CALL_TIMEOUT) as client:
        wait_until_served(first_front, "echo.Echo")
        open_connections = lambda: len(client._core._open)
        wait_for(lambda: open_connections() == 1, message="the client's connection to the first broker")
        survivor = client.call_future("echo.Echo", "Sleep", _sleep_request(1_000, b"survives"))
        wait_for(lambda: worker.running == 1, message="the call to reach the worker")

        second, *_ = _start_broker(spawn, ipc_dir, "second")
        wait_for(lambda: open_connections() == 2, message="the client's connection to the second broker")
        second.signal(signal.SIGKILL)
        wait_for(lambda: open_connections() == 1, message="the client to see the second broker go")
        assert echo_pb2.EchoReply.FromString(survivor.result(timeout=ANSWER_WITHIN)).payload == b"survives"

        lost = client.call_future("echo.Echo", "Sleep", _sleep_request(30_000))
        wait_for(lambda: worker.running == 1, message="the second call to reach the worker")
        first.signal(signal.SIGKILL)
        error = lost.exception(timeout=ANSWER_WITHIN)
    assert isinstance(error, zrpc.Error) and error.code == StatusCode.UNAVAILABLE, error
    assert error.details["zrpc-endpoint"] == first_front
