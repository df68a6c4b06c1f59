"""``zrpc call``, ``zrpc services`` and ``zrpc health``: the client side, from the shell."""
from __future__ import annotations

import difflib
import json
import sys

import click
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from .. import _protocol as p
from .. import broker_service_pb2 as pb
from .._descriptors import is_idempotent, message_class
from .._errors import Error
from ._common import curve_options
from ._common import (DEFAULT_FRONTEND, EXIT_CODES_HELP, EXIT_NOT_SERVING, EXIT_USAGE, CliError, FiniteRange,
                      call_failed, option, split_endpoints, warn_unread_variables)
from . import _discovery

# --broker of every client command reads ZRPC_BROKER, so one export serves them all.
def _broker_option(several: str):
    return option("--broker", "-b", "brokers", multiple=True, envvar="ZRPC_BROKER", default=[DEFAULT_FRONTEND],
                  show_default=True, metavar="ENDPOINT",
                  help=f"Broker frontend endpoint; repeat or separate with commas to {several}.")


broker_option = _broker_option("spread calls over several")
# services, health and status ask every broker given (each has its own registry).
each_broker_option = _broker_option("ask each of several")


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("target", metavar="SERVICE/METHOD")
@click.argument("request_json", metavar="[JSON]", default="{}")
@broker_option
@curve_options
@option("--timeout", "-t", type=FiniteRange(min=0.001), default=5.0, show_default=True,
        metavar="SECONDS", help="Deadline of the call (and of fetching its description).")
@option("--metadata", "-m", multiple=True, metavar="KEY=VALUE",
        help="Request metadata, repeatable (e.g. -m trace_id=abc).")
@option("--emit-defaults", is_flag=True, default=False,
        help="Print fields that hold their default value too.")
@option("--max-message-bytes", type=click.IntRange(min=1, max=p.MAX_MESSAGE_BYTES_LIMIT),
        default=p.DEFAULT_MAX_MESSAGE_BYTES, metavar="BYTES", show_default=True,
        help="Larger requests are refused before sending, larger replies RESOURCE_EXHAUSTED; "
             "the broker has its own limit.")
def call(target: str, request_json: str, brokers: tuple[str, ...], timeout: float,
         metadata: tuple[str, ...], emit_defaults: bool, max_message_bytes: int) -> None:
    """Call SERVICE/METHOD with a JSON request; print the JSON reply.

    SERVICE/METHOD may also be written SERVICE.METHOD (as grpcurl does) or /SERVICE/METHOD
    (gRPC's full method name). JSON is the request message in protobuf's JSON mapping ('{}'
    when omitted; '-' reads stdin). The broker describes the service
    (zrpc.Broker/DescribeService), so no .proto file is needed. Idempotent methods
    (idempotency_level option) are sent as such.

    \b
      zrpc call helloworld.Greeter/SayHello '{"name": "Ada"}'
      echo '{"name": "Ada"}' | zrpc call helloworld.Greeter/SayHello -

    A failed call prints `error: CODE: message` on stderr, then its details (if any) one
    `  key: value` line each, and exits 10 + code.
    """
    warn_unread_variables()
    endpoints = split_endpoints(brokers)
    service_name, method_name = _discovery.split_target(target)
    fields = _parse_json(sys.stdin.read() if request_json == "-" else request_json)
    metadata_map = _parse_metadata(metadata)
    with _discovery.connect(endpoints, timeout, max_message_bytes) as client:
        pool, service = _discovery.describe(client, endpoints, service_name, timeout)
        method = _discovery.find_method(service, method_name)
        request = message_class(method.input_type)()
        _check_field_names(fields, method.input_type)
        try:
            json_format.ParseDict(fields, request, descriptor_pool=pool)
        except json_format.ParseError as exc:
            hint = ""
            if "base64" in str(exc):  # a tester's {"payload": "hello"} for a bytes field
                hint = " (bytes fields take base64 in protobuf's JSON: \"aGVsbG8=\" for hello)"
            raise CliError(f"bad request for {method.input_type.full_name}: {exc}{hint}",
                           exit_code=EXIT_USAGE) from None
        try:
            raw = client.call(service_name, method_name, request.SerializeToString(),
                              timeout=timeout, idempotent=is_idempotent(method),
                              metadata=metadata_map or None)
        except Error as error:
            raise call_failed(error) from None
    reply = message_class(method.output_type)()
    try:
        reply.ParseFromString(raw)
    except Exception as exc:  # DecodeError: the worker sent something else
        raise CliError(f"reply is not a valid {method.output_type.full_name}: {exc}") from None
    # Text as it is ("Hello, Ада"), not as \u escapes (a tester's non-ASCII reply was unreadable).
    click.echo(json_format.MessageToJson(reply, indent=2, descriptor_pool=pool, ensure_ascii=False,
                                         always_print_fields_with_no_presence=emit_defaults))


# proto3's JSON mapping writes 64-bit integers as strings; in a listing for scripts they are
# counters, and jq compares strings as text (a tester's "calls_total": "6").
_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def _numeric_json(message) -> dict:
    """MessageToDict (field names as in the .proto, every field), 64-bit integers as numbers."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    _int64_as_numbers(message.DESCRIPTOR, document)
    return document


def _int64_as_numbers(descriptor, document: dict) -> None:
    for field in descriptor.fields:
        value = document.get(field.name)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if field.type in _INT64_TYPES:
            numbers = [int(item) for item in items]
            document[field.name] = numbers if isinstance(value, list) else numbers[0]
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in items:
                _int64_as_numbers(field.message_type, item)


@click.command(epilog=EXIT_CODES_HELP, short_help="List services: methods, workers, load and queue.")
@each_broker_option
@curve_options
@option("--timeout", "-t", type=FiniteRange(min=0.001), default=5.0, show_default=True,
        metavar="SECONDS", help="How long to wait for the broker.")
@option("--json", "as_json", is_flag=True, default=False, envvar="ZRPC_SERVICES_JSON",
        help="Print the ListServices reply as JSON; with several brokers, an object by endpoint.")
def services(brokers: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """List the services a broker knows: methods, live workers, load and queue depth.

    With several brokers, each is asked on its own and gets its own table; one that does not
    answer is said on stderr after the others, and sets the exit status.
    """
    warn_unread_variables()
    endpoints = split_endpoints(brokers)
    listings = _discovery.ask_each(endpoints, timeout, lambda client, broker: _discovery.list_services(
        client, broker, timeout))
    if as_json:
        documents = {endpoint: {"error": listing.format_message()} if isinstance(listing, CliError)
                     else _numeric_json(listing)
                     for endpoint, listing in listings.items()}
        document = documents[endpoints[0]] if len(endpoints) == 1 else {"brokers": documents}
        click.echo(json.dumps(document, indent=2))
    else:
        for index, (endpoint, listing) in enumerate(listings.items()):
            if len(endpoints) > 1:
                click.echo(("\n" if index else "") + f"broker {endpoint}")
            click.echo("(no answer: see below)\n" if isinstance(listing, CliError) else format_services(listing),
                       nl=False)
    _discovery.raise_first_failure(listings)


def _workers_cell(service: pb.ServiceInfo) -> str:
    """Live workers, and those draining (their calls still count in IN-FLIGHT)."""
    draining = sum(1 for worker in service.workers if worker.draining)
    return f"{service.live_workers}" + (f" +{draining} draining" if draining else "")


def in_flight_cell(service: pb.ServiceInfo) -> str:
    """Calls at its workers, and the slots calls answered without them still hold there (an
    adversarial tester's hung worker showed 0/2 while its two slots were taken)."""
    held = service.held_by_answered
    return f"{service.in_flight}" + (f" +{held} held" if held else "")


def format_services(listing: pb.ListServicesReply) -> str:
    """An aligned plain-text table, one service per row (methods comma-separated).

    The broker's own service has no workers, capacity or queue: a tester read its "1" and "0/1"
    as a worker of it somewhere."""
    header = ("SERVICE", "METHODS", "WORKERS", "IN-FLIGHT/CAPACITY", "QUEUED")
    rows = [header] + [
        (s.name, ",".join(s.methods), "-", "built-in", "-") if s.name == _discovery.BROKER_SERVICE else
        (s.name, ",".join(s.methods), _workers_cell(s), f"{in_flight_cell(s)}/{s.capacity}", str(s.queue_depth))
        for s in listing.services
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) if i < 2 else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip() + "\n")
    if listing.draining:  # an operator looking at a broker that is going away should see it first
        lines.insert(0, "DRAINING: this broker is shutting down; it refuses new calls and answers the ones it holds\n")
    return "".join(lines)


@click.command(epilog=EXIT_CODES_HELP, short_help="Is SERVICE (or the broker) serving? For health checks.")
@click.argument("service", required=False, default="")
@each_broker_option
@curve_options
@option("--timeout", "-t", type=FiniteRange(min=0.001), default=5.0, show_default=True,
        metavar="SECONDS", help="How long to wait for the broker.")
def health(service: str, brokers: tuple[str, ...], timeout: float) -> None:
    """Health of SERVICE, or of the broker itself when SERVICE is omitted.

    Prints SERVING, NOT_SERVING or SERVICE_UNKNOWN and exits 0 for SERVING, 4 for the other
    two, so it can back a container health check; a broker that does not answer exits 24
    (UNAVAILABLE), as any call that fails exits 10 + its code. With several brokers, each is
    asked and every one must serve; one that does not answer decides the exit status.
    """
    warn_unread_variables()
    endpoints = split_endpoints(brokers)
    serving = True
    replies = _discovery.ask_each(endpoints, timeout, lambda client, broker: _discovery.health(
        client, broker, service, timeout))
    for endpoint, reply in replies.items():
        where = f"{endpoint} " if len(endpoints) > 1 else ""
        if isinstance(reply, CliError):
            click.echo(f"{where}{service or 'broker'}: NO ANSWER (see below)")
            continue
        status = pb.HealthReply.Status.Name(reply.status)
        if service:
            click.echo(f"{where}{service}: {status} (live workers {reply.live_workers}, "
                       f"queued {reply.queue_depth})")
        else:
            click.echo(f"{where}broker: {status}")
        serving = serving and reply.status == pb.HealthReply.SERVING
    _discovery.raise_first_failure(replies)  # a broker that does not answer: 24, before 4
    if not serving:
        sys.exit(EXIT_NOT_SERVING)


def _check_field_names(fields: dict, message_type) -> None:
    """Name a misspelt top-level field, with the closest one (protobuf's own error lists the
    fields as a Python list: a tester's "paylod" read 'Available Fields(except extensions):
    "['payload']"')."""
    known = {name for field in message_type.fields for name in (field.name, field.json_name)}
    for name in fields:
        if name not in known:
            names = sorted(field.name for field in message_type.fields)
            close = difflib.get_close_matches(name, sorted(known), n=1)
            suggestion = f"did you mean {close[0]!r}? " if close else ""
            raise CliError(f"bad request for {message_type.full_name}: it has no field {name!r} ({suggestion}"
                           f"fields: {', '.join(names) or 'none'})", exit_code=EXIT_USAGE)


def _parse_json(text: str) -> dict:
    if not text.strip():  # a tester's empty stdin read "Expecting value: line 1 column 1 (char 0)"
        raise CliError("the request is empty: give a JSON object ('{}' for a request of defaults)",
                       exit_code=EXIT_USAGE)
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"request is not valid JSON: {exc}", exit_code=EXIT_USAGE) from None
    if not isinstance(fields, dict):
        raise CliError(f"request must be a JSON object, got {type(fields).__name__}: {text.strip()[:60]}",
                       exit_code=EXIT_USAGE)
    return fields


def _parse_metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"bad metadata {pair!r}: expected KEY=VALUE", exit_code=EXIT_USAGE)
        metadata[key] = value
    return metadata
