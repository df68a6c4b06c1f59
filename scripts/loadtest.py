#!/usr/bin/env python
"""Load generator: keep N zrpc calls in flight against a service and report throughput and latency.

    python scripts/loadtest.py --spawn 2 --concurrency 32 --requests 20000
    python scripts/loadtest.py --broker tcp://127.0.0.1:5555 --duration 30 --json
    python scripts/loadtest.py --broker tcp://10.0.0.5:5555 --broker-key broker.key \
        --curve-secret loadtest.key_secret

Latency percentiles are exact (nearest rank over every recorded latency), so no histogram
library is needed: 1e6 calls are 8 MB of ints and one sort.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import click

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Prefer the checkout's zrpc (the workers/ it spawns come from the checkout too).
sys.path.insert(0, str(REPO_ROOT))

from google.protobuf import json_format  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor  # noqa: E402

from zrpc import AsyncClient, Client, Error, StatusCode, tune_allocator  # noqa: E402
from zrpc._cli import _discovery  # noqa: E402
from zrpc._cli._common import (EXIT_INTERRUPTED, EXIT_STATUS_BASE, EXIT_TERMINATED, CliError,  # noqa: E402
                              ExitOnInterrupt, FiniteRange, curve_options, curve_settings, split_endpoints)
from zrpc._descriptors import is_idempotent, message_class  # noqa: E402

STARTUP_TIMEOUT = 20.0  # bound on the spawned broker printing its ready line, workers registering
STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL after this many seconds

# A first call failing with one of these means no call can reach a handler (broker down, no
# worker, keys refused): stop there. Any other code is the method's own answer, and a method
# that fails can be load-tested like one that succeeds; its errors are counted.
SETUP_ERRORS = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED,
                          StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED})

# After --duration, calls in flight get this long (or their --timeout, if shorter) to finish;
# the rest are cancelled and reported. A tester's `-d 8` ran 34.5 s: its calls waited out a
# 30 s timeout for a draining broker's successor.
END_GRACE = 1.0
# A call cancelled at the end is "stuck", and counts as failed, when it had been in flight this
# many times as long as the slowest call that finished: a slow method's last calls are merely
# cut short, but the calls of a broker or worker that stopped answering mid-run were lost.
STUCK_FACTOR = 2


# ----------------------------------------------------------------------------- measuring

@dataclass(slots=True)
class Result:
    """What one run measured. Latencies are of successful calls, in nanoseconds."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    elapsed_s: float = 0.0
    unfinished: int = 0  # calls still in flight when a --duration run ended: cancelled
    stuck: int = 0  # of those, the ones in flight STUCK_FACTOR times the slowest finished call: failed
    end_grace_s: float = 0.0  # how long the unfinished calls were given after --duration
    warmup_calls: int = 0  # made before the run, not counted (the broker's metrics count them)
    interrupted: bool = False  # Ctrl-C ended the run: the report covers the calls made until then
    terminated: bool = False  # ... SIGTERM did (interrupted is set too)

    @property
    def ok(self) -> int:
        return len(self.latencies_ns)

    @property
    def calls(self) -> int:
        return self.ok + sum(self.errors.values())


def percentile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank percentile ``q`` (0-100] of an ascending list; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(result: Result, *, concurrency: int, payload_size: int | None, target: str,
            brokers: list[str], spawned_workers: int, request_bytes: int | None = None) -> dict:
    """``payload_size`` is that of the generated field (None for a request from --data);
    ``request_bytes`` is the size of the serialized request every call sent."""
    latencies = sorted(result.latencies_ns)

    def us(value: int | None) -> float | None:
        return None if value is None else round(value / 1000.0, 1)

    return {
        "service": target,
        "brokers": brokers,
        "spawned_workers": spawned_workers,
        "concurrency": concurrency,
        "payload_size": payload_size,
        "request_bytes": request_bytes,
        "calls": result.calls,
        "ok": result.ok,
        "warmup_calls": result.warmup_calls,
        "errors": dict(sorted(result.errors.items())),
        "elapsed_s": round(result.elapsed_s, 3),
        "calls_per_s": round(result.calls / result.elapsed_s, 1) if result.elapsed_s > 0 else 0.0,
        "min_us": us(latencies[0] if latencies else None),
        "mean_us": us(round(sum(latencies) / len(latencies)) if latencies else None),
        "p50_us": us(percentile(latencies, 50)),
        "p90_us": us(percentile(latencies, 90)),
        "p99_us": us(percentile(latencies, 99)),
        "max_us": us(latencies[-1] if latencies else None),
    }


def format_summary(s: dict) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value / 1000.0:.3f}"

    errors = ", ".join(f"{name} {count}" for name, count in s["errors"].items()) or "none"
    return "\n".join([
        f"service      {s['service']} via {', '.join(s['brokers'])}"
        + (f" ({s['spawned_workers']} spawned worker(s))" if s["spawned_workers"] else ""),
        f"load         concurrency {s['concurrency']}, {_request_text(s)}",
        f"calls        {s['calls']} ({s['ok']} ok) in {s['elapsed_s']:.3f} s"
        + (", after a warm-up call (not counted)" if s.get("warmup_calls") else ""),
        # Refusals come back at once: a tester's overloaded run read 19,727 calls/s with 318 ok.
        f"throughput   {s['calls_per_s']:.1f} calls/s"
        + (f" ({s['ok'] / s['elapsed_s']:.1f} ok/s)" if s["ok"] < s["calls"] and s["elapsed_s"] > 0 else ""),
        f"latency ms   p50 {ms(s['p50_us'])}  p90 {ms(s['p90_us'])}  p99 {ms(s['p99_us'])}  "
        f"max {ms(s['max_us'])}" + (" (of the ok calls)" if s["ok"] < s["calls"] else ""),
        f"errors       {errors}",
    ] + ([_unfinished_text(s)] if s.get("unfinished") else [])
        + ([f"interrupted  by {'SIGTERM' if s.get('terminated') else 'Ctrl-C'}: these are the calls made until then"]
           if s.get("interrupted") else [])) + "\n"


def _unfinished_text(s: dict) -> str:
    text = f"unfinished   {s['unfinished']} call(s) still in flight {s['end_grace_s']:g} s after --duration: cancelled"
    stuck = s.get("stuck", 0)
    if not s["calls"] and not stuck:  # a tester's Sleep 3000 at -d 2 read only "calls 0 ... errors none"
        return text + ", not counted: no call finished; each takes longer than --duration, lengthen it"
    if not stuck:
        return text + ", not counted"
    cut_short = s["unfinished"] - stuck
    return (text + f"; {stuck} stuck (in flight over {STUCK_FACTOR} x the slowest finished call), counted as failed"
            + (f", {cut_short} not counted" if cut_short else ""))


def _request_text(s: dict) -> str:
    size = s.get("request_bytes")
    if s.get("empty_request"):  # no field to fill (a tester read "0 bytes (generated 100-byte payload)")
        return "empty request (its type has no bytes or string field; give one with --data)"
    if s.get("payload_size") is None:  # --data: the user's own request
        return "request from --data" + ("" if size is None else f", {size} bytes serialized")
    generated = f"generated {s['payload_size']}-byte payload"
    return generated if size is None else f"request {size} bytes serialized ({generated})"


async def run_load(brokers: list[str], service: str, method: str, payload: bytes, idempotent: bool,
                   concurrency: int, requests: int | None, duration: float | None, timeout: float,
                   progress, curve: dict | None = None, errors_allowed: bool = False) -> Result:
    """Keep ``concurrency`` calls in flight until ``requests`` were made or ``duration`` passed.

    ``curve`` is ``curve_secret`` and ``broker_key`` for a CURVE broker (AsyncClient's arguments).
    ``errors_allowed``: the run may fail every call (--max-errors 1), so no hint about it.
    """
    result = Result()
    client = AsyncClient(brokers if len(brokers) > 1 else brokers[0], timeout=timeout, **(curve or {}))
    try:
        # One call first, not counted: it connects, and a broker or worker that cannot serve
        # fails here, once (describing the service already checked the target exists).
        warmup_begin = time.perf_counter_ns()
        try:
            result.warmup_calls += 1
            await client.call(service, method, payload, timeout=timeout, idempotent=idempotent)
        except Error as error:
            if error.code in SETUP_ERRORS:
                # Exit 10 + code, as `zrpc call` (a tester's UNAVAILABLE said "Error: ...", exit 1,
                # where NOT_FOUND, found while describing the service, said "error: ...", exit 15).
                raise CliError(f"first call to {service}/{method} failed: {error}",
                               exit_code=EXIT_STATUS_BASE + int(error.code)) from None
            hint = "" if errors_allowed else " (--max-errors 1 to exit 0 all the same)"
            click.echo(f"note: first call to {service}/{method} failed with {error.code.name}; "
                       f"going on, its errors are counted{hint}", err=True)
        warmup_ns = time.perf_counter_ns() - warmup_begin  # includes connecting
        slowest_ns = 0  # of the run's calls that finished with an error (ok ones: latencies)
        last_done_ns = 0  # when the run's last call finished
        issued = 0
        started = time.perf_counter()
        stop_at = None if duration is None else started + duration
        latencies, errors = result.latencies_ns, result.errors
        clock = time.perf_counter_ns

        began = [0] * concurrency  # when each caller's current call began

        async def caller(index: int) -> None:
            nonlocal issued, slowest_ns, last_done_ns
            while (requests is None or issued < requests) and (stop_at is None or time.perf_counter() < stop_at):
                issued += 1
                began[index] = begin = clock()
                try:
                    await client.call(service, method, payload, timeout=timeout, idempotent=idempotent)
                except Error as error:
                    errors[error.code.name] += 1
                    last_done_ns = clock()
                    slowest_ns = max(slowest_ns, last_done_ns - begin)
                else:
                    last_done_ns = clock()
                    latencies.append(last_done_ns - begin)

        callers = [asyncio.ensure_future(caller(index)) for index in range(concurrency)]
        ticker = asyncio.ensure_future(_tick(progress, result, started, requests is None))
        # SIGTERM ends the run as Ctrl-C does (asyncio.run cancels us on SIGINT), with its report;
        # before the run, the zrpc commands' handler ends the script without one (ExitOnInterrupt).
        loop, this_task = asyncio.get_running_loop(), asyncio.current_task()

        def on_sigterm() -> None:
            result.terminated = True
            this_task.cancel()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            if stop_at is None:
                await asyncio.gather(*callers)
            else:  # each caller still running holds one call
                result.end_grace_s = min(timeout, END_GRACE)
                _, unfinished = await asyncio.wait(callers, timeout=duration + result.end_grace_s)
                result.unfinished = len(unfinished)
                # Against the run's calls; the warm-up's (which connected too) only if none finished.
                now, slowest_ns = clock(), max(slowest_ns, max(latencies, default=0)) or warmup_ns
                result.stuck = sum(now - began[index] > STUCK_FACTOR * slowest_ns
                                   for index, task in enumerate(callers) if task in unfinished)
        except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels us): report what was measured
            result.interrupted = True
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)
            result.elapsed_s = time.perf_counter() - started
            if result.unfinished:  # calls/s over --duration, or to the last answer in the grace
                result.elapsed_s = max(duration, last_done_ns / 1e9 - started)
            ticker.cancel()
            for task in callers:
                task.cancel()
            await asyncio.gather(ticker, *callers, return_exceptions=True)
        if progress is not None:
            progress.update(progress.length - progress.pos)
    finally:
        await client.close()
    return result


async def _tick(progress, result: Result, started: float, by_time: bool) -> None:
    """Move the progress bar a few times a second (by calls made, or by seconds elapsed)."""
    if progress is None:
        return
    while True:
        await asyncio.sleep(0.2)
        done = int((time.perf_counter() - started) * 10) if by_time else result.calls
        progress.update(min(done, progress.length) - progress.pos)


def build_request(method_descriptor, payload_size: int, data: str | None, size_given: bool = False) -> bytes:
    """``data`` as JSON if given; else fill the first bytes/string field with ``payload_size`` bytes.

    A request type without such a field is sent empty, unless ``size_given`` (--payload-size on
    the command line): then it is a usage error, as a size that cannot be applied."""
    request = message_class(method_descriptor.input_type)()
    if data is not None:
        try:
            json_format.Parse(data, request)
        except json_format.ParseError as exc:
            raise click.BadParameter(str(exc), param_hint="--data") from None
        return request.SerializeToString()
    for field_ in method_descriptor.input_type.fields:
        if field_.type == FieldDescriptor.TYPE_BYTES and not _repeated(field_):
            setattr(request, field_.name, b"x" * payload_size)
            break
        if field_.type == FieldDescriptor.TYPE_STRING and not _repeated(field_):
            setattr(request, field_.name, "x" * payload_size)
            break
    else:
        if size_given:
            raise click.UsageError(f"{method_descriptor.input_type.full_name} has no bytes or string field for "
                                   f"--payload-size to fill: give the request as JSON with --data")
    return request.SerializeToString()


def has_payload_field(method_descriptor) -> bool:
    """Whether build_request can fill a field of the request with the generated payload."""
    return any(f.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING) and not _repeated(f)
               for f in method_descriptor.input_type.fields)


def _repeated(field_) -> bool:
    if hasattr(field_, "is_repeated"):  # protobuf >= 6; `label` is gone in 7
        return field_.is_repeated
    return field_.label == FieldDescriptor.LABEL_REPEATED


# ----------------------------------------------------------------------------- spawning

class Spawned:
    """K brokers and N workers started as subprocesses on ipc:// paths; each stopped by PID."""

    def __init__(self, workers: int, worker_target: str, worker_concurrency: int, brokers: int = 1):
        self.count = workers
        self.worker_target = worker_target
        self.worker_concurrency = worker_concurrency
        self.directory = tempfile.mkdtemp(prefix="zrpc-loadtest-")
        # Several brokers share nothing: every worker serves all of them, clients spread calls.
        self.frontends = [f"ipc://{self.directory}/frontend-{index}" for index in range(brokers)]
        self.backends = [f"ipc://{self.directory}/backend-{index}" for index in range(brokers)]
        self.processes: list[subprocess.Popen] = []
        self.brokers: list[subprocess.Popen] = []
        self._logs: list = []

    @property
    def workers(self) -> list[subprocess.Popen]:
        return [process for process in self.processes if process not in self.brokers]

    def __enter__(self) -> "Spawned":
        try:
            for index in range(len(self.frontends)):
                self._start_broker(index)
            for index in range(self.count):
                self._start_worker(index)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _zrpc(self, *args: str, log_name: str, stdout) -> subprocess.Popen:
        log = open(os.path.join(self.directory, log_name), "wb")
        self._logs.append(log)
        # --worker is imported as `zrpc worker run` would from here: the current directory first
        # (a tester's own service), then the repository root (workers.echo).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")])))
        process = subprocess.Popen([sys.executable, "-m", "zrpc", *args], cwd=REPO_ROOT, env=env,
                                   stdin=subprocess.DEVNULL, stdout=stdout, stderr=log)
        self.processes.append(process)
        return process

    def _start_broker(self, index: int) -> None:
        log_name = f"broker-{index}.log"
        broker = self._zrpc("broker", "start", "--frontend", self.frontends[index], "--backend", self.backends[index],
                            "--unknown-service-grace", "0", "--log-level", "WARNING",
                            log_name=log_name, stdout=subprocess.PIPE)
        self.brokers.append(broker)
        lines: queue.Queue = queue.Queue()

        def read() -> None:  # keeps draining stdout so the broker never blocks on a full pipe
            for raw in broker.stdout:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=read, name="broker-stdout", daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CliError(f"spawned broker printed no ready line within {STARTUP_TIMEOUT:g}s"
                               + self._log_tail(log_name)) from None
            if line is None:
                raise CliError(f"spawned broker exited with status {broker.wait()}"
                               + self._log_tail(log_name))
            if line.startswith("zrpc broker ready:"):
                return

    def _start_worker(self, index: int) -> None:
        self._zrpc("worker", "run", self.worker_target, "--broker", ",".join(self.backends),
                   "--concurrency", str(self.worker_concurrency), "--drain-grace", "1",
                   "--log-level", "WARNING", log_name=f"worker-{index}.log", stdout=subprocess.DEVNULL)

    def wait_for_workers(self, service: str) -> None:
        """Until each broker's ListServices shows every spawned worker live for ``service`` (bounded)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for frontend in self.frontends:
            with Client(frontend, timeout=STARTUP_TIMEOUT) as client:
                while True:
                    self._check_alive()
                    listing = _discovery.list_services(client, [frontend], 2.0)
                    live = max((s.live_workers for s in listing.services if s.name == service), default=0)
                    if live >= self.count:
                        break
                    others = {s.name: s.live_workers for s in listing.services if s.live_workers and s.name != service
                              and not s.name.startswith("zrpc.")}
                    if not live and sum(others.values()) >= self.count:  # they are up, serving something else
                        raise CliError(f"the spawned workers ({self.worker_target}) offer "
                                       f"{', '.join(sorted(others))}, not {service}: give --service "
                                       f"one of theirs")
                    if time.monotonic() >= deadline:
                        raise CliError(
                            f"only {live} of {self.count} spawned workers offered {service} at {frontend} "
                            f"within {STARTUP_TIMEOUT:g}s" + self._log_tail("worker-0.log"))
                    time.sleep(0.05)  # polling a condition, bounded by the deadline

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                name = f"broker-{self.brokers.index(process)}.log" if process in self.brokers else \
                    f"worker-{self.workers.index(process)}.log"
                raise CliError(f"spawned process {process.pid} exited with status "
                               f"{process.returncode}" + self._log_tail(name))

    def stop(self) -> None:
        """SIGTERM every process (workers before the brokers), SIGKILL what is left after a bound."""
        for group in (self.workers, self.brokers):
            for process in group:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for process in group:
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
                    process.wait(STOP_TIMEOUT)
        for log in self._logs:
            log.close()
        self._logs = []
        shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self, name: str, lines: int = 5) -> str:
        try:
            text = pathlib.Path(self.directory, name).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return ("; last log lines: " + " | ".join(text[-lines:])) if text else ""


# ----------------------------------------------------------------------------- the command

class _Command(ExitOnInterrupt, click.Command):
    """Ctrl-C before the run (spawning, the warm-up call) exits 130 as in `zrpc`; during the run
    the report of the calls made so far comes first (see run_load)."""


@click.command(cls=_Command,
               context_settings={"auto_envvar_prefix": "ZRPC_LOADTEST", "help_option_names": ["-h", "--help"]})
@click.option("--broker", "-b", "brokers", multiple=True, default=["tcp://127.0.0.1:5555"], show_default=True,
              metavar="ENDPOINT", show_envvar=True, envvar=["ZRPC_LOADTEST_BROKER", "ZRPC_BROKER"],
              help="Broker frontend; repeat or comma-separate for several (ignored with --spawn).")
@click.option("--service", "target", default="echo.Echo/Say", show_default=True, metavar="SERVICE/METHOD",
              show_envvar=True, envvar="ZRPC_LOADTEST_SERVICE", help="Method to call.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=32, show_default=True, metavar="N",
              show_envvar=True, help="Calls kept in flight.")
@click.option("--requests", "-n", type=click.IntRange(min=1), default=None, show_envvar=True, metavar="N",
              help="Calls to make [default: 20000, or unlimited with --duration].")
@click.option("--duration", "-d", type=FiniteRange(min=0.001), default=None, metavar="SECONDS",
              show_envvar=True, help="Stop after this long (or after --requests calls, if given too: whichever comes "
              "first); calls still in flight 1 s later are cancelled and reported.")
@click.option("--payload-size", type=click.IntRange(min=0), default=100, show_default=True, metavar="BYTES",
              show_envvar=True, help="Size of the request's first bytes/string field (not with --data).")
@click.option("--data", default=None, metavar="JSON", show_envvar=True,
              help="Request as JSON instead of a generated payload; the summary gives its serialized size.")
@click.option("--timeout", "-t", type=FiniteRange(min=0.001), default=10.0, show_default=True,
              metavar="SECONDS", show_envvar=True, help="Deadline of each call.")
@click.option("--spawn", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              show_envvar=True, help="Start a broker (or --spawn-brokers K) and N worker processes (ipc://, temp dir) for the run.")
@click.option("--spawn-brokers", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              show_envvar=True, help="With --spawn: start K brokers; every worker serves all, calls spread over them.")
@click.option("--worker", "worker_target", default="workers.echo:Echo", show_default=True,
              metavar="MODULE:CLASS", show_envvar=True,
              envvar="ZRPC_LOADTEST_WORKER", help="What --spawn runs (imported from the current directory, "
              "then the repository root).")
@click.option("--worker-concurrency", type=click.IntRange(min=1), default=16, show_default=True, metavar="N",
              show_envvar=True, help="--concurrency of each spawned worker.")
@click.option("--max-errors", type=FiniteRange(min=0.0, max=1.0), default=0.0, show_default=True,
              metavar="FRACTION", show_envvar=True,
              help="Exit with status 1 when more than this fraction of the calls failed or were stuck after "
              f"--duration (unanswered and in flight {STUCK_FACTOR} times as long as the slowest call that "
              "finished) (0: any failed call; 1: never, for a method that fails by design). A first call failing "
              "UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED or PERMISSION_DENIED still stops the run: "
              "no call can reach a handler (exit 10 + its code, as in `zrpc call`).")
@click.option("--json", "as_json", is_flag=True, default=False, show_envvar=True, envvar="ZRPC_LOADTEST_JSON",
              help="Print one line of JSON instead of the summary (and no progress bar).")
@curve_options
def main(brokers, target, concurrency, requests, duration, payload_size, data, timeout, spawn, spawn_brokers,
         worker_target, worker_concurrency, max_errors, as_json) -> None:
    """Keep CONCURRENCY calls in flight and report calls/s and latency percentiles.

    Exits 1 when more calls failed than --max-errors allows (the report is printed first); a call
    stuck at the end of --duration counts as failed.
    """
    if spawn_brokers > 1 and not spawn:
        raise click.UsageError("--spawn-brokers starts brokers for --spawn N workers: give --spawn too")
    ctx = click.get_current_context()
    for name, flag in (("worker_target", "--worker"), ("worker_concurrency", "--worker-concurrency")):
        given = ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
        if given and not spawn:  # a tester's --worker workers.kv:KeyValue load-tested echo.Echo/Say instead
            raise click.UsageError(f"{flag} is for the workers --spawn N starts: give --spawn too, or "
                                   f"--service for a method of the workers at --broker")
    curve = curve_settings()  # both or neither; describing the service uses them too
    if spawn and curve["curve_secret"]:
        raise click.UsageError("--spawn starts brokers without CURVE: --broker-key and --curve-secret "
                               "are for a --broker that requires it")
    tune_allocator()  # large payloads are reused, as in the broker and workers it drives
    if requests is None and duration is None:
        requests = 20_000
    source = click.get_current_context().get_parameter_source("payload_size")
    size_given = source in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    if data is not None and size_given:
        raise click.UsageError("--payload-size sizes a generated request; with --data the request is yours")
    service, method = _discovery.split_target(target)
    with contextlib.ExitStack() as stack:
        if spawn:
            spawned = stack.enter_context(Spawned(spawn, worker_target, worker_concurrency, spawn_brokers))
            endpoints = spawned.frontends
            spawned.wait_for_workers(service)
        else:
            endpoints = split_endpoints(brokers)
        with _discovery.connect(endpoints, timeout) as client:
            _, service_descriptor = _discovery.describe(client, endpoints, service, min(timeout, 5.0))
        method_descriptor = _discovery.find_method(service_descriptor, method)
        payload = build_request(method_descriptor, payload_size, data, size_given)
        empty_request = data is None and not has_payload_field(method_descriptor)

        show_progress = not as_json and sys.stderr.isatty()
        progress = None
        if show_progress:
            length = requests if duration is None else int(duration * 10)
            progress = stack.enter_context(click.progressbar(length=length, label="calls" if duration is None else "time",
                                                                 file=sys.stderr))
        result = asyncio.run(run_load(endpoints, service, method, payload, is_idempotent(method_descriptor),
                                      concurrency, requests, duration, timeout, progress, curve,
                                      errors_allowed=max_errors >= 1))
    report = summary(result, concurrency=concurrency,
                     payload_size=None if data is not None or empty_request else payload_size,
                     target=target, brokers=endpoints, spawned_workers=spawn, request_bytes=len(payload))
    if empty_request:
        report["empty_request"] = True
    if result.unfinished:
        report.update(unfinished=result.unfinished, stuck=result.stuck, end_grace_s=result.end_grace_s)
    if result.interrupted:
        report["interrupted"] = True
    if result.terminated:
        report["terminated"] = True
    if as_json:
        click.echo(json.dumps(report, separators=(",", ":")))
    else:
        click.echo(format_summary(report), nl=False)
    # A stuck call counts as failed: a broker or workers that stopped mid-run leave every call in
    # flight unanswered, and that run did not pass. Calls merely cut short by the end are not.
    failed = result.calls - result.ok + result.stuck
    if failed and failed > max_errors * (result.calls + result.stuck):
        click.echo(f"error: {_failed_text(result)}, more than --max-errors {max_errors:g} allows", err=True)
        sys.exit(1)
    if result.interrupted:
        sys.exit(EXIT_TERMINATED if result.terminated else EXIT_INTERRUPTED)  # as `zrpc` commands exit


def _failed_text(result: Result) -> str:
    failed, stuck = result.calls - result.ok, result.stuck
    total = result.calls + stuck
    share = f"({100 * (failed + stuck) / total:.1f} %)"
    left = f"stuck (no answer {result.end_grace_s:g} s after --duration)"
    if not stuck:
        return f"{failed} of {total} calls failed {share}"
    if not failed:
        return f"{stuck} of {total} calls {left} {share}"
    return f"{failed} of {total} calls failed and {stuck} {left} {share}"


if __name__ == "__main__":
    main(prog_name="loadtest.py")
