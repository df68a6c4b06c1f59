"""@zrpc.nonblocking: plain handlers run on the worker's loop, and a wrong mark costs little."""
from __future__ import annotations

import logging
import threading
import time

import pytest

import zrpc
from workers.echo import Echo, echo_pb2
from zrpc._worker._runtime import INLINE_LIMIT
from zrpc.testing import serve


def _thread_name() -> bytes:
    return threading.current_thread().name.encode()


class LoopEcho(Echo):
    """Say answers with the name of the thread that ran it; payload b"slow" makes it overrun."""

    @zrpc.nonblocking
    def Say(self, request, context):
        if request.payload == b"slow":
            time.sleep(INLINE_LIMIT * 2)  # the handler's own behaviour: a wrongly marked handler
        return echo_pb2.EchoReply(payload=_thread_name())


class PoolEcho(Echo):
    """The same, unmarked."""

    def Say(self, request, context):
        return echo_pb2.EchoReply(payload=_thread_name())


def test_a_nonblocking_handler_runs_on_the_loop_thread_and_a_plain_one_in_the_pool():
    with serve(LoopEcho()) as client:
        say = client.stub(Echo.descriptor).Say
        assert {say(echo_pb2.EchoRequest()).payload for _ in range(20)} == {b"zrpc-worker"}
    with serve(PoolEcho()) as client:
        say = client.stub(Echo.descriptor).Say
        assert say(echo_pb2.EchoRequest()).payload.startswith(b"zrpc-handler")


def test_nonblocking_calls_in_one_message_are_all_answered():
    with serve(LoopEcho()) as client:
        say = client.stub(Echo.descriptor).Say
        futures = [say.future(echo_pb2.EchoRequest(payload=b"%d" % i)) for i in range(200)]
        assert [f.result().payload for f in futures] == [b"zrpc-worker"] * 200


def test_a_nonblocking_handler_that_overruns_twice_moves_to_the_pool(caplog):
    with caplog.at_level(logging.WARNING, logger="zrpc.worker"), serve(LoopEcho()) as client:
        say = client.stub(Echo.descriptor).Say
        # One overrun may be the process being descheduled: it stays on the loop.
        assert say(echo_pb2.EchoRequest(payload=b"slow")).payload == b"zrpc-worker"
        assert say(echo_pb2.EchoRequest()).payload == b"zrpc-worker"
        assert say(echo_pb2.EchoRequest(payload=b"slow")).payload == b"zrpc-worker"
        # The second moved it: from now on it runs in a pool thread.
        assert say(echo_pb2.EchoRequest()).payload.startswith(b"zrpc-handler")
    warnings = [r.getMessage() for r in caplog.records if "@nonblocking" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "echo.Echo/Say" in warnings[0] and "handler pool" in warnings[0]


def test_nonblocking_refuses_async_handlers():
    with pytest.raises(TypeError, match="async"):
        class Wrong(Echo):
            @zrpc.nonblocking
            async def Say(self, request, context):
                return echo_pb2.EchoReply()


def test_two_overruns_count_only_within_a_minute():
    """Two pauses a long time apart (a GC pause, a descheduled process) say nothing about the
    handler: the strikes that move it are the ones within _STRIKE_WINDOW."""
    from zrpc._worker import _runtime

    now = [1000.0]
    worker = zrpc.Worker([LoopEcho()], brokers="ipc:///nonexistent/never-started", clock=lambda: now[0])
    key = ("echo.Echo", "Say")
    worker._slow_on_loop(worker.table.methods[key], 0.05)
    now[0] += _runtime._STRIKE_WINDOW + 1
    worker._slow_on_loop(worker.table.methods[key], 0.05)
    assert worker.table.methods[key].nonblocking  # a minute apart: still on the loop
    now[0] += 1
    worker._slow_on_loop(worker.table.methods[key], 0.05)
    assert not worker.table.methods[key].nonblocking  # twice within the minute: moved
