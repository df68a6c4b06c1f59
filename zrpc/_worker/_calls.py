"""The worker's pure part: a call's life from REQUEST pair to REPLY pair, and its capacity.

No sockets and no event loop here: the runtime feeds decoded headers in and sends what comes out.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .. import _protocol as p
from .._errors import Error
from .._logging import TRACE_ID
from .._service import Context, Method, Service, methods_of
from .._status import StatusCode

log = logging.getLogger("zrpc.worker")

# What the worker sends back for a call: its reply header and payload, and the status code the
# header holds (kept beside it so the metrics need not decode what we just encoded).
Answer = tuple[bytes, bytes, StatusCode]

# The marker that asks the broker to give a call this worker never ran to another worker.
DRAINING = p.DRAINING


class HandlerTable:
    """Every (service, method) a worker serves, from its Service instances."""

    def __init__(self, services: Iterable[Service | type[Service]]):
        self.services: list[Service] = []
        self.methods: dict[tuple[str, str], Method] = {}
        names: list[str] = []
        for service in services:
            if isinstance(service, type):
                service = service()  # `Worker(services=[Greeter])` works as `[Greeter()]` does
            if not isinstance(service, Service):
                raise TypeError(f"{service!r} is not a zrpc.Service instance")
            methods = methods_of(service)  # raises, naming every missing handler
            name = service.descriptor.full_name
            if name in names:
                raise ValueError(f"service {name} is given twice")
            names.append(name)
            self.services.append(service)
            for method in methods.values():
                self.methods[(name, method.name)] = method
        if not self.services:
            raise ValueError("a worker needs at least one service")
        self.names = names

    @property
    def descriptors(self) -> list:
        return [service.descriptor for service in self.services]


@dataclasses.dataclass(slots=True, eq=False)
class Call:
    """One request held by the worker, from its arrival until its reply is sent."""

    request_id: int
    method: Method
    request: Any
    context: Context
    link: Any  # the broker connection it came from: its reply goes back there
    epoch: int  # that connection's registration; a call from an older one gets no reply
    started: bool = False
    started_at: float = 0.0  # when its handler started (the handler latency metric)
    timer: Any = None  # the asyncio handle that cancels an async handler at its deadline


def new_call(header, payload: bytes, method: Method, link: Any, epoch: int, now: float) -> Call:
    """A Call for a decoded header; raises Error(INVALID_ARGUMENT) for a payload of another type."""
    try:
        request = method.input_class.FromString(payload)
    except Exception:  # noqa: BLE001 - DecodeError, or others on some malformed inputs
        raise Error(StatusCode.INVALID_ARGUMENT,
                    f"payload is not a valid {method.descriptor.input_type.full_name}") from None
    # dict() or .items() of a protobuf map go through the Mapping ABC: 0.61 us against 0.21.
    fields = header.metadata
    metadata = {key: fields[key] for key in fields} if fields else {}
    deadline_ms = header.deadline_ms
    attempt = header.attempt or 1  # the broker's dispatch: 2 after its worker died
    if metadata and p.ATTEMPT_METADATA in metadata:  # and the client's retry
        attempt += _retry_number(metadata[p.ATTEMPT_METADATA]) - 1
    context = Context._for_call(header.request_id, method.service, method.name, metadata, attempt,
                               now + deadline_ms / 1000.0 if deadline_ms else None)
    return Call(context.request_id, method, request, context, link, epoch)


def _retry_number(text: str) -> int:
    """A client's attempt number from its metadata; 1 for anything that is not one."""
    # isascii: "²".isdigit() is true, and int() refuses it (review: it escaped the worker's loop).
    return int(text) if text.isascii() and text.isdigit() and 1 <= len(text) <= 3 else 1


# A reply header over the broker's MAX_HEADER_BYTES (64 KiB, spec §9) is refused, and the caller
# gets RESOURCE_EXHAUSTED instead of the handler's code (a tester's 200 KB validation message):
# an error's texts are cut to fit, well inside it.
_ERROR_HEADER_BYTES = 40_960  # above it, texts are cut
_ERROR_MESSAGE_BYTES = 16_384
_ERROR_DETAIL_BYTES = 1_024
_ERROR_DETAILS_BYTES = 16_384


def error_pair(request_id: int, error: Error) -> Answer:
    """The answer to a call that failed with ``error`` (its texts cut to fit a reply header)."""
    raw = p.encode_reply_header(request_id, error.code, error.message, error.details)
    if len(raw) > _ERROR_HEADER_BYTES:
        message, details = _fitted(error.message, error.details)
        raw = p.encode_reply_header(request_id, error.code, message, details)
        if len(raw) > _ERROR_HEADER_BYTES:  # many tiny details: each map entry costs bytes too (review)
            raw = p.encode_reply_header(request_id, error.code, message, _left_out(len(error.details)))
    return raw, b"", error.code


def _fitted(message: str, details: dict[str, str]) -> tuple[str, dict[str, str]]:
    cut_message = _cut(message, _ERROR_MESSAGE_BYTES)
    fitted, room = {}, _ERROR_DETAILS_BYTES
    for key, value in details.items():
        key, value = _cut(key, 256), _cut(value, _ERROR_DETAIL_BYTES)
        size = len(key.encode()) + len(value.encode())
        if size > room:
            fitted.update(_left_out(len(details) - len(fitted)))
            break
        fitted[key], room = value, room - size
    if cut_message is not message or fitted != details:
        log.warning("an error's message or details were cut to fit a reply header (%d characters of message, "
                    "%d details)", len(message), len(details))
    return cut_message, fitted


def _left_out(count: int) -> dict[str, str]:
    return {"zrpc-cut": f"{count} detail(s) left out: the reply header has a size limit"}


def _cut(text: str, limit: int) -> str:
    """``text`` if its UTF-8 form fits ``limit`` bytes, else its start and how much was cut."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore") + f"... [{len(raw) - limit:,} bytes cut]"


def result_pair(call: Call, result: Any) -> Answer:
    """The answer to a call whose handler returned ``result`` (INTERNAL if it is not the reply type)."""
    if type(result) is not call.method.output_class and not _is_message_of(result, call.method):
        expected = call.method.output_descriptor.full_name
        log.error("%s/%s returned %s instead of %s", call.context.service, call.context.method,
                  type(result).__name__, expected)
        return error_pair(call.request_id, Error(
            StatusCode.INTERNAL, f"handler returned {type(result).__name__}, expected {expected}"))
    try:
        payload = result.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - e.g. a proto2 reply missing a required field
        return exception_pair(call, exc)
    if len(payload) > call.link.max_message_bytes:
        # (spec §9) Past the broker's frame cap ZeroMQ would drop our connection, and with it
        # every call we hold; below that the broker would refuse it anyway.
        log.error("%s/%s returned a reply of %d bytes, over max_message_bytes (%d)", call.context.service,
                  call.context.method, len(payload), call.link.max_message_bytes)
        return error_pair(call.request_id, Error(
            StatusCode.RESOURCE_EXHAUSTED, f"reply is {len(payload):,} bytes, over the worker's max_message_bytes "
                                           f"({call.link.max_message_bytes:,})"))
    return p.encode_ok_reply_header(call.request_id), payload, StatusCode.OK


def _is_message_of(result: Any, method: Method) -> bool:
    """A reply of the method's output type from another class than ours (a dynamic message class
    built from the same descriptor, say): what counts is the full name."""
    descriptor = getattr(result, "DESCRIPTOR", None)
    return (getattr(descriptor, "full_name", None) == method.output_descriptor.full_name
            and hasattr(result, "SerializeToString"))


def exception_pair(call: Call, exc: BaseException) -> Answer:
    """The answer to a call whose handler raised (spec §10: INTERNAL carries type and message only)."""
    if isinstance(exc, Error) and exc.code == StatusCode.OK:  # .code set to OK after the fact
        exc = Error(StatusCode.INTERNAL, "handler raised zrpc.Error with code OK (return the reply instead)")
    if isinstance(exc, Error):
        if p.RETRY_DETAIL in exc.details:
            # "Never ran" is the runtime's word, not a handler's: a handler that re-raises the
            # refusal of a draining broker it called did run (and the broker would re-queue it).
            exc = Error(exc.code, exc.message, {k: v for k, v in exc.details.items() if k != p.RETRY_DETAIL})
        return error_pair(call.request_id, exc)
    log.error("%s/%s failed (request %d)", call.context.service, call.context.method, call.request_id,
              exc_info=(type(exc), exc, exc.__traceback__))
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return error_pair(call.request_id, Error(StatusCode.INTERNAL, message))


def stopped_pair(call: Call, now: float) -> Answer:
    """The answer to a call stopped before it finished (or finished too late): by its deadline or
    by a CANCEL. Past its deadline it is DEADLINE_EXCEEDED even if a CANCEL came first: the
    broker cancels a call at its deadline, a little before the worker's clock says so."""
    context = call.context
    if context.deadline is not None and now >= context.deadline:
        return error_pair(call.request_id, Error(StatusCode.DEADLINE_EXCEEDED, "deadline passed at the worker"))
    return error_pair(call.request_id, Error(StatusCode.CANCELLED, "call cancelled"))


def run_sync(call: Call) -> Answer:
    """Run a plain handler and build its answer (in a pool thread: serialising there too)."""
    token = TRACE_ID.set(call.context.trace_id)  # the handler's log lines carry the trace id
    try:
        try:
            result = call.method.handler(call.request, call.context)
        except BaseException as exc:  # noqa: BLE001 - the worker must answer whatever happened
            return answer_of(exception_pair, call, exc)
        return answer_of(result_pair, call, result)
    finally:
        TRACE_ID.reset(token)


def answer_of(build: Callable[[Call, Any], Answer], call: Call, outcome: Any) -> Answer:
    """``build(call, outcome)``, or INTERNAL when building the answer fails itself (an exception
    whose str() raises, say): every call gets an answer, and no pool thread dies of one."""
    try:
        return build(call, outcome)
    except Exception as exc:  # noqa: BLE001
        log.error("%s/%s: could not build the answer to request %d", call.context.service, call.context.method,
                  call.request_id, exc_info=(type(exc), exc, exc.__traceback__))
        return error_pair(call.request_id, Error(
            StatusCode.INTERNAL, f"the worker could not encode the handler's outcome ({type(exc).__name__})"))


class Admission:
    """Capacity: at most ``capacity`` calls run at once; the others wait here in arrival order."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.running = 0
        self.waiting: collections.deque[Call] = collections.deque()

    def admit(self, call: Call) -> bool:
        """True when ``call`` may start now; otherwise it waits its turn."""
        if self.running < self.capacity:
            self.running += 1
            return True
        self.waiting.append(call)
        return False

    def release(self) -> None:
        """A running call finished."""
        self.running -= 1

    def take(self) -> Call | None:
        """The next waiting call, now counted as running, when a slot is free."""
        if self.waiting and self.running < self.capacity:
            self.running += 1
            return self.waiting.popleft()
        return None

    def withdraw(self, call: Call) -> bool:
        """Remove a call that has not started (cancelled, orphaned); False if it is not waiting."""
        try:
            self.waiting.remove(call)
        except ValueError:
            return False
        return True

    def withdraw_all(self, keep: Callable[[Call], bool] = lambda call: False) -> list[Call]:
        """Remove and return every waiting call for which ``keep`` is false."""
        gone = [call for call in self.waiting if not keep(call)]
        self.waiting = collections.deque(call for call in self.waiting if keep(call))
        return gone
