"""An Echo whose handlers log with plain ``logging`` (the trace id test runs it as a worker)."""
from __future__ import annotations

import logging

from workers.echo import Echo, echo_pb2

log = logging.getLogger("chatty")


class Chatty(Echo):
    def Say(self, request, context):
        log.info("saying %d bytes", len(request.payload))
        return echo_pb2.EchoReply(payload=request.payload)

    async def Sleep(self, request, context):
        log.info("sleeping %d ms", request.ms)
        return echo_pb2.EchoReply(payload=request.payload)
