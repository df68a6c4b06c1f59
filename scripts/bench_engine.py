#!/usr/bin/env python3
"""The broker's own logic per call, without sockets: what a change to BrokerEngine costs or saves.

bench.py measures whole processes, where the engine's share of a call (~9 us of the broker's
~14 at 32 in flight) moves less than the noise of a shared machine. Here a BrokerEngine, with
the CallStats observer that a real broker installs, is driven the way its loop drives it: a
client's calls arrive as REQUEST_BATCHes of --per-message calls, one worker (workers.echo's
descriptors) answers every call of the round in one REPLY_BATCH, and the outboxes are flushed
each round. The frames are made beforehand, the worker's reply headers too: the timed part is
the engine alone. Each round's answers are counted, so a broken engine fails instead of looking
fast.

    python scripts/bench_engine.py                  # median of 7 runs, ~5 s
    python scripts/bench_engine.py --in-flight 128 --runs 15
"""
from __future__ import annotations

import gc
import pathlib
import statistics
import sys
import time

import click
from google.protobuf import descriptor_pb2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from workers.echo import echo_pb2  # noqa: E402
from zrpc import _protocol as p  # noqa: E402
from zrpc._broker import BrokerConfig, BrokerEngine  # noqa: E402
from zrpc._broker._stats import CallStats  # noqa: E402

CLIENT = b"\x00\x00\x00\x00\x01"
WORKER = b"\x00\x00\x00\x00\x02"
SERVICE, METHOD = "echo.Echo", "Say"


def _echo_descriptors() -> bytes:
    file = descriptor_pb2.FileDescriptorProto()
    echo_pb2.DESCRIPTOR.CopyToProto(file)
    return descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString()


class EngineRun:
    """One engine with one registered worker, and the messages of ``rounds`` rounds made ahead."""

    def __init__(self, rounds: int, in_flight: int, per_message: int, payload_size: int):
        self.now = 1000.0
        self.engine = BrokerEngine(BrokerConfig(unknown_service_grace=0.0), self.now)
        CallStats(self.engine).install()
        ready = p.Ready(services=[SERVICE], capacity=in_flight, heartbeat_ms=1000, name="bench",
                        batches=True, file_descriptor_set=_echo_descriptors())
        self.engine.on_backend(WORKER, p.ready_message(ready), self.now)
        self._flush()
        self.in_flight = in_flight
        payload = echo_pb2.EchoRequest(payload=b"x" * payload_size).SerializeToString()
        self.requests = []  # per round: the client's messages
        request_id = 0
        for _ in range(rounds):
            messages = []
            for start in range(0, in_flight, per_message):
                count = min(per_message, in_flight - start)
                headers = []
                for _ in range(count):
                    request_id += 1
                    headers.append(p.RequestHeader(request_id=request_id, service=SERVICE, method=METHOD,
                                                   deadline_ms=30_000, reads_batches=True).SerializeToString())
                messages.append(p.batch_message(p.REQUEST_BATCH, headers, [payload] * count))
            self.requests.append(messages)
        self.payload = payload

    def _flush(self) -> tuple[list, list]:
        engine = self.engine
        engine.flush()
        out = engine.backend_out, engine.frontend_out
        engine.backend_out, engine.frontend_out = [], []
        return out

    def run(self) -> float:
        """Seconds the engine spent on all rounds; raises when a call went unanswered."""
        engine, payload = self.engine, self.payload
        dispatch_ids = iter(range(1, 1 << 62))  # the engine numbers its dispatches 1, 2, ... in order
        spent = 0.0
        for messages in self.requests:
            # The worker's answer to this round, made before the clock starts.
            reply = p.batch_message(p.REPLY_BATCH,
                                    [p.encode_ok_reply_header(next(dispatch_ids)) for _ in range(self.in_flight)],
                                    [payload] * self.in_flight)
            started = time.perf_counter()
            for frames in messages:
                engine.on_frontend(CLIENT, frames, self.now)
            to_worker, _ = self._flush()
            engine.on_backend(WORKER, reply, self.now)
            _, to_client = self._flush()
            spent += time.perf_counter() - started
            answered = sum(len(p.batch_pairs(frames[2:])) for _, frames in to_client)
            sent = sum(len(p.batch_pairs(frames[2:])) for _, frames in to_worker)
            if sent != self.in_flight or answered != self.in_flight:
                raise RuntimeError(f"round lost calls: {self.in_flight} sent, {sent} dispatched, {answered} answered")
            self.now += 0.0005
        return spent


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--in-flight", type=click.IntRange(1, 10_000), default=32, show_default=True,
              help="Calls per round: all dispatched to the one worker, all answered.")
@click.option("--per-message", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Calls per client REQUEST_BATCH (zrpc's AsyncClient sends 8 at a time).")
@click.option("--payload-size", type=click.IntRange(0), default=100, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=1000, show_default=True, help="Rounds per run.")
@click.option("--runs", type=click.IntRange(1), default=7, show_default=True,
              help="Runs, each on a fresh engine; the median and the fastest are printed.")
def main(in_flight: int, per_message: int, payload_size: int, rounds: int, runs: int) -> None:
    """Print the broker engine's microseconds per call (no sockets, no loop)."""
    per_call = []
    for _ in range(runs):
        bench = EngineRun(rounds, in_flight, per_message, payload_size)
        gc.collect()
        per_call.append(bench.run() / (rounds * in_flight) * 1e6)
    click.echo(f"broker engine: {statistics.median(per_call):.2f} us per call (median of {runs} runs; fastest "
               f"{min(per_call):.2f}); {in_flight} calls in flight, {per_message} per client message, "
               f"{payload_size} B payloads, {rounds} rounds per run")


if __name__ == "__main__":
    main()
