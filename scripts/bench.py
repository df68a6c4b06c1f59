#!/usr/bin/env python3
"""zrpc against its physical limit and its peers, in one run (issue 4).

Every system is driven by the same load: ``--concurrency`` asyncio tasks, each calling echo
after echo with a ``--payload-size`` byte EchoRequest, timed one call at a time with
``time.perf_counter``; percentiles are exact (nearest rank over every call of the cell).

  b   zmq.proxy (the C device, ROUTER/DEALER) + minimal Python echo peer: the baseline. The
      peer answers each REQUEST with one REPLY of pairs, so the client sends pairs too: the
      C device moving the messages of a protocol without batches (PROTOCOL.md §4c)
  a   zrpc broker + one zrpc Worker process serving workers.echo:Echo
  ap  a, with busy_poll on in the broker and the worker (--busy-poll): after a message each polls
      without sleeping for that long, instead of waking up per message (README "Busy polling")
  a2  zrpc broker + the minimal echo peer speaking the worker protocol (the broker's own cost)
  c   the minimal echo peer as a ROUTER the client connects to: no broker at all. It answers
      in batches as zrpc's broker does, so (c) shows what the client alone can generate
  d   gRPC Python: grpc.aio server and client, generic handlers (skipped without grpcio)

a, a2, b and c are driven by zrpc.AsyncClient; d by a grpc.aio channel. Every server is its own
process started here (scripts/_bench_peers.py) on ipc:// paths in a temporary directory (gRPC:
127.0.0.1, ephemeral port) and stopped by PID at the end.

Then: broker CPU microseconds per call, broker RSS with --queued requests waiting, 1 MiB payloads
through a and b at concurrency 4, and with --profile FILE a py-spy profile of the broker under a2.

    python scripts/bench.py                                 # the full table, ~1.5 minutes
    python scripts/bench.py --rounds 3 --quiet-wait 5       # medians of 3 alternating rounds, ~5 minutes
    python scripts/bench.py --systems a,b --concurrency 32 --duration 5
    python scripts/bench.py --json > bench.json

On a shared or virtual machine whose speed drifts, use --rounds: every cell is measured once
per round, the systems alternating, and each ratio to (b) is taken within its round.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import multiprocessing
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable, Iterator

import click

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _bench_peers as peers  # noqa: E402  (puts the repository on sys.path too)

import zmq  # noqa: E402

from workers.echo import echo_pb2  # noqa: E402
from zrpc import _protocol as p  # noqa: E402
from zrpc import tune_allocator  # noqa: E402

SYSTEMS = {
    "b": "zmq.proxy (C) + echo peer",
    "a": "zrpc broker + zrpc Worker",
    "ap": "a, busy-polling",
    "a2": "zrpc broker + echo peer",
    "c": "direct: client -> echo peer",
    "d": "gRPC Python (grpc.aio)",
}
BASELINE = "b"
CALL_TIMEOUT = 30.0
# The first call of a cell may wait for the worker to register; it is retried this long.
START_TIMEOUT = 30.0
MIB = 1 << 20
# A cell during which other processes used this much of a core (percent) is flagged as noisy.
NOISY_PERCENT = 15.0
_NOT_SERVERS = ("client", "client_max_process", "other")


# ---------------------------------------------------------------------------------- load driving

async def _open_caller(kind: str, endpoint: str, payload_size: int):
    """An ``await call()`` making one echo call, and the coroutine function that closes it."""
    payload = b"x" * payload_size
    if kind == "grpc":
        import grpc

        channel = grpc.aio.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", -1),
                                                              ("grpc.max_send_message_length", -1)])
        say = channel.unary_unary(f"/{peers.ECHO_SERVICE}/{peers.ECHO_METHOD}",
                                  request_serializer=echo_pb2.EchoRequest.SerializeToString,
                                  response_deserializer=echo_pb2.EchoReply.FromString)
        request = echo_pb2.EchoRequest(payload=payload)

        async def call() -> None:
            await say(request, timeout=CALL_TIMEOUT)

        return call, channel.close
    import zrpc

    client = zrpc.AsyncClient(endpoint, timeout=CALL_TIMEOUT)
    raw = echo_pb2.EchoRequest(payload=payload).SerializeToString()
    service, method, call_ = peers.ECHO_SERVICE, peers.ECHO_METHOD, client.call

    async def call() -> None:
        await call_(service, method, raw, timeout=CALL_TIMEOUT)

    return call, client.close


async def _phase(call, concurrency: int, until: float | None, count: int | None):
    """``concurrency`` tasks calling back to back until ``until`` (perf_counter) or ``count`` calls.

    Returns (latencies in seconds, elapsed seconds, errors by exception type).
    """
    perf = time.perf_counter
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tickets = [count]

    async def loop() -> None:
        while True:
            if until is not None and perf() >= until:
                return
            if count is not None:
                if tickets[0] <= 0:
                    return
                tickets[0] -= 1
            started = perf()
            try:
                await call()
            except Exception as exc:  # counted and shown: a benchmark with errors is not a result
                name = f"{type(exc).__name__}: {getattr(exc, 'code', '')}"
                errors[name] = errors.get(name, 0) + 1
                continue
            latencies.append(perf() - started)

    started = perf()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, perf() - started, errors


async def _drive(kind: str, endpoint: str, payload_size: int, concurrency: int, warmup: float,
                 duration: float, requests: int | None, at_start: Callable[[], None]) -> dict:
    """Connect, wait until served, warm up, call ``at_start()``, then measure one cell."""
    call, close = await _open_caller(kind, endpoint, payload_size)
    try:
        give_up = time.monotonic() + START_TIMEOUT
        while True:
            try:
                await call()
                break
            except Exception:
                if time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(0.05)
        if warmup > 0:
            await _phase(call, concurrency, time.perf_counter() + warmup, None)
        at_start()
        cpu = time.process_time()
        until = None if requests else time.perf_counter() + duration
        latencies, elapsed, errors = await _phase(call, concurrency, until, requests)
        cpu = time.process_time() - cpu
    finally:
        await close()
    return {"latencies": latencies, "elapsed": elapsed, "errors": errors, "client_cpu": cpu}


def _driver_process(conn, barrier, kind, endpoint, payload_size, concurrency, warmup, duration, requests) -> None:
    """One of --client-processes: drive, then send the latencies back as packed doubles."""
    tune_allocator()  # as in the servers (see _bench_peers.main)
    try:
        result = asyncio.run(_drive(kind, endpoint, payload_size, concurrency, warmup, duration, requests,
                                    lambda: barrier.wait(START_TIMEOUT + 60)))
        result["latencies"] = array.array("d", result["latencies"]).tobytes()
        conn.send(result)
    except BaseException as exc:
        barrier.abort()
        conn.send({"failure": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _split(total: int, parts: int) -> list[int]:
    return [n for n in (total // parts + (1 if i < total % parts else 0) for i in range(parts)) if n]


# ---------------------------------------------------------------------------------- deployments

@dataclasses.dataclass
class Deployment:
    """A system under test: where to call it and the processes that serve it."""

    system: str
    kind: str  # "zrpc" (AsyncClient) or "grpc"
    endpoint: str
    servers: dict[str, peers.Server]

    @property
    def broker(self) -> peers.Server | None:
        return self.servers.get("broker")


@contextlib.contextmanager
def deploy(system: str, directory: pathlib.Path, capacity: int, zero_copy: bool = False,
           tag: str = "", busy_poll: float = 0.0) -> Iterator[Deployment]:
    """Start ``system``'s servers; stop each by its PID on the way out."""
    servers: dict[str, peers.Server] = {}
    name = f"{system}{tag}"
    front, back = f"ipc://{directory}/{name}-frontend", f"ipc://{directory}/{name}-backend"
    copy_flag = ["--zero-copy"] if zero_copy else []

    def start(label: str, role: str, *args: str) -> peers.Server:
        servers[label] = peers.Server(f"{name}-{label}", role, *args, log_dir=directory)
        return servers[label]

    try:
        if system in ("a", "ap", "a2"):
            polling = ["--busy-poll", str(busy_poll)] if system == "ap" else []
            start("broker", "broker", front, back, *polling)
            if system in ("a", "ap"):
                start("worker", "worker", back, str(capacity), *polling)
            else:
                start("peer", "echo-worker", back, str(capacity), *copy_flag)
            yield Deployment(system, "zrpc", front, servers)
        elif system == "b":
            start("proxy", "proxy", front, back)
            start("peer", "echo-dealer", back, *copy_flag)
            yield Deployment(system, "zrpc", front, servers)
        elif system == "c":
            start("peer", "echo-router", front, "--batches", *copy_flag)
            yield Deployment(system, "zrpc", front, servers)
        elif system == "d":
            server = start("server", "grpc-server")
            yield Deployment(system, "grpc", server.ready_words[0], servers)
        else:
            raise click.UsageError(f"unknown system {system!r}")
    finally:
        for server in reversed(list(servers.values())):
            server.stop()


def _cpu_snapshot(deployment: Deployment) -> dict[str, float]:
    return {label: server.cpu_seconds() for label, server in deployment.servers.items()}


def _wait_snapshot(deployment: Deployment) -> dict[str, float | None]:
    return {label: server.run_queue_wait() for label, server in deployment.servers.items()}


def _machine_busy_seconds() -> float:
    """CPU seconds all processes of this machine have used (every core), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / peers.CLOCK_TICKS


def wait_until_quiet(limit: float, window: float = 0.5) -> bool:
    """On a shared machine: wait (at most ``limit`` seconds) for a ``window`` in which the whole
    machine used less than NOISY_PERCENT of one core; our servers are idle between cells."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        before = _machine_busy_seconds()
        time.sleep(window)
        if 100 * (_machine_busy_seconds() - before) / window < NOISY_PERCENT:
            return True
    return False


def run_cell(deployment: Deployment, concurrency: int, payload_size: int, warmup: float, duration: float,
             requests: int | None, client_processes: int) -> dict:
    """Measure one (system, concurrency) cell; returns its row."""
    marks: dict[str, object] = {}

    def mark_start() -> None:
        marks["cpu"] = _cpu_snapshot(deployment)
        marks["wait"] = _wait_snapshot(deployment)
        marks["machine"] = _machine_busy_seconds()
        marks["wall"] = time.perf_counter()

    shares = _split(concurrency, max(1, client_processes))
    if len(shares) == 1:
        result = asyncio.run(_drive(deployment.kind, deployment.endpoint, payload_size, concurrency, warmup,
                                    duration, requests, mark_start))
        results = [result]
    else:
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(len(shares) + 1)
        pipes, processes = [], []
        per_process = _split(requests, len(shares)) if requests else [None] * len(shares)
        for share, count in zip(shares, per_process):
            parent, child = context.Pipe(duplex=False)
            process = context.Process(target=_driver_process, daemon=True, args=(
                child, barrier, deployment.kind, deployment.endpoint, payload_size, share, warmup, duration, count))
            process.start()
            child.close()
            pipes.append(parent)
            processes.append(process)
        try:
            barrier.wait(START_TIMEOUT + 60)
            mark_start()
        except Exception:
            pass  # a driver failed: its message says why
        results = []
        for pipe in pipes:
            result = pipe.recv() if pipe.poll(START_TIMEOUT + duration + 120) else {"failure": "no answer"}
            if "failure" in result:
                raise RuntimeError(f"a driver process failed: {result['failure']}")
            result["latencies"] = array.array("d", result["latencies"]).tolist()
            results.append(result)
        for process in processes:
            process.join(10)
    wall = time.perf_counter() - marks["wall"]
    cpu_after = _cpu_snapshot(deployment)
    wait_after = _wait_snapshot(deployment)
    machine_busy = _machine_busy_seconds() - marks["machine"]
    latencies = sorted(x for r in results for x in r["latencies"])
    elapsed = max(r["elapsed"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for name, n in r["errors"].items():
            errors[name] = errors.get(name, 0) + n
    calls = len(latencies)
    cpu_percent = {"client": round(100 * sum(r["client_cpu"] for r in results) / elapsed, 1),
                   "client_max_process": round(100 * max(r["client_cpu"] / r["elapsed"] for r in results), 1)}
    cpu_us_per_call = {"client": _per_call(sum(r["client_cpu"] for r in results), calls)}
    ours = sum(r["client_cpu"] for r in results)
    for label, before in marks["cpu"].items():
        used = cpu_after[label] - before
        cpu_percent[label] = round(100 * used / wall, 1)
        cpu_us_per_call[label] = _per_call(used, calls)
        ours += used
    # Whatever else ran on this machine meanwhile (in % of one core): a noisy cell shows here.
    cpu_percent["other"] = round(max(0.0, 100 * (machine_busy - ours) / wall), 1)
    # What the system could make with every core busy at the CPU per call it used (client
    # included: on this machine it shares the cores), and how busy it kept them.
    cores = len(os.sched_getaffinity(0))
    cpu_total = sum(v for v in cpu_us_per_call.values() if v is not None)
    waits = {label: _per_call(wait_after[label] - before, calls) for label, before in marks["wait"].items()
             if before is not None and wait_after[label] is not None}
    row = {
        "system": deployment.system,
        "name": SYSTEMS[deployment.system],
        "concurrency": concurrency,
        "payload_size": payload_size,
        "client_processes": len(shares),
        "calls": calls,
        "errors": errors,
        "elapsed_s": round(elapsed, 4),
        "calls_per_s": round(calls / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": _ms(_percentile(latencies, 50)),
        "p99_ms": _ms(_percentile(latencies, 99)),
        "mean_ms": _ms(sum(latencies) / calls if calls else None),
        "max_ms": _ms(latencies[-1] if calls else None),
        # Percent of one core over the cell; "client" sums the driver processes, the busiest of
        # which is "client_max_process".
        "cpu_percent": cpu_percent,
        "cpu_us_per_call": cpu_us_per_call,
        "cores": cores,
        "cpu_us_per_call_total": round(cpu_total, 2),
        "cpu_bound_calls_per_s": _cpu_bound(cores, cpu_total),
        "cores_busy_percent": round(100 * ours / (cores * wall), 1),
        # Time each server was ready to run while no core was free (µs per call, all threads).
        "run_queue_wait_us_per_call": waits,
    }
    if "broker" in cpu_us_per_call:
        row["broker_cpu_us_per_call"] = cpu_us_per_call["broker"]
    return row


def _cpu_bound(cores: int, cpu_us_per_call: float | None) -> int | None:
    return round(cores * 1e6 / cpu_us_per_call) if cpu_us_per_call else None


def _per_call(seconds: float, calls: int) -> float | None:
    return round(seconds / calls * 1e6, 2) if calls else None


def _percentile(ordered: list[float], q: float) -> float | None:
    """Exact nearest-rank percentile of a sorted list."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def add_ratios(rows: list[dict]) -> None:
    """Each row against the baseline (b) at the same concurrency and payload, measured in this run."""
    base = {(r["concurrency"], r["payload_size"]): r for r in rows if r["system"] == BASELINE}
    for row in rows:
        b = base.get((row["concurrency"], row["payload_size"]))
        row["vs_b"] = None if b is None else {
            "calls_per_s": _ratio(row["calls_per_s"], b["calls_per_s"]),
            "p50": _ratio(row["p50_ms"], b["p50_ms"]),
            "p99": _ratio(row["p99_ms"], b["p99_ms"]),
            # calls/s ÷ b this system would reach with every core busy at its CPU per call
            "cpu_bound": _ratio(row["cpu_bound_calls_per_s"], b["calls_per_s"]),
        }


def median_rows(by_round: list[list[dict]]) -> list[dict]:
    """One row per cell from several rounds: each figure (and each ratio to b, taken within its
    round) is the median over the rounds, except ``errors``, summed over them so that none is
    hidden; ``rounds`` keeps every round's calls/s and ratio."""
    if len(by_round) == 1:
        return by_round[0]
    merged = []
    for cells in zip(*by_round):  # the same cell, from every round
        row = dict(cells[0])
        for key in ("calls", "elapsed_s", "calls_per_s", "p50_ms", "p99_ms", "mean_ms", "max_ms",
                    "cpu_us_per_call_total", "cores_busy_percent"):
            row[key] = _median([cell[key] for cell in cells])
        row["calls"] = round(row["calls"])
        for group in ("cpu_percent", "cpu_us_per_call", "run_queue_wait_us_per_call"):
            row[group] = {label: _median([cell[group].get(label) for cell in cells]) for label in cells[0][group]}
        if "broker_cpu_us_per_call" in row:
            row["broker_cpu_us_per_call"] = row["cpu_us_per_call"]["broker"]
        row["cpu_bound_calls_per_s"] = _cpu_bound(row["cores"], row["cpu_us_per_call_total"])
        errors: dict[str, int] = {}
        for cell in cells:
            for name, n in cell["errors"].items():
                errors[name] = errors.get(name, 0) + n
        row["errors"] = errors
        if cells[0]["vs_b"] is not None:
            row["vs_b"] = {key: _median([cell["vs_b"][key] for cell in cells]) for key in cells[0]["vs_b"]}
        row["rounds"] = [{"calls_per_s": cell["calls_per_s"], "p99_ms": cell["p99_ms"], "vs_b": cell["vs_b"]}
                         for cell in cells]
        merged.append(row)
    return merged


def _median(values: list):
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    middle = len(known) // 2
    return known[middle] if len(known) % 2 else round((known[middle - 1] + known[middle]) / 2, 4)


def _ratio(x, y) -> float | None:
    return round(x / y, 2) if x is not None and y else None


# ---------------------------------------------------------------------------------- the extras

def queued_rss(directory: pathlib.Path, queued: int, payload_size: int) -> dict:
    """Broker VmRSS before and after ``queued`` requests wait in one service's queue.

    A raw DEALER registers echo.Echo with capacity 1 (and a heartbeat interval of an hour, so it
    never expires) and never answers; a raw DEALER client pushes the requests pipelined, 256
    pairs per message, each with a one-hour deadline and a trace id as zrpc.AsyncClient sends.
    A Health call sent after them is answered only once the broker has taken all of them in.
    """
    front, back = f"ipc://{directory}/rss-frontend", f"ipc://{directory}/rss-backend"
    broker = peers.Server("rss-broker", "broker", front, back, "--queue-size", str(queued + 1000),
                          "--unavailable-wait", "3600", log_dir=directory)
    context = zmq.Context()
    try:
        worker = context.socket(zmq.DEALER)
        client = context.socket(zmq.DEALER)
        for socket in (worker, client):
            socket.linger = 0
            socket.sndhwm = socket.rcvhwm = 0
        worker.connect(back)
        client.connect(front)
        from zrpc import broker_service_pb2
        from zrpc._descriptors import file_descriptor_set

        worker.send_multipart(p.ready_message(p.Ready(
            services=[peers.ECHO_SERVICE], capacity=1, heartbeat_ms=3_600_000, name="bench-stuck-worker",
            file_descriptor_set=file_descriptor_set([echo_pb2.DESCRIPTOR.services_by_name["Echo"]]))))
        sentinel = iter(range(10**9, 10**9 + 10**6))

        def health() -> broker_service_pb2.HealthReply:
            request_id = next(sentinel)
            header = p.RequestHeader(request_id=request_id, service="zrpc.Broker", method="Health",
                                     deadline_ms=600_000).SerializeToString()
            request = broker_service_pb2.HealthRequest(service=peers.ECHO_SERVICE).SerializeToString()
            client.send_multipart(p.request_message([(header, request)]))
            while True:
                if not client.poll(600_000):
                    raise RuntimeError("the broker did not answer Health within 600 s")
                frames = client.recv_multipart()
                for raw, payload in p.pairs(frames[2:]):
                    if p.decode_reply_header(raw).request_id == request_id:
                        return broker_service_pb2.HealthReply.FromString(payload)

        give_up = time.monotonic() + START_TIMEOUT
        while health().status != broker_service_pb2.HealthReply.SERVING:
            if time.monotonic() > give_up:
                raise RuntimeError("the stuck worker did not register")
            time.sleep(0.05)
        payload = echo_pb2.EchoRequest(payload=b"x" * payload_size).SerializeToString()
        messages = []
        for first in range(1, queued + 1, 256):
            pairs = []
            for request_id in range(first, min(first + 256, queued + 1)):
                header = p.RequestHeader(request_id=request_id, service=peers.ECHO_SERVICE, method=peers.ECHO_METHOD,
                                         deadline_ms=3_600_000, idempotent=True)
                header.metadata["trace_id"] = uuid.uuid4().hex
                pairs.append((header.SerializeToString(), payload))
            messages.append(p.request_message(pairs))
        time.sleep(0.2)
        rss_before = broker.rss_bytes()
        cpu_before = broker.cpu_seconds()
        started = time.perf_counter()
        for message in messages:
            client.send_multipart(message)
        reply = health()
        took = time.perf_counter() - started
        time.sleep(0.2)
        rss_after = broker.rss_bytes()
        cpu = broker.cpu_seconds() - cpu_before
        return {
            "queued": queued,
            "queue_depth_seen": reply.queue_depth,
            "payload_size": payload_size,
            "rss_before_mib": round(rss_before / MIB, 1),
            "rss_after_mib": round(rss_after / MIB, 1),
            "bytes_per_queued_call": round((rss_after - rss_before) / queued),
            "ingest_calls_per_s": round(queued / took),
            "broker_cpu_us_per_queued_call": round(cpu / queued * 1e6, 2),
        }
    finally:
        context.destroy(linger=0)
        broker.stop()


def profile_broker(directory: pathlib.Path, out: pathlib.Path, concurrency: int, payload_size: int,
                   capacity: int, duration: float, client_processes: int) -> dict:
    """py-spy on the broker of a2 while it serves ``concurrency`` calls in flight (a separate cell:
    sampling slows the broker, so these figures are not the table's)."""
    # Also beside this interpreter: a virtualenv's bin/ is not on PATH unless it was activated.
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if py_spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    with deploy("a2", directory, capacity, tag="-profile") as deployment:
        record = subprocess.Popen(
            [py_spy, "record", "--pid", str(deployment.broker.pid), "--output", str(out), "--format", "raw",
             "--rate", "250", "--duration", str(max(1, math.ceil(duration)))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            row = run_cell(deployment, concurrency, payload_size, 1.0, duration, None, client_processes)
            _, stderr = record.communicate(timeout=duration + 60)
        finally:
            if record.poll() is None:
                record.kill()
                record.wait()
    if record.returncode != 0 or not out.exists():
        return {"skipped": f"py-spy failed: {stderr.decode(errors='replace').strip()[-500:]}"}
    return {"file": str(out), "calls_per_s_while_sampled": row["calls_per_s"], **hot_spots(out)}


def hot_spots(path: pathlib.Path, top: int = 15) -> dict:
    """Self and inclusive share of samples per function, from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + n

    def ranked(table: dict[str, int]) -> list[list]:
        return [[name, round(100 * n / total, 1)] for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self": ranked(own), "inclusive": ranked(inclusive)} if total else {"samples": 0}


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (file.py)``: lines of one function are merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({'/'.join(file.split('/')[-2:])})" if file else name


# ---------------------------------------------------------------------------------- output

def machine() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "protobuf": version("protobuf"),
        "grpcio": version("grpcio"),
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'system':<4} {'':<28} {'conc':>5} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'calls/s÷b':>9} {'p50÷b':>6} {'p99÷b':>6}  cpu% (client | servers)")
    print(head)
    print("-" * len(head))
    for row in rows:
        ratio = row.get("vs_b") or {}
        servers = " ".join(f"{k}={v:.0f}" for k, v in row["cpu_percent"].items() if k not in ("client", "client_max_process"))
        errors = f"  ERRORS {row['errors']}" if row["errors"] else ""
        print(f"{row['system']:<4} {row['name']:<28} {row['concurrency']:>5} {row['calls_per_s']:>9,.0f} "
              f"{_fmt(row['p50_ms'], 8, 3)} {_fmt(row['p99_ms'], 8, 3)} {_fmt(ratio.get('calls_per_s'), 9, 2)} "
              f"{_fmt(ratio.get('p50'), 6, 2)} {_fmt(ratio.get('p99'), 6, 2)}  "
              f"{row['cpu_percent']['client']:.0f} | {servers}{errors}")
    spread = [row for row in rows if row.get("rounds") and row["system"] != BASELINE and row["vs_b"]]
    if spread:
        print("\ncalls/s ÷ b in each round (the table gives the median):")
        for row in spread:
            each = "  ".join(_fmt((r["vs_b"] or {}).get("calls_per_s"), 4, 2) for r in row["rounds"])
            print(f"  {row['system']:<3} concurrency {row['concurrency']:>4}: {each}")


def _fmt(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_extras(report: dict) -> None:
    print("\nCPU microseconds per call, each process (user+system, /proc/PID/stat over each cell); then what\n"
          f"that allows with all {report['machine']['cpus_usable']} cores busy, as calls/s and ÷ b, and how busy "
          "the cell kept them:")
    for row in report["rows"]:
        each = "  ".join(f"{k}={v:.0f}" for k, v in row["cpu_us_per_call"].items())
        ratio = (row.get("vs_b") or {}).get("cpu_bound")
        bound = row["cpu_bound_calls_per_s"]
        print(f"  {row['system']:<3} concurrency {row['concurrency']:>4}: {each}  total={row['cpu_us_per_call_total']:.0f}"
              f"  -> {'-' if bound is None else f'{bound:,.0f}'} calls/s{'' if ratio is None else f' = {ratio:.2f} x b'}"
              f", {row['cores_busy_percent']:.0f}% busy")
    waits = [row for row in report["rows"] if row["run_queue_wait_us_per_call"]]
    if waits:
        print("\nMicroseconds per call each server was ready to run but found no core free (run-queue wait):")
        for row in waits:
            each = "  ".join(f"{k}={v:.0f}" for k, v in row["run_queue_wait_us_per_call"].items() if v is not None)
            print(f"  {row['system']:<3} concurrency {row['concurrency']:>4}: {each}")
    rss = report.get("queued_rss")
    if rss:
        print(f"\nBroker memory with {rss['queued']:,} queued requests ({rss['payload_size']} B payload, "
              f"queue depth seen {rss['queue_depth_seen']:,}):")
        print(f"  VmRSS {rss['rss_before_mib']} MiB -> {rss['rss_after_mib']} MiB = "
              f"{rss['bytes_per_queued_call']:,} bytes per queued call; taken in at "
              f"{rss['ingest_calls_per_s']:,} calls/s ({rss['broker_cpu_us_per_queued_call']} µs CPU each)")
    large = report.get("large_payload_rows")
    if large:
        print(f"\n1 MiB payloads, concurrency {large[0]['concurrency']}:")
        for row in large:
            ratio = (row.get("vs_b") or {}).get("calls_per_s")
            extra = "; CPU µs/call " + " ".join(f"{k}={v:.0f}" for k, v in row["cpu_us_per_call"].items())
            print(f"  {row['system']:<3} {row['name']:<28} {row['calls_per_s']:>7,.0f} calls/s "
                  f"({row['calls_per_s'] * row['payload_size'] / MIB:,.0f} MiB/s each way), p50 {row['p50_ms']:.2f} ms, "
                  f"p99 {row['p99_ms']:.2f} ms{'' if ratio is None else f', {ratio:.2f} x b'}{extra}"
                  f"{'  ERRORS ' + str(row['errors']) if row['errors'] else ''}")
    prof = report.get("profile")
    if prof:
        if "skipped" in prof:
            print(f"\nProfile: skipped ({prof['skipped']})")
        else:
            print(f"\nBroker profile under a2, concurrency {prof['concurrency']} ({prof['samples']} samples of "
                  f"non-idle time, {prof['calls_per_s_while_sampled']:,.0f} calls/s while sampled; {prof['file']}):")
            print("  self %   function")
            for name, share in prof["self"]:
                print(f"  {share:6.1f}   {name}")
            print("  incl %   function")
            for name, share in prof["inclusive"]:
                print(f"  {share:6.1f}   {name}")
    if report["notes"]:
        print("\nNotes:")
        for note in report["notes"]:
            print(f"  - {note}")


def client_bound_notes(rows: list[dict]) -> list[str]:
    """Cells where the client, not the server, is what was measured."""
    notes = []
    for row in rows:
        cpu = row["cpu_percent"]
        busiest = max((v for k, v in cpu.items() if k not in _NOT_SERVERS), default=0.0)
        if cpu["client_max_process"] >= 90 and busiest < 85 and row["concurrency"] > 1:
            notes.append(f"{row['system']} at concurrency {row['concurrency']}: a client process ran at "
                         f"{cpu['client_max_process']:.0f}% CPU while the busiest server ran at {busiest:.0f}%: "
                         f"this cell measures the client; try --client-processes 2")
        if cpu["other"] >= NOISY_PERCENT:
            notes.append(f"{row['system']} at concurrency {row['concurrency']}: other processes used "
                         f"{cpu['other']:.0f}% of a core during the cell: its figures are disturbed")
    return notes


# ---------------------------------------------------------------------------------- the command

def _int_list(ctx, param, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers, e.g. 1,32,128") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter("at least one value, each 1 or more")
    return numbers


def _systems(ctx, param, value: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in SYSTEMS]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {','.join(SYSTEMS)}; got {value!r}")
    return [s for s in SYSTEMS if s in chosen]  # the baseline first, so ratios can follow each row


@click.command(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ZRPC_BENCH"})
@click.option("--systems", default="a,b,c,a2,d", show_default=True, callback=_systems,
              help="Which systems to measure: a, ap, a2, b, c, d (see the top of this file).")
@click.option("--concurrency", default="1,32,128", show_default=True, callback=_int_list,
              help="Calls in flight, comma-separated: one cell per value.")
@click.option("--payload-size", default=100, show_default=True, type=click.IntRange(min=0), help="Bytes per payload.")
@click.option("--duration", default=3.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds measured per cell (after the warm-up).")
@click.option("--requests", default=None, type=click.IntRange(min=1),
              help="Calls per cell instead of --duration.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Measure every cell this many times, alternating between the systems; report medians "
                   "(ratios to b are taken within each round). On a noisy machine, 3 or more.")
@click.option("--warmup", default=0.5, show_default=True, type=click.FloatRange(min=0), help="Seconds of warm-up per cell.")
@click.option("--client-processes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Split the concurrency over this many driver processes (one AsyncClient each).")
@click.option("--worker-capacity", default=None, type=click.IntRange(min=1),
              help="Capacity the worker (a) and the echo peer (a2) announce [default: the largest concurrency].")
@click.option("--queued", default=100_000, show_default=True, type=click.IntRange(min=0),
              help="Requests queued for the broker memory figure (0 skips it).")
@click.option("--large/--no-large", default=True, show_default=True, help="Measure 1 MiB payloads through a and b.")
@click.option("--profile", "profile_path", default=None, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Profile the broker under a2 with py-spy (raw collapsed stacks written here).")
@click.option("--profile-concurrency", default=32, show_default=True, type=click.IntRange(min=1),
              help="With --profile: calls kept in flight while the broker is profiled.")
@click.option("--busy-poll", default=0.002, show_default=True, type=click.FloatRange(min=0.0001, max=1.0),
              metavar="SECONDS", help="busy_poll of the broker and the worker in system ap.")
@click.option("--quiet-wait", default=0.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Before each cell, wait up to this long until other processes leave the CPUs idle.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the tables.")
def main(systems: list[str], concurrency: list[int], payload_size: int, duration: float, requests: int | None,
         rounds: int, warmup: float, client_processes: int, worker_capacity: int | None, queued: int, large: bool,
         profile_path: pathlib.Path | None, profile_concurrency: int, busy_poll: float, quiet_wait: float,
         as_json: bool) -> None:
    """Measure zrpc against the C proxy, no broker and gRPC; print a table (or --json)."""
    tune_allocator()  # the in-process client, as in the servers (see _bench_peers.main)
    capacity = worker_capacity or max(concurrency)
    notes: list[str] = []
    if "d" in systems:
        try:
            import grpc  # noqa: F401
        except ImportError:
            systems = [s for s in systems if s != "d"]
            notes.append("d skipped: grpcio is not installed (pip install grpcio)")
    directory = pathlib.Path(tempfile.mkdtemp(prefix="zrpc-bench-"))

    def quiet() -> None:
        if quiet_wait and not wait_until_quiet(quiet_wait):
            notes.append(f"the machine was still busy after waiting {quiet_wait:g} s before a cell")
    progress = (lambda *a: print(*a, file=sys.stderr, flush=True)) if as_json else (lambda *a: None)
    try:
        with contextlib.ExitStack() as stack:
            # Every system stays up for the whole run (idle between its cells), so that the
            # rounds can alternate between them: each round measures every cell once.
            deployments = {system: stack.enter_context(deploy(system, directory, capacity,
                                                                    busy_poll=busy_poll)) for system in systems}
            by_round: list[list[dict]] = []
            for round_number in range(1, rounds + 1):
                round_rows = []
                for level in concurrency:
                    for system in systems:
                        progress(f"bench: round {round_number}/{rounds}: {system} concurrency {level}")
                        quiet()
                        round_rows.append(run_cell(deployments[system], level, payload_size, warmup, duration,
                                                   requests, client_processes))
                add_ratios(round_rows)
                by_round.append(round_rows)
        rows = median_rows(by_round)
        report = {"command": " ".join(["scripts/bench.py", *sys.argv[1:]]), "machine": machine(), "payload_size": payload_size, "duration_s": None if requests else duration,
                  "requests": requests, "rounds": rounds, "warmup_s": warmup, "worker_capacity": capacity, "rows": rows}
        notes += client_bound_notes(rows)
        if queued:
            progress(f"bench: broker memory with {queued} queued requests")
            quiet()
            report["queued_rss"] = queued_rss(directory, queued, payload_size)
        large_systems = [s for s in ("b", "a") if s in systems]
        if large and large_systems:
            large_rows = []
            for system in large_systems:
                progress(f"bench: {system} with 1 MiB payloads")
                with deploy(system, directory, max(capacity, 4), zero_copy=True, tag="-large") as deployment:
                    quiet()
                    large_rows.append(run_cell(deployment, 4, MIB, warmup, duration, requests, client_processes))
            add_ratios(large_rows)
            notes += client_bound_notes(large_rows)
            report["large_payload_rows"] = large_rows
        if profile_path is not None:
            progress("bench: profiling the broker under a2")
            quiet()
            report["profile"] = {"concurrency": profile_concurrency, **profile_broker(
                directory, profile_path, profile_concurrency, payload_size, capacity, max(duration, 5.0),
                client_processes)}
        report["notes"] = notes
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        m = report["machine"]
        print(f"zrpc bench: {m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, pyzmq {m['pyzmq']} / "
              f"libzmq {m['libzmq']}, grpcio {m['grpcio']}; payload {payload_size} B, "
              f"{f'{requests} calls' if requests else f'{duration:g} s'} per cell"
              f"{f', medians of {rounds} alternating rounds' if rounds > 1 else ''}, "
              f"{client_processes} client process(es), worker capacity {capacity}\n")
        print(f"$ python {report['command']}\n")
        print_table(rows)
        print_extras(report)


if __name__ == "__main__":
    main()
