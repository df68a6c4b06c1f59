"""Services that tests run as worker processes: `zrpc worker run tests._services:SlowEcho`."""
from __future__ import annotations

import os
import threading

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
