#!/usr/bin/env python3
"""How throughput grows with brokers, workers and client processes (issue 4, "scale past one broker").

Each row starts K brokers and W workers (every worker serves every broker: brokers share nothing) with
scripts/loadtest.py's spawner, then runs P load-generator processes at once, each keeping
--concurrency calls in flight spread over all K brokers. It prints the summed calls/s, the
worst client's p50 and p99, the ratio to the first row, and each process kind's CPU use, which
is what tells where the next core would go.

    python scripts/scale.py                      # the default matrix, ~1 minute
    python scripts/scale.py --rows 1x1x1,2x2x2 --duration 5 --json
"""
from __future__ import annotations

import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import click

SCRIPTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import _bench_peers as peers  # noqa: E402  (puts the repository on sys.path too)
import loadtest  # noqa: E402

DEFAULT_ROWS = "1x1x1,1x2x1,1x1x2,1x2x2,2x2x2,2x2x3"


def parse_rows(text: str) -> list[tuple[int, int, int]]:
    """"BxWxP,..." (brokers x workers x client processes) into tuples; a clear error otherwise."""
    rows = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            brokers, workers, clients = (int(n) for n in item.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{item!r} is not BROKERSxWORKERSxCLIENTS, e.g. 2x2x2") from None
        if min(brokers, workers, clients) < 1:
            raise click.BadParameter(f"{item!r}: every count must be at least 1")
        rows.append((brokers, workers, clients))
    if not rows:
        raise click.BadParameter("no rows given")
    return rows


def measure(brokers: int, workers: int, clients: int, concurrency: int, duration: float,
            worker_concurrency: int) -> dict:
    """One row: spawn, load from ``clients`` processes at once, read each process's CPU time."""
    with loadtest.Spawned(workers, "workers.echo:Echo", worker_concurrency, brokers) as spawned:
        spawned.wait_for_workers("echo.Echo")
        # Failed calls are counted in the row, not a reason to stop: --max-errors 1.
        argv = [sys.executable, str(SCRIPTS / "loadtest.py"), "--json", "--max-errors", "1", "-c", str(concurrency),
                "-d", str(duration), *(arg for frontend in spawned.frontends for arg in ("-b", frontend))]
        servers = {"broker": [p.pid for p in spawned.brokers], "worker": [p.pid for p in spawned.workers]}
        before = {kind: sum(peers.cpu_seconds(pid) for pid in pids) for kind, pids in servers.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generators, once reaped
        started = time.monotonic()
        runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(clients)]
        outputs = []
        for run in runs:
            out, err = run.communicate(timeout=duration + 60)
            if run.returncode != 0:
                raise click.ClickException(f"load generator failed: {err.strip()[-500:]}")
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        wall = time.monotonic() - started
        used = {kind: sum(peers.cpu_seconds(pid) for pid in pids) - before[kind] for kind, pids in servers.items()}
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used["client"] = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    calls = sum(o["calls"] for o in outputs)
    return {
        "brokers": brokers, "workers": workers, "clients": clients, "concurrency_per_client": concurrency,
        "calls": calls, "errors": sum(o["calls"] - o["ok"] for o in outputs),
        "calls_per_s": round(sum(o["calls_per_s"] for o in outputs)),
        "p50_ms": max(o["p50_us"] for o in outputs) / 1000, "p99_ms": max(o["p99_us"] for o in outputs) / 1000,
        "cpu_percent": {kind: round(100 * seconds / wall) for kind, seconds in used.items()},
        # CPU per call of each role: the model's input (a core gives a role 1e6 / this calls/s).
        "cpu_us_per_call": {kind: round(1e6 * seconds / calls, 1) if calls else None for kind, seconds in used.items()},
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rows", default=DEFAULT_ROWS, show_default=True, metavar="BxWxP,...",
              callback=lambda ctx, param, value: parse_rows(value),
              help="Configurations: brokers x workers x load-generator processes.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=32, show_default=True,
              help="Calls in flight per load-generator process.")
@click.option("--duration", "-d", type=click.FloatRange(min=0.5), default=4.0, show_default=True,
              help="Seconds of load per row.")
@click.option("--worker-concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="--concurrency of each spawned worker: the calls it holds at once (its capacity).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def main(rows, concurrency, duration, worker_concurrency, as_json) -> None:
    """Measure calls/s for each configuration in one run; ratios are to the first row."""
    results = [measure(*row, concurrency, duration, worker_concurrency) for row in rows]
    base = results[0]["calls_per_s"] or 1
    for result in results:
        result["ratio"] = round(result["calls_per_s"] / base, 2)
    if as_json:
        click.echo(json.dumps({"cpus": os.cpu_count(), "rows": results}))
        return
    click.echo(f"zrpc scale: {os.cpu_count()} CPUs, echo 100 B, {concurrency} in flight per client process, "
               f"{duration:g} s per row\n")
    click.echo(f"{'brokers':>7} {'workers':>7} {'clients':>7} {'calls/s':>9} {'ratio':>6} {'p50 ms':>7} "
               f"{'p99 ms':>7}  cpu% clients|brokers|workers   CPU us/call clients|brokers|workers")
    for r in results:
        click.echo(f"{r['brokers']:>7} {r['workers']:>7} {r['clients']:>7} {r['calls_per_s']:>9,} {r['ratio']:>6.2f} "
                   f"{r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f}  {_three(r['cpu_percent'], '{:.0f}'):<25} "
                   f"{_three(r['cpu_us_per_call'], '{:.1f}')}" + (f"  errors {r['errors']}" if r["errors"] else ""))


def _three(figures: dict, form: str) -> str:
    return "|".join(form.format(figures[kind]) for kind in ("client", "broker", "worker"))


if __name__ == "__main__":
    main()
