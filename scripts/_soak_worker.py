"""The soak run's worker: workers.echo's Echo, logging every execution it starts (issue 3, I4/I5).

Each process appends one JSON line per handler start to ``$ZRPC_SOAK_EXEC_LOG/exec-<pid>.jsonl``
with a single O_APPEND write, so a worker killed -9 loses no line it had begun to act on.
Times are ``time.monotonic()``: one clock for every process on the machine, so the soak run can
compare them with its clients' deadlines.
"""
from __future__ import annotations

import json
import os
import time

from workers.echo import Echo


class LoggedEcho(Echo):
    """Echo whose Say and Sleep first record what they are about to execute."""

    def __init__(self):
        directory = os.environ["ZRPC_SOAK_EXEC_LOG"]
        self._log_fd = os.open(os.path.join(directory, f"exec-{os.getpid()}.jsonl"),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _record(self, request, context) -> None:
        line = json.dumps({"payload": request.payload.decode(), "method": context.method,
                           "dispatch": context.attempt, "pid": os.getpid(), "t": time.monotonic()})
        os.write(self._log_fd, line.encode() + b"\n")

    def Say(self, request, context):
        self._record(request, context)
        return super().Say(request, context)

    async def Sleep(self, request, context):
        self._record(request, context)
        return await super().Sleep(request, context)
