"""echo.Echo: Say returns its payload, Sleep waits (cancellably), Fail fails on demand."""
from __future__ import annotations

import asyncio

import zrpc

from . import echo_pb2


class Echo(zrpc.Service):
    """The benchmark target, and the misbehaviours tests need."""

    descriptor = echo_pb2.DESCRIPTOR.services_by_name["Echo"]

    @zrpc.nonblocking  # it only copies bytes: runs on the worker's loop, no thread hand-off
    def Say(self, request: echo_pb2.EchoRequest, context) -> echo_pb2.EchoReply:
        return echo_pb2.EchoReply(payload=request.payload)

    async def Sleep(self, request: echo_pb2.SleepRequest, context) -> echo_pb2.EchoReply:
        # An async handler: cancelling the call (CANCEL, deadline) cancels this sleep.
        await asyncio.sleep(request.ms / 1000)
        return echo_pb2.EchoReply(payload=request.payload)

    def Fail(self, request: echo_pb2.FailRequest, context) -> echo_pb2.EchoReply:
        try:
            code = zrpc.StatusCode(request.code)
        except ValueError:
            raise zrpc.Error(zrpc.StatusCode.INVALID_ARGUMENT, f"unknown status code {request.code}") from None
        if code == zrpc.StatusCode.OK:
            raise zrpc.Error(zrpc.StatusCode.INVALID_ARGUMENT, "Fail needs a code other than OK (0)")
        raise zrpc.Error(code, request.message)
