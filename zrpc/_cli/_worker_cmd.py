"""``zrpc worker run MODULE:CLASS ...``: serve services until SIGINT or SIGTERM, then drain."""
from __future__ import annotations

import difflib
import importlib
import logging
import os
import signal
import sys
import time

import click

from .. import _protocol as p
from .._allocator import tune_allocator
from .._polling import MAX_BUSY_POLL
from ._common import curve_options, curve_settings
from ._common import (DEFAULT_BACKEND, EXIT_CODES_HELP, EXIT_USAGE, LOG_LEVELS, CliError, FiniteRange,
                      log_format_option, metrics_host_option, metrics_port_option, option, ready_line,
                      setup_logging, split_endpoints, start_metrics, warn_unread_variables)
from ._signals import SignalWait

log = logging.getLogger("zrpc.cli")


@click.group()
def worker() -> None:
    """Run workers that serve your services."""


@worker.command(epilog=EXIT_CODES_HELP)
@click.argument("targets", nargs=-1, required=True, metavar="MODULE:CLASS...")
@option("--broker", "-b", "brokers", multiple=True, metavar="ENDPOINT", default=[DEFAULT_BACKEND],
        envvar="ZRPC_WORKER_RUN_BROKER",
        show_default=True,
        help="Broker backend endpoint; repeat or separate with commas to serve several brokers.")
@option("--concurrency", "-c", type=click.IntRange(min=1), default=16, metavar="N", show_default=True,
        help="Calls this worker runs at once (its capacity, shared by its services and by the "
             "brokers it serves: each is told what the others leave it).")
@option("--heartbeat-interval", type=FiniteRange(min=0.01), default=1.0, show_default=True,
        metavar="SECONDS", help="Heartbeat interval announced to the broker.")
@option("--liveness", type=click.IntRange(min=1), default=3, metavar="N", show_default=True,
        help="Reconnect after this many heartbeat intervals without hearing from a broker.")
@option("--drain-grace", type=FiniteRange(min=0), default=10.0, show_default=True,
        metavar="SECONDS", help="On SIGTERM/SIGINT, how long calls in flight may take to finish.")
@option("--name", default=None, help="Added to host:pid in the name `zrpc services` and broker logs show (host:pid:NAME).")
@option("--max-message-bytes", type=click.IntRange(min=1, max=p.MAX_MESSAGE_BYTES_LIMIT), default=p.DEFAULT_MAX_MESSAGE_BYTES, metavar="BYTES",
        show_default=True, help="A larger reply is answered RESOURCE_EXHAUSTED; match the broker's setting.")
@option("--busy-poll", type=FiniteRange(min=0, max=MAX_BUSY_POLL), default=0.0, metavar="SECONDS", show_default=True,
        help="After a request, poll without sleeping this long (0: off): lower latency at light "
             "load, for a core kept busy while calls come.")
@curve_options
@option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO",
        show_default=True, help="Log threshold; logs go to stderr.")
@log_format_option
@metrics_port_option
@metrics_host_option
def run(targets: tuple[str, ...], brokers: tuple[str, ...], concurrency: int,
        heartbeat_interval: float, liveness: int, drain_grace: float, name: str | None,
        max_message_bytes: int, busy_poll: float, log_level: str, log_format: str, metrics_port: int | None, metrics_host: str) -> None:
    """Serve MODULE:CLASS services (zrpc Service subclasses) from the current directory.

    The working directory goes first on sys.path, so from a checkout
    `zrpc worker run workers.echo:Echo` works. Each class is created with no arguments.
    Once started, prints one line to stdout:

    \b
      zrpc worker ready: services=<names> brokers=<endpoints> concurrency=<n> [metrics=<url>]

    A worker may start before its brokers: "ready" means serving and connecting. Each broker
    that takes its registration is logged (stderr, level info): "registered with broker
    <endpoint>"; `zrpc services` lists what a broker has.

    SIGTERM or SIGINT stops taking new calls, lets calls in flight finish for up to
    --drain-grace seconds, then exits 0.
    """
    warn_unread_variables()
    endpoints = split_endpoints(brokers)
    setup_logging(log_level, log_format)
    tune_allocator()  # payloads of a megabyte are reused, not mapped and faulted in each time
    instances = [load_service(target) for target in targets]
    names = [type(instance).descriptor.full_name for instance in instances]
    if len(set(names)) != len(names):
        raise CliError(f"a service is given twice: {', '.join(names)}", exit_code=EXIT_USAGE)

    from .._worker import Worker

    try:
        worker_ = Worker(services=instances, brokers=endpoints, concurrency=concurrency,
                         heartbeat_interval=heartbeat_interval, liveness=liveness, name=name,
                         drain_grace=drain_grace, max_message_bytes=max_message_bytes, busy_poll=busy_poll,
                         **curve_settings())
    except (TypeError, ValueError) as exc:  # a service the runtime refuses, a setting out of range
        raise CliError(f"cannot start worker: {exc}", exit_code=EXIT_USAGE) from None
    from .._worker._metrics import worker_registry

    metrics = start_metrics(lambda: worker_registry(worker_), metrics_host, metrics_port)
    try:
        _serve(worker_, drain_grace,
               f"zrpc worker ready: services={','.join(names)} brokers={','.join(worker_.brokers)} "
               f"concurrency={concurrency}" + (f" metrics={metrics.url}" if metrics else ""))
    finally:
        if metrics is not None:
            metrics.close()


def _serve(worker_, drain_grace: float, ready: str) -> None:
    """Start the worker's thread; the main thread waits for a signal, then drains it.

    Signal handlers only run in the main thread and must not block or take a lock, so the
    signal is only recorded (see _signals.py); the drain is asked for here (``request_stop``),
    and cut short here when another signal comes.
    """
    from .._worker._runtime import STOP_MARGIN

    worker_._owner_reports_errors = True  # a NotABrokerBackend is our error line, not a log line too
    with SignalWait() as signals:
        try:
            worker_.start()
        except Exception as exc:  # zmq.ZMQError for an endpoint libzmq refuses, start-up timeout
            raise CliError(f"cannot start worker: {type(exc).__name__}: {exc}") from None
        ready_line(ready)
        # Worker has no public "wait until stopped"; its thread ending on its own is a failure.
        thread = getattr(worker_, "_thread", None)
        while (signum := signals.wait(0.5)) is None:
            if thread is not None and not thread.is_alive():
                from .._worker import NotABrokerBackend

                if isinstance(worker_.error, NotABrokerBackend):
                    raise CliError(f"worker stopped: {worker_.error}")
                raise CliError("worker stopped unexpectedly (see the log above)")
        log.info("received %s; draining for up to %gs (a second signal stops at once)", signal.Signals(signum).name,
                 drain_grace)
        worker_.request_stop(drain_grace)
        seen = signals.count
        give_up_at = time.monotonic() + drain_grace + STOP_MARGIN
        # The drain waits for the calls running; a second signal (Ctrl-C again, on a handler that
        # hangs) ends it now, as it does the broker's. A tester's repeated signals did nothing.
        while not worker_.wait(0):
            if time.monotonic() > give_up_at:
                raise CliError(f"worker did not stop within {drain_grace + STOP_MARGIN:.1f}s")
            if signals.wait_for_another(seen, 0.1):
                seen = signals.count  # else a third signal would make every later look return at once
                log.info("received another signal; stopping now")
                worker_.request_stop(0.0)
    log.info("worker stopped")


def load_service(target: str):
    """Import ``module:Class`` from the working directory and instantiate it with no arguments."""
    from .._service import Service

    module_name, sep, class_name = target.partition(":")
    if "," in target:  # a tester's `a:A,b:B` was told module a has no attribute 'A,b:B'
        listed = " ".join(part for part in target.split(",") if part)
        raise CliError(f"bad service {target!r}: give each MODULE:CLASS as an argument of its own, "
                       f"e.g. zrpc worker run {listed}", exit_code=EXIT_USAGE)
    if not sep or not module_name or not class_name:
        raise CliError(f"bad service {target!r}: expected MODULE:CLASS, e.g. workers.echo:Echo",
                       exit_code=EXIT_USAGE)
    cwd = os.getcwd()
    if cwd not in sys.path[:1]:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and module_name[len(exc.name):][:1] in ("", "."):
            raise CliError(f"cannot import {module_name!r}: no such module (looked in {cwd} and "
                           f"the installed packages)") from None
        raise CliError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # the module itself failed: SyntaxError, ImportError, anything it raises
        raise CliError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        services = [name for name, value in vars(module).items()
                    if isinstance(value, type) and issubclass(value, Service) and value is not Service]
        close = difflib.get_close_matches(class_name, services, n=1) or (services if len(services) == 1 else [])
        raise CliError(f"module {module_name!r} has no attribute {class_name!r}"
                       + (f" (did you mean {module_name}:{close[0]}?)" if close else ""))
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise CliError(f"{target} is not a zrpc Service subclass")
    if getattr(cls, "descriptor", None) is None:
        raise CliError(f"{target} has no `descriptor` (the protobuf ServiceDescriptor it serves)")
    try:
        return cls()
    except Exception as exc:
        raise CliError(f"cannot create {target}(): {type(exc).__name__}: {exc}") from None
