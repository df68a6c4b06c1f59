"""Typed stubs: one attribute per method of a protobuf service, for either client flavour."""
from __future__ import annotations

import concurrent.futures
from typing import Any, Mapping

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from .._descriptors import is_idempotent, message_class
from .._errors import Error
from .._status import StatusCode


class _Method:
    """What a stub method knows: its names, its types, whether the broker may re-dispatch it."""

    __slots__ = ("_client", "service", "name", "output", "idempotent", "_input", "_reply_class")

    def __init__(self, client: Any, method: MethodDescriptor):
        self._client = client
        self.service = method.containing_service.full_name
        self.name = method.name
        self.idempotent = is_idempotent(method)
        self._input = method.input_type.full_name
        self.output = method.output_type.full_name
        self._reply_class = message_class(method.output_type)

    def _encode(self, request: Message) -> bytes:
        # Checked here, before anything is sent: a wrong type would parse "fine" at the worker
        # (protobuf tolerates unknown fields) and fail far from the mistake.
        descriptor = getattr(request, "DESCRIPTOR", None)
        full_name = getattr(descriptor, "full_name", None)
        if full_name != self._input or not hasattr(request, "SerializeToString"):
            got = full_name or type(request).__name__
            raise Error(StatusCode.INVALID_ARGUMENT,
                        f"{self.service}/{self.name} takes a {self._input}, got {got}")
        return request.SerializeToString()

    def _decode(self, raw: bytes) -> Message:
        reply = self._reply_class()
        try:
            reply.ParseFromString(raw)
        except Exception as exc:  # DecodeError, or others on some malformed inputs
            raise Error(StatusCode.INTERNAL,
                        f"reply is not a valid {self.output}: {exc}") from None
        return reply

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.service}/{self.name}({self._input}) -> {self.output}>"


class UnaryMethod(_Method):
    """A method of a blocking stub: ``stub.Method(request)`` or ``stub.Method.future(request)``."""

    __slots__ = ()

    def __call__(self, request: Message, *, timeout: float | None = None,
                 metadata: Mapping[str, str] | None = None) -> Message:
        """Call the method and return its typed reply; raises :class:`zrpc.Error` on failure."""
        return self._client._wait(self.future(request, timeout=timeout, metadata=metadata))

    def future(self, request: Message, *, timeout: float | None = None,
               metadata: Mapping[str, str] | None = None) -> concurrent.futures.Future:
        """Start the call; the future resolves to the typed reply. ``cancel()`` cancels it."""
        return self._client._submit(self.service, self.name, self._encode(request), timeout,
                                    self.idempotent, metadata, self._decode)


class AsyncUnaryMethod(_Method):
    """A method of an asyncio stub: ``await stub.Method(request)``."""

    __slots__ = ()

    async def __call__(self, request: Message, *, timeout: float | None = None,
                       metadata: Mapping[str, str] | None = None) -> Message:
        """Call the method and return its typed reply; raises :class:`zrpc.Error` on failure."""
        return await self._client._call(self.service, self.name, self._encode(request), timeout,
                                        self.idempotent, metadata, self._decode)


class Stub:
    """Methods of one protobuf service bound to a client: ``stub.SayHello(HelloRequest(...))``."""

    def __init__(self, client: Any, service: ServiceDescriptor, method_class: type[_Method]):
        if not isinstance(service, ServiceDescriptor):
            raise TypeError("a stub needs a protobuf ServiceDescriptor, e.g. "
                            f"greeter_pb2.DESCRIPTOR.services_by_name['Greeter']; got {type(service).__name__}")
        self.service = service.full_name
        self.methods: dict[str, _Method] = {}
        for method in service.methods:
            bound = method_class(client, method)
            self.methods[method.name] = bound
            setattr(self, method.name, bound)

    def __repr__(self) -> str:
        return f"<Stub {self.service}: {', '.join(self.methods)}>"
