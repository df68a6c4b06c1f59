"""``zrpc status``: a live view of brokers for operators, from their ListServices answers.

Calls/s come from the difference of two snapshots ``--interval`` apart; the broker itself keeps
the counters (calls and errors since it started) and a p99 over the last minute per service.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time

import click

from .. import broker_service_pb2 as pb
from ._call_cmd import each_broker_option, in_flight_cell
from ._common import (EXIT_CODES_HELP, CliError, FiniteRange, Terminated, curve_options, option,
                      split_endpoints, warn_unread_variables)
from ._signals import SignalWait
from . import _discovery

_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: refresh in place on a terminal
_COLUMNS = ("SERVICE", "WORKERS", "BUSY", "QUEUE", "IN-FLIGHT", "CALLS/S", "ERRORS/S", "P99 MS", "ERRORS")


@click.command(epilog=EXIT_CODES_HELP, short_help="Per service: workers, queue, calls/s, p99, errors.")
@each_broker_option
@curve_options
@option("--timeout", "-t", type=FiniteRange(min=0.001), default=5.0, show_default=True,
        metavar="SECONDS", help="Deadline of each question to the broker.")
@option("--watch", "-w", is_flag=True, default=False,
        help="Refresh every --interval until Ctrl-C (in place on a terminal).")
@option("--interval", "-n", type=FiniteRange(min=0.05), default=1.0, show_default=True,
        metavar="SECONDS", help="Time between the two snapshots that give calls/s (and between refreshes).")
def status(brokers: tuple[str, ...], timeout: float, watch: bool, interval: float) -> None:
    """Services, workers, queue depth, calls/s, p99 and errors of a broker.

    CALLS/S and ERRORS/S (calls answered, and those of them not OK) are counted between two
    snapshots --interval apart: under overload most calls are refusals, answered at once. P99 MS
    is over the last minute, of the calls the broker took ("-" when none ended in it), ERRORS
    since the broker started.

    With several brokers, a table each. A broker that does not answer gets a line saying so
    instead (with --watch, until it answers again) and sets the exit status; --watch ends with
    Ctrl-C, with the status of its last refresh.

    \b
      zrpc status --broker tcp://127.0.0.1:5555
      zrpc status --watch --interval 2
      zrpc status --curve-secret alice.key_secret --broker-key broker.key
    """
    warn_unread_variables()
    endpoints = split_endpoints(brokers)
    with contextlib.ExitStack() as stack:
        # Each broker has its own counters: one client each, so every snapshot of a table comes
        # from the same broker (one client would deal its questions over all of them).
        clients = {endpoint: stack.enter_context(_discovery.connect([endpoint], timeout)) for endpoint in endpoints}
        # Ctrl-C (and SIGTERM) is recorded, not raised wherever the main thread is (inside the
        # client's lock, a KeyboardInterrupt could leave it held): --watch ends at the next wait.
        interrupted = stack.enter_context(SignalWait((signal.SIGINT, signal.SIGTERM)))

        def snapshot(earlier: dict[str, object] | None = None) -> dict[str, object]:
            """Each broker's ListServices reply, or (several brokers, --watch) the error it gave.
            Without --watch, a broker that did not answer ``earlier`` is not asked again."""
            replies: dict[str, object] = {}
            for endpoint, client in clients.items():
                if earlier is not None and not watch and isinstance(earlier[endpoint], CliError):
                    replies[endpoint] = earlier[endpoint]
                    continue
                try:
                    replies[endpoint] = _discovery.list_services(client, [endpoint], timeout)
                except CliError as error:
                    if len(endpoints) == 1 and not watch:
                        raise
                    replies[endpoint] = error
            return replies

        before, taken = snapshot(), time.monotonic()
        terminal = sys.stdout.isatty()
        shown = False  # whether a view said which brokers failed
        while (signum := interrupted.wait(interval)) is None:  # --watch ends with Ctrl-C
            after, now = snapshot(before), time.monotonic()
            text = "\n\n".join(
                f"broker {endpoint}: {reply.format_message()}" if isinstance(reply, CliError)
                else format_status(before[endpoint] if not isinstance(before[endpoint], CliError) else reply,
                                   reply, now - taken, endpoint)
                for endpoint, reply in after.items())
            if not watch:
                click.echo(text)
                _discovery.raise_first_failure(after, said=True)  # the table says which broker
                return
            click.echo((_CLEAR if terminal else "") + text + ("" if terminal else "\n"))
            before, taken, shown = after, now, True
        if not watch:  # Ctrl-C before the second snapshot: nothing was printed
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        # Ctrl-C ends --watch: its status is that of the last view (a tester's watch of a broker
        # that never answered exited 0), said on stderr if no view was printed.
        _discovery.raise_first_failure(before, said=shown)


def format_status(before: pb.ListServicesReply, after: pb.ListServicesReply, seconds: float, broker: str) -> str:
    """The status table; calls/s from the calls answered between ``before`` and ``after``."""
    previous = {service.name: service for service in before.services}
    rows = []
    for service in after.services:
        if service.name == _discovery.BROKER_SERVICE:
            continue
        earlier = previous.get(service.name)
        calls = service.calls_total - (earlier.calls_total if earlier is not None else 0)
        errors = service.errors_total - (earlier.errors_total if earlier is not None else 0)
        busy = sum(1 for w in service.workers if w.capacity and w.in_flight >= w.capacity)
        rows.append((service.name, str(service.live_workers), str(busy), str(service.queue_depth),
                     in_flight_cell(service), f"{max(calls, 0) / seconds:.1f}" if seconds > 0 else "-",
                     f"{max(errors, 0) / seconds:.1f}" if seconds > 0 else "-",
                     # No call answered in the last minute: no p99 (a real one is never 0).
                     f"{service.p99_ms:.1f}" if service.p99_ms > 0 else "-", str(service.errors_total)))
    widths = [max(len(row[i]) for row in (_COLUMNS, *rows)) for i in range(len(_COLUMNS))]

    def line(cells) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    # The columns count over different windows: say which (the tester read ERRORS as recent).
    header = (f"broker {broker}{' (DRAINING: shutting down)' if after.draining else ''}: {len(rows)} service(s), "
              f"{time.strftime('%H:%M:%S')}; calls/s and errors/s over the last {seconds:.1f}s, p99 over the last minute, "
              f"errors since the broker started")
    body = [line(_COLUMNS), *(line(row) for row in rows)] if rows else ["no services: start one with zrpc worker run MODULE:CLASS"]
    return "\n".join([header, *body])
