"""Soak run: a broker and N workers under load while workers are killed -9 and the broker once.

Every attempt of every call is recorded, Jepsen-style (call id, request id, attempt, method,
start, end, outcome), and every worker logs each execution it starts (scripts/_soak_worker.py).
Then the history is judged (issue 3's invariants): I1 each call ends with exactly one answer by
its deadline + 100 ms; I2 no reply reaches the wrong call; I3 none is delivered twice; I4 each
attempt is executed at most once per dispatch, and dispatched a second time only when it is
idempotent; I5 no execution starts after the attempt's deadline (+ the same 100 ms). Prints
calls sent, OK, errors by code, lost (sent, never answered), duplicated (answered twice, or an
answer to no call), executed twice, executed late — all must be 0 — and the faults injected.

    python scripts/soak.py --duration 60 --workers 3 --clients 4 [--json] [--history FILE]

A call in flight while the broker is down has nobody left to answer it: it ends with the
client's own DEADLINE_EXCEEDED, counted apart (`client_deadline_broker_down`), not as lost.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import click
import zmq

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workers.echo import echo_pb2
from zrpc import StatusCode
from zrpc import _protocol as p

LATE_MARGIN = 0.1  # seconds past the deadline an answer may take (issue 3, I1)


@dataclasses.dataclass(slots=True)
class Attempt:
    """One request on the wire: what was sent and what came back."""

    call_id: str
    request_id: int
    attempt: int
    method: str
    start: float
    deadline: float
    end: float | None = None
    outcome: str | None = None  # a status code name, or DEADLINE_EXCEEDED(client)
    replies: int = 0


class Child:
    """A child process (its stdout read by a thread so its ready line can be awaited)."""

    def __init__(self, argv: list[str], log_path: pathlib.Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", ZRPC_SOAK_EXEC_LOG=str(log_path.parent / "executions"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "scripts"),
                                                            os.environ.get("PYTHONPATH")])))
        self._log = open(log_path, "a")  # noqa: SIM115 - closed in stop(), outlives this call
        self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.pid = self.popen.pid
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            if " ready: " in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 20.0) -> None:
        if not self.ready.wait(timeout):
            raise click.ClickException(f"pid {self.pid} not ready within {timeout}s (log: {self._log.name})")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


class LoadClient(threading.Thread):
    """A raw DEALER keeping ``window`` calls in flight; sees every reply, duplicates included."""

    def __init__(self, index: int, frontend: str, stop_at: float, window: int, deadline: float, seed: int):
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.index = index
        self.frontend = frontend
        self.stop_at = stop_at
        self.window = window
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.history: list[Attempt] = []
        self.by_request: dict[int, Attempt] = {}
        self.strays = 0  # replies to a request id never sent
        self.misrouted = 0  # a reply whose payload belongs to another call
        self._next_id = 0
        self._calls = 0

    def run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        socket.connect(self.frontend)
        open_: dict[int, Attempt] = {}  # request id -> attempt not answered yet
        try:
            while True:
                now = time.monotonic()
                if now < self.stop_at:
                    while len(open_) < self.window:
                        attempt = self._new_call(now)
                        open_[attempt.request_id] = attempt
                        self._send(socket, attempt)
                for request_id, attempt in list(open_.items()):
                    if now >= attempt.deadline:  # the client's own deadline: it stops waiting
                        attempt.end, attempt.outcome = now, "DEADLINE_EXCEEDED(client)"
                        del open_[request_id]
                if now >= self.stop_at and not open_:
                    break
                if socket.poll(10):
                    self._receive(socket, open_)
            quiet_until = time.monotonic() + 2 * LATE_MARGIN + 0.3  # catch late and doubled replies
            while (left := quiet_until - time.monotonic()) > 0:
                if socket.poll(max(1, int(left * 1000))):
                    self._receive(socket, open_)
        finally:
            socket.close(0)
            context.term()

    def _new_call(self, now: float, call_id: str | None = None, method: str | None = None,
                  attempt_no: int = 1, deadline: float | None = None) -> Attempt:
        self._next_id += 1
        if call_id is None:
            self._calls += 1
            call_id = f"c{self.index}-{self._calls}"
            method = "Say" if self.rng.random() < 0.6 else "Sleep"
            deadline = now + self.deadline
        attempt = Attempt(call_id, self._next_id, attempt_no, method, now, deadline)
        self.history.append(attempt)
        self.by_request[attempt.request_id] = attempt
        return attempt

    def _send(self, socket: zmq.Socket, attempt: Attempt) -> None:
        payload = f"{attempt.call_id}/{attempt.attempt}".encode()
        if attempt.method == "Say":
            body = echo_pb2.EchoRequest(payload=payload).SerializeToString()
        else:
            body = echo_pb2.SleepRequest(ms=self.rng.randrange(0, 30), payload=payload).SerializeToString()
        header = p.RequestHeader(request_id=attempt.request_id, service="echo.Echo", method=attempt.method,
                                 deadline_ms=max(1, int((attempt.deadline - attempt.start) * 1000)),
                                 idempotent=attempt.method == "Say", metadata={"trace_id": attempt.call_id})
        socket.send_multipart(p.request_message([(header.SerializeToString(), body)]))

    def _receive(self, socket: zmq.Socket, open_: dict[int, Attempt]) -> None:
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            for raw, payload in p.pairs(frames[2:]):
                header = p.ReplyHeader.FromString(raw)
                attempt = self.by_request.get(header.request_id)
                if attempt is None:
                    self.strays += 1
                    continue
                attempt.replies += 1
                if attempt.replies > 1:
                    continue  # a duplicate: counted from .replies
                if attempt.outcome is None:
                    open_.pop(attempt.request_id, None)
                attempt.end = now
                code = StatusCode.from_wire(header.code)
                attempt.outcome = code.name if attempt.outcome is None else f"{code.name}(after client deadline)"
                if code == StatusCode.OK:
                    if echo_pb2.EchoReply.FromString(payload).payload != f"{attempt.call_id}/{attempt.attempt}".encode():
                        self.misrouted += 1
                elif (code == StatusCode.UNAVAILABLE and attempt.method == "Say" and attempt.attempt == 1
                      and now < attempt.deadline and now < self.stop_at):
                    # An idempotent call may be sent again (as the client's RetryPolicy does).
                    retry = self._new_call(now, attempt.call_id, "Say", 2, attempt.deadline)
                    open_[retry.request_id] = retry
                    self._send(socket, retry)


def stop_all(children: list[Child], broker: Child | None) -> None:
    """Workers first, while the broker still acknowledges their drain (without it each waits out
    its 10 s grace), then the broker. Children already stopped are skipped."""
    for child in children:
        if child is not broker:
            child.stop()
    if broker is not None:
        broker.stop()


def judge_executions(history: list[Attempt], executions: list[dict]) -> dict:
    """I4 and I5 from the workers' logs: one execution per dispatch, none after the deadline."""
    by_attempt = {(a.call_id, a.attempt): a for a in history}
    per_dispatch = collections.Counter()
    executed_twice = executed_late = redispatched = unknown = 0
    for execution in executions:
        call_id, attempt_no = execution["payload"].rsplit("/", 1)
        attempt = by_attempt.get((call_id, int(attempt_no)))
        if attempt is None:
            unknown += 1  # an execution no client asked for
            continue
        key = (call_id, attempt.attempt, execution["dispatch"])
        per_dispatch[key] += 1
        if per_dispatch[key] == 2 or execution["dispatch"] > 2 or (execution["dispatch"] == 2 and attempt.method != "Say"):
            executed_twice += 1  # the same dispatch twice, or a re-dispatch of a non-idempotent call
        redispatched += execution["dispatch"] == 2
        if execution["t"] > attempt.deadline + LATE_MARGIN:
            executed_late += 1
    return {"executions": len(executions), "redispatched_executions": redispatched,
            "executed_twice": executed_twice, "executed_late": executed_late, "executed_unknown": unknown}


def read_executions(directory: pathlib.Path) -> list[dict]:
    """Every line of every worker's execution log (a killed worker's last line may be cut)."""
    executions = []
    for path in sorted(directory.glob("exec-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                executions.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return executions


def judge(history: list[Attempt], broker_down: list[tuple[float, float]]) -> dict:
    """Check the history: one answer per attempt, by its deadline + margin, never two."""
    codes: collections.Counter[str] = collections.Counter()
    lost = duplicated = late = excused = 0
    for attempt in history:
        duplicated += max(0, attempt.replies - 1)
        if attempt.outcome == "DEADLINE_EXCEEDED(client)":
            overlaps_restart = any(attempt.start < up and attempt.deadline > down for down, up in broker_down)
            if overlaps_restart:
                excused += 1
            else:
                lost += 1
            continue
        if attempt.outcome and attempt.outcome.endswith("(after client deadline)") or attempt.end is not None and attempt.end > attempt.deadline + LATE_MARGIN:
            late += 1
        codes[attempt.outcome or "NONE"] += 1
    calls = {a.call_id for a in history}
    final: dict[str, Attempt] = {}
    for attempt in history:
        final[attempt.call_id] = attempt  # attempts are appended in order: the last one decides
    return {
        "calls_sent": len(calls), "attempts": len(history),
        "retries": len(history) - len(calls),
        "OK": sum(1 for a in final.values() if a.outcome == "OK"),
        "errors": dict(sorted(collections.Counter(a.outcome for a in final.values() if a.outcome != "OK").items())),
        "attempt_outcomes": dict(sorted(codes.items())),
        "lost": lost, "duplicated": duplicated, "late": late,
        "client_deadline_broker_down": excused,
    }


@click.command()
@click.option("--duration", type=click.FloatRange(min=1), default=60.0, show_default=True, help="Seconds of load.")
@click.option("--workers", "worker_count", type=click.IntRange(min=2), default=3, show_default=True)
@click.option("--clients", type=click.IntRange(min=1), default=4, show_default=True, help="Client threads.")
@click.option("--window", type=click.IntRange(min=1), default=8, show_default=True,
              help="Calls each client keeps in flight.")
@click.option("--deadline", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Deadline of each call, seconds.")
@click.option("--kill-every", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Mean seconds between worker kills (uniform in 0.2x..1.8x).")
@click.option("--broker-restart/--no-broker-restart", default=True, show_default=True,
              help="Kill -9 and restart the broker once, half way.")
@click.option("--heartbeat", type=click.FloatRange(min=0.01), default=0.2, show_default=True,
              help="Workers' heartbeat interval, seconds.")
@click.option("--seed", type=int, default=None, help="Random seed (printed; default: from the clock).")
@click.option("--history", "history_path", type=click.Path(dir_okay=False), default=None,
              help="Write every attempt as a JSON line here.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def main(duration, worker_count, clients, window, deadline, kill_every, broker_restart, heartbeat, seed,
         history_path, as_json) -> None:
    """Run the whole system under load and faults; exit 1 if a call was lost or duplicated."""
    seed = seed if seed is not None else int(time.time())
    rng = random.Random(seed)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="zrpc-soak-"))
    frontend, backend = f"ipc://{workdir}/frontend", f"ipc://{workdir}/backend"
    broker_argv = [sys.executable, "-m", "zrpc", "broker", "start", "--frontend", frontend, "--backend", backend,
                   "--unknown-service-grace", "3", "--log-level", "WARNING"]
    exec_dir = workdir / "executions"
    exec_dir.mkdir()
    worker_argv = [sys.executable, "-m", "zrpc", "worker", "run", "_soak_worker:LoggedEcho", "--broker", backend,
                   "--heartbeat-interval", str(heartbeat), "--concurrency", "8", "--log-level", "WARNING"]
    faults = collections.Counter()
    broker_down: list[tuple[float, float]] = []
    children: list[Child] = []
    broker: Child | None = None
    ok = False
    try:
        broker = Child(broker_argv, workdir / "broker.log")
        children.append(broker)
        broker.wait_ready()
        workers = [Child(worker_argv, workdir / "workers.log") for _ in range(worker_count)]
        children += workers
        for worker in workers:
            worker.wait_ready()
        start = time.monotonic()
        stop_at = start + duration
        load = [LoadClient(i, frontend, stop_at, window, deadline, rng.randrange(1 << 30)) for i in range(clients)]
        for client in load:
            client.start()
        restart_at = start + duration / 2 if broker_restart else float("inf")
        pause = threading.Event()  # waits between faults: the schedule, not synchronisation
        while (now := time.monotonic()) < stop_at - 1.0:
            if now >= restart_at:
                broker.kill()
                down_at = time.monotonic()
                broker = Child(broker_argv, workdir / "broker.log")
                children.append(broker)
                broker.wait_ready()
                broker_down.append((down_at, time.monotonic()))
                faults["broker_kill_9"] += 1
                restart_at = float("inf")
                continue
            pause.wait(min(rng.uniform(0.2, 1.8) * kill_every, max(0.0, stop_at - 1.0 - now)))
            if time.monotonic() >= stop_at - 1.0:
                break
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            faults["worker_kill_9"] += 1
            workers[victim] = Child(worker_argv, workdir / "workers.log")
            children.append(workers[victim])
            workers[victim].wait_ready()
        for client in load:
            client.join(deadline + 30)
        history = [attempt for client in load for attempt in client.history]
        figures = judge(history, broker_down)
        figures["duplicated"] += sum(c.strays for c in load)
        figures["misrouted"] = sum(c.misrouted for c in load)
        stop_all(children, broker)  # every worker stopped: their logs are complete
        figures.update(judge_executions(history, read_executions(exec_dir)))
        figures["faults_injected"] = dict(faults)
        figures["duration_s"] = duration
        figures["seed"] = seed
        if history_path:
            with open(history_path, "w") as out:
                out.writelines(json.dumps(dataclasses.asdict(attempt)) + "\n" for attempt in history)
        ok = not any(figures[name] for name in ("lost", "duplicated", "misrouted", "executed_twice",
                                                 "executed_late", "executed_unknown"))
    finally:
        stop_all(children, broker)
    if as_json:
        click.echo(json.dumps(figures, sort_keys=True))
    else:
        click.echo(f"soak {duration:g}s seed {seed}: calls sent {figures['calls_sent']} "
                   f"(attempts {figures['attempts']}, retries {figures['retries']}), OK {figures['OK']}, "
                   f"errors {figures['errors']}, lost {figures['lost']}, duplicated {figures['duplicated']}, "
                   f"misrouted {figures['misrouted']}, late {figures['late']}, "
                   f"executions {figures['executions']} (re-dispatched {figures['redispatched_executions']}, "
                   f"twice {figures['executed_twice']}, after deadline {figures['executed_late']}), "
                   f"client deadline while broker down {figures['client_deadline_broker_down']}, "
                   f"faults injected {figures['faults_injected']}")
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        click.echo(f"FAILED: an invariant does not hold; logs kept in {workdir}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
