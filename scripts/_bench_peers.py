"""The server processes scripts/bench.py starts, one role per process: ``python _bench_peers.py ROLE ...``.

Each role binds or connects, prints one ``ready ...`` line on stdout, then serves until it is
killed by PID. The echo peers are deliberately minimal: they decode only the RequestHeader (for
its request id) and send the payload back as is (EchoRequest and EchoReply have the same wire
form), so what is left of their cost is ZeroMQ plus one protobuf header each way.

Roles:
  broker FRONTEND BACKEND [--queue-size N]   zrpc broker (zrpc.Broker)
  worker BACKEND CAPACITY                    zrpc Worker serving workers.echo:Echo
  proxy FRONTEND BACKEND                     zmq.proxy(ROUTER, DEALER), the C device
  echo-dealer ENDPOINT [--zero-copy]         echo peer behind the proxy (DEALER, connects)
  echo-router ENDPOINT [--zero-copy] [--batches]  echo peer clients call directly (ROUTER, binds)
  echo-worker BACKEND CAPACITY [--zero-copy] echo peer speaking the worker protocol (READY, heartbeats)
  grpc-server                                grpc.aio echo server on 127.0.0.1, ephemeral port
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import selectors
import signal
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from zrpc import _protocol as p  # noqa: E402
from zrpc import tune_allocator  # noqa: E402

ECHO_SERVICE = "echo.Echo"
ECHO_METHOD = "Say"
# The echo peer's heartbeat interval as announced in READY (spec §7, §11).
PEER_HEARTBEAT_MS = 1000


# ---------------------------------------------------------------------------------- the echo loop

def _reply_frames(frames: list, first: int, zero_copy: bool) -> list:
    """REPLY frames answering the REQUEST in ``frames[first:]`` (spec §4: one pair per pair)."""
    encode, parse = p.encode_ok_reply_header, p.RequestHeader.FromString
    out = [p.TAG, p.REPLY]
    for i in range(first + 2, len(frames), 2):
        raw = frames[i].bytes if zero_copy else frames[i]
        out.append(encode(parse(raw).request_id))
        out.append(frames[i + 1])  # a zmq.Frame is re-sent without a copy
    return out


def _command(frames: list, first: int, zero_copy: bool) -> bytes:
    """The command byte of the zrpc message in ``frames[first:]``; b"" for anything else."""
    if len(frames) < first + 2:
        return b""
    tag, command = frames[first], frames[first + 1]
    if zero_copy:
        tag, command = tag.bytes, command.bytes
    return command if tag == p.TAG else b""


def _reply_batch(blob: bytes) -> list:
    """The REPLY_BATCH answering a REQUEST_BATCH (spec §4b): one reply header per request header."""
    batch = p.RequestBatch.FromString(blob)
    encode = p.encode_ok_reply_header
    return p.batch_message(p.REPLY_BATCH, [encode(h.request_id) for h in batch.headers], list(batch.payloads))


def _batched_replies(frames: list, first: int, zero_copy: bool) -> list[list]:
    """The messages answering the REQUEST in ``frames[first:]`` for a client that reads batches
    (spec §4c): its small answers in REPLY_BATCH messages, a large one in a REPLY of its own."""
    def data(frame):
        return frame.bytes if zero_copy else frame

    headers, payloads, messages = [], [], []
    body = frames[first + 2:]
    for raw, payload in zip(body[::2], body[1::2]):
        header = p.encode_ok_reply_header(p.RequestHeader.FromString(data(raw)).request_id)
        if len(header) + len(payload) < p.BATCH_CALL_BYTES:
            headers.append(header)
            payloads.append(data(payload))
        else:
            messages.append([p.TAG, p.REPLY, header, payload])
    return p.batch_messages(p.REPLY_BATCH, headers, payloads, p.MAX_CALLS_PER_MESSAGE) + messages


def echo_routed(socket: zmq.Socket, zero_copy: bool, batches: bool = False) -> None:
    """Serve forever on a socket whose messages start with a routing id (ROUTER, or DEALER behind
    the proxy, which receives the frontend's routing id): send it back first, then the REPLY.

    ``batches``: speak spec §4c as zrpc's broker does to its clients: answer in a REPLY_BATCH a
    client that says it reads them, and answer its REQUEST_BATCH.
    """
    recv, send = socket.recv_multipart, socket.send_multipart
    copy = not zero_copy
    while True:
        frames = recv(copy=copy)
        command = _command(frames, 1, zero_copy)
        if command == p.REQUEST and len(frames) >= 5:
            if batches and p.RequestHeader.FromString(frames[3].bytes if zero_copy else frames[3]).reads_batches:
                for message in _batched_replies(frames, 1, zero_copy):
                    send([frames[0], *message], copy=copy)
            else:
                send([frames[0], *_reply_frames(frames, 1, zero_copy)], copy=copy)
        elif batches and command == p.REQUEST_BATCH and len(frames) == 4:
            send([frames[0], *_reply_batch(frames[3].bytes if zero_copy else frames[3])])


def echo_worker(socket: zmq.Socket, capacity: int, zero_copy: bool) -> None:
    """The echo loop speaking the worker protocol: READY, heartbeats, REPLY per REQUEST message."""
    from zrpc._descriptors import file_descriptor_set
    from workers.echo import echo_pb2

    ready = p.ready_message(p.Ready(
        services=[ECHO_SERVICE],
        file_descriptor_set=file_descriptor_set([echo_pb2.DESCRIPTOR.services_by_name["Echo"]]),
        capacity=capacity, heartbeat_ms=PEER_HEARTBEAT_MS, name=f"bench-echo-peer:{os.getpid()}", batches=True))
    interval = PEER_HEARTBEAT_MS / 1000
    socket.send_multipart(ready)
    last_sent = time.monotonic()
    copy = not zero_copy
    while True:
        if socket.poll(PEER_HEARTBEAT_MS // 2, zmq.POLLIN):
            for _ in range(256):
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK, copy=copy)
                except zmq.Again:
                    break
                command = _command(frames, 0, zero_copy)
                if command == p.REQUEST and len(frames) >= 4:
                    socket.send_multipart(_reply_frames(frames, 0, zero_copy), copy=copy)
                    last_sent = time.monotonic()
                elif command == p.REQUEST_BATCH and len(frames) == 3:
                    socket.send_multipart(_reply_batch(frames[2].bytes if zero_copy else frames[2]))
                    last_sent = time.monotonic()
                elif command == p.DISCONNECT:  # the broker forgot us (spec §11): register again
                    socket.send_multipart(ready)
                    last_sent = time.monotonic()
                # HEARTBEAT needs nothing; CANCEL cannot arrive in time to matter: we answer at once.
        now = time.monotonic()
        if now - last_sent >= interval:
            socket.send_multipart(p.heartbeat_message())
            last_sent = now


# ---------------------------------------------------------------------------------- roles

def _ready(*words: object) -> None:
    print("ready", *words, flush=True)


def _socket(kind: int) -> zmq.Socket:
    socket = zmq.Context.instance().socket(kind)
    socket.linger = 0
    socket.sndhwm = socket.rcvhwm = 100_000
    return socket


def role_broker(args) -> None:
    import logging

    from zrpc import Broker, BrokerConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    limit = max(args.queue_size, 10_000)
    broker = Broker(BrokerConfig(
        frontend=args.frontend, backend=args.backend, queue_size=args.queue_size,
        max_in_flight=max(limit, 100_000), max_outstanding_per_client=limit,
        unavailable_wait=args.unavailable_wait, busy_poll=args.busy_poll, log_level="WARNING"))
    frontend, backend = broker.bind()
    _ready(frontend, backend)
    broker.run()


def role_worker(args) -> None:
    import logging

    from workers.echo import Echo
    from zrpc import Worker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = Worker([Echo()], brokers=args.backend, concurrency=args.capacity, name="bench",
                    busy_poll=args.busy_poll)
    worker.start()
    _ready(args.backend)
    threading.Event().wait()  # serve until killed


def role_proxy(args) -> None:
    frontend, backend = _socket(zmq.ROUTER), _socket(zmq.DEALER)
    frontend.bind(args.frontend)
    backend.bind(args.backend)
    _ready(args.frontend, args.backend)
    zmq.proxy(frontend, backend)


def role_echo_dealer(args) -> None:
    socket = _socket(zmq.DEALER)
    socket.connect(args.endpoint)
    _ready(args.endpoint)
    echo_routed(socket, args.zero_copy)


def role_echo_router(args) -> None:
    socket = _socket(zmq.ROUTER)
    socket.bind(args.endpoint)
    _ready(args.endpoint)
    echo_routed(socket, args.zero_copy, args.batches)


def role_echo_worker(args) -> None:
    socket = _socket(zmq.DEALER)
    socket.connect(args.backend)
    _ready(args.backend)
    echo_worker(socket, args.capacity, args.zero_copy)


def role_grpc_server(args) -> None:
    import asyncio

    import grpc

    from workers.echo import echo_pb2

    async def say(request, context):
        return echo_pb2.EchoReply(payload=request.payload)

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1),
                                          ("grpc.max_send_message_length", -1)])
        handler = grpc.method_handlers_generic_handler(ECHO_SERVICE, {
            ECHO_METHOD: grpc.unary_unary_rpc_method_handler(
                say, request_deserializer=echo_pb2.EchoRequest.FromString,
                response_serializer=echo_pb2.EchoReply.SerializeToString)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _ready(f"127.0.0.1:{port}")
        await server.wait_for_termination()

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    broker = roles.add_parser("broker")
    broker.add_argument("frontend")
    broker.add_argument("backend")
    broker.add_argument("--queue-size", type=int, default=10_000)
    broker.add_argument("--unavailable-wait", type=float, default=5.0)
    broker.add_argument("--busy-poll", type=float, default=0.0)
    broker.set_defaults(run=role_broker)
    for name, run, endpoints in (("worker", role_worker, ("backend",)), ("echo-worker", role_echo_worker, ("backend",))):
        sub = roles.add_parser(name)
        sub.add_argument("backend")
        sub.add_argument("capacity", type=int)
        sub.add_argument("--zero-copy", action="store_true")
        sub.set_defaults(run=run)
    roles.choices["worker"].add_argument("--busy-poll", type=float, default=0.0)
    proxy = roles.add_parser("proxy")
    proxy.add_argument("frontend")
    proxy.add_argument("backend")
    proxy.set_defaults(run=role_proxy)
    for name, run in (("echo-dealer", role_echo_dealer), ("echo-router", role_echo_router)):
        sub = roles.add_parser(name)
        sub.add_argument("endpoint")
        sub.add_argument("--zero-copy", action="store_true")
        sub.set_defaults(run=run)
    # Only the direct peer: (c) shows what the client alone generates, so it gets the client's
    # cheapest path; (b)'s peer answers in pairs (the C proxy's reference, one REPLY per REQUEST).
    roles.choices["echo-router"].add_argument("--batches", action="store_true")
    roles.add_parser("grpc-server").set_defaults(run=role_grpc_server)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Every server, zrpc's or not, runs with the allocator settings `zrpc broker start` and
    # `zrpc worker run` apply: what differs between the systems is their code, not their malloc.
    tune_allocator()
    args.run(args)


# ---------------------------------------------------------------------------------- the parent side

class Server:
    """One role in its own process, started by the benchmark and stopped by its PID."""

    def __init__(self, label: str, role: str, *args: str, log_dir: pathlib.Path, ready_timeout: float = 20.0):
        self.label = label
        self.log_path = log_dir / f"{label}-{role}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen([sys.executable, __file__, role, *args], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid
        self.ready_words = self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.popen.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(max(0.0, deadline - time.monotonic())):
                    line = self.popen.stdout.readline().decode()
                    if line.startswith("ready"):
                        return line.split()[1:]
                    if not line:  # EOF: the process died
                        break
        self.stop()
        raise RuntimeError(f"{self.label} ({self.popen.args[2]}) did not start; its log:\n{self.log_text()}")

    def log_text(self, last: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-last:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process, all its threads (/proc/PID/stat)."""
        return cpu_seconds(self.pid)

    def run_queue_wait(self) -> float | None:
        """Seconds its threads spent runnable but waiting for a CPU (see run_queue_wait)."""
        return run_queue_wait(self.pid)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s; only this process, by its PID."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def run_queue_wait(pid: int) -> float | None:
    """Seconds the threads of ``pid`` have waited in a run queue (/proc/PID/task/*/schedstat,
    second field, nanoseconds): time it was ready to run while every core was busy. None where
    the kernel keeps no such figure."""
    total, read = 0, False
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # the thread ended meanwhile, or no schedstat
                with open(f"/proc/{pid}/task/{tid}/schedstat") as schedstat:
                    total += int(schedstat.read().split()[1])
                    read = True
    return total / 1e9 if read else None


if __name__ == "__main__":
    main()
