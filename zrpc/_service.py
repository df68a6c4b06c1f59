"""Service definitions: a class per protobuf service, one method per rpc, and the call context.

    class Greeter(zrpc.Service):
        descriptor = helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"]

        def SayHello(self, request, context):          # runs in the worker's thread pool
            return helloworld_pb2.HelloReply(message=f"Hello, {request.name}!")

A handler defined with ``async def`` runs on the worker's asyncio loop instead, and is cancelled
(``asyncio.CancelledError``) when its call is cancelled or its deadline passes.

A plain handler marked ``@zrpc.nonblocking`` (it computes and returns, never waits on I/O or
locks) runs on the loop too, straight from the message that brought it: no hand-off to a pool
thread and back. The worker times it; one that takes longer than ``INLINE_LIMIT`` twice within a
minute is moved to the pool for good, with a warning, so a wrong mark costs two slow calls, not
the heartbeats.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable
from typing import Any, ClassVar

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from ._descriptors import message_class

# (spec §7) Service names the broker keeps for itself.
RESERVED_PREFIX = "zrpc."

# The attribute @nonblocking sets on a handler function.
_NONBLOCKING_MARK = "__zrpc_nonblocking__"


def nonblocking(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a plain (``def``) handler as one that never blocks: the worker runs it on its loop.

    For handlers that only compute, and quickly (well under ``INLINE_LIMIT``): the thread
    hand-off it saves costs more than such a handler does. Raises TypeError on ``async def``
    handlers, which run on the loop already.
    """
    if inspect.iscoroutinefunction(handler):
        raise TypeError(f"{handler.__qualname__} is async: it runs on the worker's loop already; "
                        f"@zrpc.nonblocking is for plain (def) handlers")
    if not callable(handler):
        raise TypeError(f"@zrpc.nonblocking needs a function, got {handler!r}")
    setattr(handler, _NONBLOCKING_MARK, True)
    return handler


class Service:
    """Base class of a service: set ``descriptor`` and define one method per rpc, same name.

    Missing handlers are reported when the class is created (and again when a Worker starts,
    for a descriptor set later), as one ``TypeError`` naming all of them.
    """

    descriptor: ClassVar[ServiceDescriptor | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.descriptor is not None:
            check_service(cls)


class Context:
    """What a handler knows about its call. Built by the worker; tests may build one directly.

    ``deadline`` is a ``time.monotonic()`` value, or None when the call has none.
    """

    __slots__ = (
        "_cancelled",
        "_clock",
        "_task",
        "attempt",
        "deadline",
        "metadata",
        "method",
        "request_id",
        "service",
        "trace_id",
    )

    def __init__(self, *, request_id: int = 0, service: str = "", method: str = "", trace_id: str = "",
                 metadata: dict[str, str] | None = None, attempt: int = 1, deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.request_id = request_id
        self.service = service
        self.method = method
        self.trace_id = trace_id
        self.metadata = metadata if metadata is not None else {}
        self.attempt = attempt
        self.deadline = deadline
        self._cancelled = False
        self._task = None  # the asyncio task of an async handler, so a cancel can reach it
        self._clock = clock

    @property
    def cancelled(self) -> bool:
        """True once the call was cancelled or its deadline has passed: stop working on it."""
        return self._cancelled or (self.deadline is not None and self._clock() >= self.deadline)

    def time_remaining(self) -> float | None:
        """Seconds left until the deadline (0.0 once passed), or None when there is none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self._clock())

    def cancel(self) -> None:
        """Mark the call cancelled and cancel its async handler, if any (the worker calls this)."""
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()

    @classmethod
    def _for_call(cls, request_id: int, service: str, method: str, metadata: dict[str, str], attempt: int,
                  deadline: float | None) -> "Context":
        """The worker's constructor, once per call: positional, without the keyword defaults
        (0.15 against 0.35 us)."""
        context = object.__new__(cls)
        context.request_id = request_id
        context.service = service
        context.method = method
        context.trace_id = metadata.get("trace_id", "")
        context.metadata = metadata
        context.attempt = attempt
        context.deadline = deadline
        context._cancelled = False
        context._task = None
        context._clock = time.monotonic
        return context

    def __repr__(self) -> str:
        return (f"Context(request_id={self.request_id}, {self.service}/{self.method}, "
                f"attempt={self.attempt}, cancelled={self.cancelled})")


@dataclasses.dataclass(frozen=True, slots=True)
class Method:
    """One rpc of a service with its handler and message classes, as a worker serves it."""

    service: str
    name: str
    descriptor: MethodDescriptor
    handler: Callable[..., Any]
    is_async: bool
    nonblocking: bool  # marked @nonblocking: run on the loop (see the module's docstring)
    input_class: type
    output_descriptor: Any
    output_class: type


def check_service(service: Service | type[Service]) -> ServiceDescriptor:
    """Validate a Service class or instance; return its descriptor.

    Raises TypeError for a missing or wrong descriptor, for streaming rpcs (zrpc calls are unary)
    and for missing handlers (all named in one message), ValueError for a service name reserved
    for the broker.
    """
    cls = service if isinstance(service, type) else type(service)
    descriptor = service.descriptor
    if not isinstance(descriptor, ServiceDescriptor):
        raise TypeError(f"{cls.__name__}.descriptor must be a protobuf ServiceDescriptor, e.g. "
                        f"helloworld_pb2.DESCRIPTOR.services_by_name['Greeter']; got {descriptor!r}")
    if descriptor.full_name.startswith(RESERVED_PREFIX):
        raise ValueError(f"{cls.__name__}: service names starting {RESERVED_PREFIX!r} are reserved for the "
                         f"broker; rename the package of {descriptor.full_name}")
    streaming = [f"{m.name} ({'client' if m.client_streaming else 'server'}-streaming)"
                 for m in descriptor.methods if m.client_streaming or m.server_streaming]
    if streaming:  # served as unary calls, they would answer with one message, silently wrong
        raise TypeError(f"{cls.__name__}: zrpc serves unary rpcs only, and {descriptor.full_name} declares "
                        f"streaming ones: {', '.join(streaming)}")
    missing = [m.name for m in descriptor.methods if not callable(getattr(service, m.name, None))]
    if missing:
        raise TypeError(f"{cls.__name__} is missing handlers for: {', '.join(missing)} "
                        f"(service {descriptor.full_name})")
    # A handler that cannot take (request, context) would fail every call INTERNAL (a tester's
    # `def Divide(self, request)`): said now, with the others.
    wrong = [f"{m.name}{signature}" for m in descriptor.methods
             if (signature := _unfit_signature(service, m.name)) is not None]
    if wrong:
        raise TypeError(f"{cls.__name__}: handlers are called with (request, context), and these cannot take "
                        f"that: {', '.join(wrong)} (service {descriptor.full_name})")
    return descriptor


def _unfit_signature(service: Any, name: str) -> str | None:
    """The signature of handler ``name`` of a Service class or instance if it cannot be called
    with (request, context), else None."""
    arguments = (None, None)
    handler = getattr(service, name)
    if isinstance(service, type):
        # On a class, judge only what binds plainly: a function takes self too; a staticmethod
        # or classmethod is called as it is. Other descriptors (functools.partialmethod, a
        # decorator class) bind in their own way: judged on the instance when a worker starts.
        raw = inspect.getattr_static(service, name)
        if inspect.isfunction(raw):
            arguments = (None, None, None)
        elif not isinstance(raw, (staticmethod, classmethod)):
            return None
    try:
        # Not through __wrapped__: a decorator may call its function with more (a db, say).
        signature = inspect.signature(handler, follow_wrapped=False)
    except (TypeError, ValueError):  # a builtin or callable object without one: trust it
        return None
    try:
        signature.bind(*arguments)
    except TypeError:
        return str(signature)
    return None


def methods_of(service: Service) -> dict[str, Method]:
    """The rpcs of a service instance, by method name, ready to serve."""
    descriptor = check_service(service)
    table = {}
    for method in descriptor.methods:
        handler = getattr(service, method.name)
        table[method.name] = Method(
            service=descriptor.full_name,
            name=method.name,
            descriptor=method,
            handler=handler,
            is_async=inspect.iscoroutinefunction(handler),
            nonblocking=getattr(handler, _NONBLOCKING_MARK, False),
            input_class=message_class(method.input_type),
            output_descriptor=method.output_type,
            output_class=message_class(method.output_type),
        )
    return table
