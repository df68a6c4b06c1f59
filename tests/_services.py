"""Services that tests run as worker processes: `zrpc worker run tests._services:SlowEcho`."""
from __future__ import annotations

import os
import threading
import time

import zrpc
from workers.echo import Echo, echo_pb2


class SlowEcho(Echo):
    """echo.Echo whose idempotent Say waits ``sleep_ms`` (call metadata) before answering.

    Its replies carry the worker's PID, so a test can tell who served each call.
    """

    def Say(self, request, context):
        wait = float(context.metadata.get("sleep_ms", "0")) / 1000
        stop = threading.Event()
        # Wake early on cancellation: poll the context in short bounded steps.
        steps = max(1, int(wait / 0.01))
        for _ in range(steps):
            if context.cancelled or stop.wait(wait / steps):
                break
        return echo_pb2.EchoReply(payload=b"%d:" % os.getpid() + request.payload)


class HangingEcho(Echo):
    """echo.Echo whose Say never returns on its own (a hung handler), for as long as ``hang_s``.

    It ignores cancellation but records it: when the broker's CANCEL reaches it (not merely its
    deadline passing), it creates the file ``cancel_marker`` (call metadata), then hangs on.
    """

    def Say(self, request, context):
        marker = context.metadata.get("cancel_marker")
        give_up_at = time.monotonic() + float(context.metadata.get("hang_s", "60"))
        never = threading.Event()
        while time.monotonic() < give_up_at:  # bounded, so a forgotten process still ends
            if marker and context._cancelled:  # CANCEL from the broker, not our own clock
                with open(marker, "w"):
                    pass
                marker = None
            never.wait(0.01)
        return echo_pb2.EchoReply(payload=b"%d:" % os.getpid() + request.payload)


class DetailedFailEcho(Echo):
    """echo.Echo whose Fail fails as Fail does, with details ``field: b`` and ``hint: <message>``."""

    def Fail(self, request, context):
        raise zrpc.Error(zrpc.StatusCode(request.code or zrpc.StatusCode.INVALID_ARGUMENT),
                         request.message, {"field": "b", "hint": request.message})


class StallingEcho(Echo):
    """echo.Echo whose Say answers its first ``ANSWERED`` calls at once, then stops answering (a
    worker that hangs mid-run), each later call held until cancelled or for at most 30 s."""

    ANSWERED = 20
    _lock = threading.Lock()
    _calls = 0

    def Say(self, request, context):
        with StallingEcho._lock:
            StallingEcho._calls += 1
            stall = StallingEcho._calls > self.ANSWERED
        held = threading.Event()
        for _ in range(3000 if stall else 0):  # 10 ms steps: bounded, and wakes on cancellation
            if context.cancelled or held.wait(0.01):
                break
        return echo_pb2.EchoReply(payload=request.payload)
