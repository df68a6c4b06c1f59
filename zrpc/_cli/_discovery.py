"""The CLI's side of the broker's built-in ``zrpc.Broker`` service (spec §13).

Everything here turns a broker that does not answer, or a service it does not know, into a
one-line :class:`CliError`, so no command prints a traceback for a user mistake.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import socket
import sys
import threading
import time
from typing import Iterator

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from .. import broker_service_pb2 as pb
from .._descriptors import pool_from_file_descriptor_set
from .._client._core import BACKEND, HANDSHAKE_PENDING_DETAIL, SILENT_DETAIL, UNREACHABLE
from .._endpoints import tcp_host_name
from .._errors import Error
from .._status import StatusCode
from ._common import EXIT_STATUS_BASE, EXIT_USAGE, CallFailed, CliError, call_failed, curve_settings

BROKER_SERVICE = "zrpc.Broker"
# The broker's _builtin.GRACE_DETAIL, spelt here so that `zrpc --help` need not import the broker.
GRACE_DETAIL = "zrpc-registration-grace"
_GRACE_LOOK_INTERVAL = 0.1  # seconds between DescribeService calls while a broker's grace lasts
_GRACE_LOOKS = 1000  # a bound on them (a grace is seconds long: 3 by default)


_REFUSED = "handshake refused"
_SILENT = "has answered nothing"
# What the client logs about a broker that is not one to call, and the command's error says too.
_HELD = (_REFUSED, "answers like a broker's backend", _SILENT)


class _HeldRefusals(logging.Filter):
    """Holds back the client's "handshake refused", "a broker's backend" and "has answered
    nothing" lines while a command runs.

    When the command then fails for that reason, its ``error:`` line says the same thing and
    the log line would only repeat it; when it succeeds (another broker answered), they are
    logged after all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(held in message for held in _HELD):
            # Once per message: a client retries a refusing broker at each new call, and
            # `zrpc status --watch` makes calls until Ctrl-C.
            if all(held.getMessage() != message for held in self.records):
                self.records.append(record)
            return False
        return True

    def drop_said_by(self, error_message: str) -> None:
        """Forget the lines the command's own error line repeats (another broker's stay)."""
        self.records = [record for record in self.records if not _repeats(record, error_message)]


def _repeats(record: logging.LogRecord, error_message: str) -> bool:
    """Does the command's error say what this held log line says?"""
    message = record.getMessage()
    if _REFUSED in message:
        return message.partition(_REFUSED)[2] in error_message
    if _SILENT in message:
        return f"broker at {record.args[0]}" in error_message and "answered nothing" in error_message
    return f"{record.args[0]} is a broker's backend" in error_message


@contextlib.contextmanager
def connect(brokers: list[str], timeout: float, max_message_bytes: int | None = None) -> Iterator["object"]:
    """A sync zrpc Client on ``brokers``, closed on exit; connection errors become CliError.

    It does not wait for a broker that is not there: a command's call fails as soon as every
    broker's connection attempt failed, instead of at its deadline.
    """
    from .._client import Client  # imported late: `zrpc --help` must not need a socket

    try:
        limit = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
        client = Client(brokers if len(brokers) > 1 else brokers[0], timeout=timeout, wait_for_broker=False,
                        **limit, **curve_settings())
    except CliError:
        raise
    except Exception as exc:  # zmq.ZMQError for an endpoint libzmq refuses, ValueError from ours
        raise CliError(f"cannot connect to {', '.join(brokers)}: {exc}") from None
    client_log = logging.getLogger("zrpc.client")
    held = _HeldRefusals()
    client_log.addFilter(held)
    try:
        yield client
    except CliError as error:
        held.drop_said_by(error.message)  # what the error line says is printed once
        raise
    finally:
        client.close()
        client_log.removeFilter(held)
        for record in held.records:
            client_log.handle(record)


def ask_each(brokers: list[str], timeout: float, question) -> dict[str, object]:
    """``question(client, [endpoint])`` of each broker on a client of its own (each broker has
    its own registry). With several brokers, one that fails to answer maps to its CliError and
    the others are still asked; with one, the error is raised."""
    answers: dict[str, object] = {}
    for endpoint in brokers:
        try:
            with connect([endpoint], timeout) as client:
                answers[endpoint] = question(client, [endpoint])
        except CliError as error:
            if len(brokers) == 1:
                raise
            answers[endpoint] = error
    return answers


def raise_first_failure(answers: dict[str, object], said: bool = False) -> None:
    """After the answers were printed: say each broker that failed, in order, on stderr (unless
    ``said`` already), and exit as the first."""
    failures = [answer for answer in answers.values() if isinstance(answer, CliError)]
    if not failures:
        return
    if not said:
        for failure in failures:
            failure.show()
    sys.exit(failures[0].exit_code)


# Below this a "no answer" may be the timeout itself (connecting and one call through a broker).
_SHORT_TIMEOUT = 0.1


def no_answer(brokers: list[str], timeout: float) -> CliError:
    # A CURVE broker refuses a plain client's handshake, and a plain client does not watch for
    # that: it only sees silence, which may then mean "keys needed" as well as "not running".
    keys_hint = "" if curve_settings()["curve_secret"] else (
        " If it requires CURVE keys, pass --broker-key and --curve-secret.")
    # A tester's `-t 0.005` was told to check the broker, which was running: a connection and a
    # first call take longer than that.
    short_hint = f" Or is --timeout {timeout:g}s too short to connect and ask?" if timeout < _SHORT_TIMEOUT else ""
    return CliError(
        f"no answer from broker at {', '.join(brokers)} within {timeout:g}s "
        f"(is `zrpc broker start` running?{keys_hint}{short_hint})",
        exit_code=EXIT_STATUS_BASE + int(StatusCode.UNAVAILABLE),
    )


def builtin_call(client, brokers: list[str], method: str, request, reply_type, timeout: float):
    """Call one ``zrpc.Broker`` method; the broker answers these itself, so silence means down."""
    try:
        raw = client.call(BROKER_SERVICE, method, request.SerializeToString(), timeout=timeout,
                          idempotent=True)
    except Error as error:
        if error.code == StatusCode.UNAVAILABLE and error.message.startswith(UNREACHABLE):
            # A retry's earlier attempt may have met the broker (shutting down, say): keep that.
            earlier = error.message[error.message.find("; attempt "):] if "; attempt " in error.message else ""
            raise CliError(f"cannot connect to broker at {', '.join(brokers)}: {_why_unreachable(brokers)}{earlier}",
                           exit_code=EXIT_STATUS_BASE + int(StatusCode.UNAVAILABLE)) from None
        if error.code == StatusCode.UNAVAILABLE and error.message.startswith(BACKEND):
            endpoint = error.details.get("zrpc-endpoint", ", ".join(brokers))
            raise CliError(f"{endpoint} is a broker's backend (the endpoint for workers): give its frontend "
                           f"(`zrpc broker start --frontend`, port 5555 by default)",
                           exit_code=EXIT_STATUS_BASE + int(StatusCode.UNAVAILABLE)) from None
        if SILENT_DETAIL in error.details:  # connected, yet not even Health was answered
            raise CliError(f"the broker at {error.details.get('zrpc-endpoint', ', '.join(brokers))} accepted the "
                           f"connection but has answered nothing for {error.details[SILENT_DETAIL]}s, not "
                           f"even a Health call: is it stuck, or starved of CPU?",
                           exit_code=EXIT_STATUS_BASE + int(StatusCode.UNAVAILABLE)) from None
        if HANDSHAKE_PENDING_DETAIL in error.details:  # something accepted the connection, and said nothing
            raise CliError(f"something accepted a connection at {error.details[HANDSHAKE_PENDING_DETAIL]}, but no "
                           f"ZeroMQ handshake completed within {timeout:g}s: is a zrpc broker's frontend what listens "
                           f"there (not another program), and is that broker not stuck?",
                           exit_code=EXIT_STATUS_BASE + int(StatusCode.UNAVAILABLE)) from None
        if error.code in (StatusCode.DEADLINE_EXCEEDED, StatusCode.UNAVAILABLE):
            held_by = error.details.get("zrpc-endpoint")  # the broker that had the call, if it was sent
            raise no_answer([held_by] if held_by in brokers else brokers, timeout) from None
        raise call_failed(error) from None
    return reply_type.FromString(raw)


def _why_unreachable(brokers: list[str]) -> str:
    """Why nothing accepted our connections: a host name that does not resolve (a typo, say), or
    no broker listening."""
    hosts = list(dict.fromkeys(host for host in map(tcp_host_name, brokers) if host))
    problems = [f"host {host!r} {problem}" for host, problem in _lookup_problems(hosts).items() if problem]
    if not problems:
        return "nothing accepted the connection (is `zrpc broker start` running there?)"
    others = "; nothing accepted the connection at the others" if len(problems) < len(brokers) else ""
    return "; ".join(problems) + others


def _lookup_problems(hosts: list[str], within: float = 1.0) -> dict[str, str | None]:
    """What is wrong with looking up each of ``hosts`` as libzmq does (IPv4: zrpc leaves IPv6
    off for host names), or None when it resolves. The lookups run at once, given ``within``
    seconds together: a hung resolver costs the command that second, not one per host."""
    problems: dict[str, str | None] = {host: f"could not be looked up within {within:g} s (is the resolver slow?)"
                                       for host in hosts}

    def look_up(host: str) -> None:
        problems[host] = _lookup_problem(host)

    threads = [threading.Thread(target=look_up, args=(host,), name="zrpc-cli-lookup", daemon=True)
               for host in hosts]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + within
    for thread in threads:
        thread.join(max(0.0, give_up - time.monotonic()))
    return dict(problems)


def _lookup_problem(host: str) -> str | None:
    try:
        socket.getaddrinfo(host, None, socket.AF_INET)
        return None
    except (UnicodeError, ValueError):  # the idna codec: an empty label (a..b), one too long
        return "is not a valid host name"
    except socket.gaierror as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == socket.EAI_AGAIN:  # the resolver did not answer: no verdict on the name
            return f"could not be looked up ({reason})"
    except OSError:
        return None
    try:
        socket.getaddrinfo(host, None)  # has it IPv6 addresses only?
        return ("has no IPv4 address (zrpc connects to host names over IPv4): give its IPv6 address, "
                "as tcp://[ADDRESS]:PORT")
    except (OSError, UnicodeError, ValueError):
        return f"does not resolve ({reason})"


def list_services(client, brokers: list[str], timeout: float) -> pb.ListServicesReply:
    return builtin_call(client, brokers, "ListServices", pb.ListServicesRequest(),
                        pb.ListServicesReply, timeout)


def health(client, brokers: list[str], service: str, timeout: float) -> pb.HealthReply:
    return builtin_call(client, brokers, "Health", pb.HealthRequest(service=service),
                        pb.HealthReply, timeout)


def describe(client, brokers: list[str], service: str, timeout: float
             ) -> tuple[descriptor_pool.DescriptorPool, ServiceDescriptor]:
    """The pool holding ``service``'s files and the service's descriptor.

    A broker that started moments ago says NOT_FOUND with the seconds left of its start-up grace
    (GRACE_DETAIL): its workers may still be registering, and calls to the service would wait
    for them meanwhile, so the description is asked again until then (or ``timeout``). A tester's
    "start the broker, start a worker, call" script failed NOT_FOUND in 0.25 s."""
    give_up_at = time.monotonic() + timeout
    request = pb.DescribeServiceRequest(service=service)
    for _ in range(_GRACE_LOOKS):
        try:
            reply = builtin_call(client, brokers, "DescribeService", request, pb.DescribeServiceReply, timeout)
            break
        except CallFailed as failed:
            wait = min(_float_or_zero(failed.details.get(GRACE_DETAIL)), give_up_at - time.monotonic())
            if wait <= 0:
                if failed.exit_code == EXIT_STATUS_BASE + int(StatusCode.NOT_FOUND):
                    failed.message += _did_you_mean(client, brokers, service, give_up_at - time.monotonic())
                raise
            threading.Event().wait(min(wait, _GRACE_LOOK_INTERVAL))
    else:
        raise no_answer(brokers, timeout)
    try:
        pool = pool_from_file_descriptor_set(reply.file_descriptor_set)
        return pool, pool.FindServiceByName(service)
    except (KeyError, ValueError, TypeError) as exc:
        raise CliError(f"the broker's description of {service!r} is unusable: {exc}") from None


def _did_you_mean(client, brokers: list[str], service: str, timeout: float) -> str:
    """`` (did you mean 'echo.Echo'?)`` for a service named without its package or in another
    case (a tester's Greeter/SayHello was only told NOT_FOUND), from the broker's list; else ""."""
    if timeout <= 0:
        return ""
    try:
        names = [s.name for s in list_services(client, brokers, timeout).services if s.name != BROKER_SERVICE]
    except CliError:
        return ""
    wanted = service.lower()
    close = [name for name in names if name.lower() == wanted or name.lower().rsplit(".", 1)[-1] == wanted]
    close = close or difflib.get_close_matches(service, names, n=1)
    return f" (did you mean {' or '.join(repr(name) for name in close[:3])}?)" if close else ""


def _float_or_zero(text: str | None) -> float:
    """A detail's seconds; 0.0 for none, or for anything that is not a finite number."""
    try:
        value = float(text) if text else 0.0
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def find_method(service: ServiceDescriptor, name: str) -> MethodDescriptor:
    method = service.methods_by_name.get(name)
    if method is None:
        names = ", ".join(sorted(service.methods_by_name)) or "none"
        raise CliError(f"UNIMPLEMENTED: service {service.full_name!r} has no method {name!r}; "
                       f"it has: {names}", exit_code=EXIT_STATUS_BASE + int(StatusCode.UNIMPLEMENTED))
    return method


def split_target(target: str) -> tuple[str, str]:
    """``pkg.Service/Method`` (or grpcurl's ``pkg.Service.Method``, or gRPC's full method name
    ``/pkg.Service/Method``, as logs and traces print it) → (service, method)."""
    if target.startswith("/") and target.count("/") == 2:
        target = target[1:]
    if "/" in target:
        service, _, method = target.rpartition("/")
    else:
        service, _, method = target.rpartition(".")
        if "." not in service:
            # `echo.Echo` is a service with its method left out, not method Echo of service `echo`.
            service = ""
    if not service or not method or "/" in service:
        raise CliError(f"bad method {target!r}: expected SERVICE/METHOD, e.g. helloworld.Greeter/SayHello",
                       exit_code=EXIT_USAGE)
    return service, method
