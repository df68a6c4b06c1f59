"""helloworld.Greeter: SayHello answers "Hello, <name>!"."""
from __future__ import annotations

import zrpc

from . import helloworld_pb2


class Greeter(zrpc.Service):
    """Greets whoever calls, by name."""

    descriptor = helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"]

    def SayHello(self, request: helloworld_pb2.HelloRequest, context) -> helloworld_pb2.HelloReply:
        if not request.name:
            raise zrpc.Error(zrpc.StatusCode.INVALID_ARGUMENT, "name must not be empty")
        return helloworld_pb2.HelloReply(message=f"Hello, {request.name}!")
