"""Faults with real processes: kill -9 a worker, restart the broker, drain a worker, garbage."""
from __future__ import annotations

import collections
import random
import signal
import time

import zmq

import zrpc
from zrpc import StatusCode
from zrpc import _protocol as p
from zrpc import broker_service_pb2 as bpb
from workers.echo import echo_pb2

from .conftest import wait_for, zrpc_cli

HEARTBEAT = "0.2"  # seconds: workers expire after 3 x 0.2 s of silence


class RawClient:
    """A bare DEALER that speaks the wire protocol and records every reply it gets, duplicates too."""

    def __init__(self, endpoint: str):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(endpoint)
        self.sent: dict[int, float] = {}  # request id -> monotonic deadline
        self.replies: dict[int, list[tuple[p.ReplyHeader, bytes, float]]] = collections.defaultdict(list)

    def send(self, request_id: int, service: str, method: str, payload: bytes, deadline_ms: int,
             idempotent: bool = False, metadata: dict | None = None) -> None:
        header = p.RequestHeader(request_id=request_id, service=service, method=method, deadline_ms=deadline_ms,
                                 idempotent=idempotent, metadata=metadata or {})
        self.sent[request_id] = time.monotonic() + deadline_ms / 1000
        self.socket.send_multipart(p.request_message([(header.SerializeToString(), payload)]))

    def collect(self, until_all_answered: float, quiet: float = 0.5) -> None:
        """Read replies until every sent call has one (bounded), then ``quiet`` s more for extras."""
        limit = time.monotonic() + until_all_answered
        while time.monotonic() < limit and any(i not in self.replies for i in self.sent):
            self._read(limit - time.monotonic())
        quiet_end = time.monotonic() + quiet
        while time.monotonic() < quiet_end:
            self._read(quiet_end - time.monotonic())

    def _read(self, timeout: float) -> None:
        if self.socket.poll(max(1, int(timeout * 1000))):
            frames = self.socket.recv_multipart()
            now = time.monotonic()
            for raw, payload in p.pairs(frames[2:]):
                header = p.ReplyHeader.FromString(raw)
                self.replies[header.request_id].append((header, payload, now))

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def list_services(frontend: str) -> dict[str, bpb.ServiceInfo]:
    with zrpc.Client(frontend, timeout=2.0) as client:
        raw = client.call("zrpc.Broker", "ListServices", b"", timeout=2.0)
    return {s.name: s for s in bpb.ListServicesReply.FromString(raw).services}


def wait_for_workers(frontend: str, service: str, count: int, timeout: float = 15.0) -> None:
    def enough():
        try:
            info = list_services(frontend).get(service)
        except zrpc.Error:
            return False
        return info is not None and info.live_workers == count
    wait_for(enough, timeout, message=f"{count} live workers of {service}")


def start_worker(spawn, backend: str, *extra: str):
    process = spawn(*zrpc_cli("worker", "run", "tests._services:SlowEcho", "--broker", backend,
                              "--heartbeat-interval", HEARTBEAT, *extra))
    process.wait_line("zrpc worker ready")
    return process


def test_kill_9_worker_in_flight_calls_are_redispatched_or_fail_fast_none_lost_or_doubled(cli_broker, spawn):
    _, frontend, backend = cli_broker
    victim = start_worker(spawn, backend, "--concurrency", "8")
    survivor = start_worker(spawn, backend, "--concurrency", "8")
    wait_for_workers(frontend, "echo.Echo", 2)
    raw = RawClient(frontend)
    try:
        # 8 idempotent (Say) and 8 non-idempotent (Sleep) calls, 16 slots: all run at once.
        for i in range(1, 9):
            raw.send(i, "echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"%d" % i).SerializeToString(),
                     deadline_ms=10_000, idempotent=True, metadata={"sleep_ms": "1500"})
        for i in range(9, 17):
            raw.send(i, "echo.Echo", "Sleep", echo_pb2.SleepRequest(ms=1500).SerializeToString(), deadline_ms=10_000)

        def all_running():
            info = list_services(frontend)["echo.Echo"]
            return sum(w.in_flight for w in info.workers) == 16
        wait_for(all_running, 10, message="16 calls running")
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        raw.collect(until_all_answered=10)
    finally:
        raw.close()
    assert set(raw.replies) == set(raw.sent), "a call was lost"
    doubled = {i: len(r) for i, r in raw.replies.items() if len(r) != 1}
    assert not doubled, f"calls answered more than once: {doubled}"
    outcomes = {i: r[0] for i, r in raw.replies.items()}
    for i, (header, payload, answered_at) in outcomes.items():
        assert answered_at <= raw.sent[i] + 0.1, f"call {i} answered after its deadline"
    idempotent = [outcomes[i][0].code for i in range(1, 9)]
    assert idempotent == [StatusCode.OK] * 8, "idempotent calls must survive a worker death"
    assert all(echo_pb2.EchoReply.FromString(outcomes[i][1]).payload.startswith(b"%d:" % survivor.pid)
               for i in range(1, 9))
    others = collections.Counter(outcomes[i][0].code for i in range(9, 17))
    assert set(others) <= {StatusCode.OK, StatusCode.UNAVAILABLE} and others[StatusCode.UNAVAILABLE] >= 1
    for i in range(9, 17):
        header, _, answered_at = outcomes[i]
        if header.code == StatusCode.UNAVAILABLE:
            assert "in flight" in header.message
            # "at once": within the expiry budget (liveness x heartbeat) plus a tick, not the deadline.
            assert answered_at - killed_at < 3 * float(HEARTBEAT) + 1.0
    print(f"kill -9: 16 calls, OK {sum(1 for h, _, _ in outcomes.values() if h.code == 0)}, "
          f"UNAVAILABLE {others[StatusCode.UNAVAILABLE]}, lost 0, duplicated 0")


def test_a_client_with_200_calls_queued_does_not_hold_another_clients_call_behind_them(cli_broker, spawn):
    """A batch job's client queues 200 calls at a worker of capacity 1; an interactive client
    then sends one. With one FIFO queue per service it waited for all 200 (2 s here, 20 s at
    100 ms a call); the clients now take turns, so it waits for at most one call of each."""
    _, frontend, backend = cli_broker
    start_worker(spawn, backend, "--concurrency", "1")
    wait_for_workers(frontend, "echo.Echo", 1)
    greedy, polite = RawClient(frontend), RawClient(frontend)
    try:
        body = echo_pb2.SleepRequest(ms=10).SerializeToString()
        for request_id in range(1, 201):
            greedy.send(request_id, "echo.Echo", "Sleep", body, deadline_ms=60_000)
        wait_for(lambda: list_services(frontend)["echo.Echo"].queue_depth >= 150, 10,
                 message="the batch client's calls queued at the broker")
        polite.send(1, "echo.Echo", "Sleep", body, deadline_ms=60_000)
        poller = zmq.Poller()
        poller.register(greedy.socket, zmq.POLLIN)
        poller.register(polite.socket, zmq.POLLIN)
        greedy_answered = 0
        limit = time.monotonic() + 10
        while not polite.replies and time.monotonic() < limit:
            ready = dict(poller.poll(100))
            if greedy.socket in ready:
                greedy._read(0.001)
                greedy_answered = sum(len(answers) for answers in greedy.replies.values())
            if polite.socket in ready:
                polite._read(0.001)
        [(header, _, _)] = polite.replies[1]
        assert header.code == StatusCode.OK
        # The batch's running call, perhaps the one whose turn came first, then this one.
        assert greedy_answered <= 3, greedy_answered
    finally:
        greedy.close()
        polite.close()


def test_broker_restart_workers_re_register_and_calls_succeed_again(spawn, endpoints):
    frontend, backend = endpoints
    args = zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend, "--unknown-service-grace", "3")
    broker = spawn(*args)
    broker.wait_line("zrpc broker ready")
    start_worker(spawn, backend)
    wait_for_workers(frontend, "echo.Echo", 1)
    with zrpc.Client(frontend, timeout=5.0) as client:
        echo = client.stub(echo_pb2.DESCRIPTOR.services_by_name["Echo"])
        assert echo.Say(echo_pb2.EchoRequest(payload=b"before")).payload.endswith(b"before")
        broker.signal(signal.SIGKILL)
        broker.popen.wait(5)
        restarted = spawn(*args)
        restarted.wait_line("zrpc broker ready")
        back_at = time.monotonic()
        wait_for_workers(frontend, "echo.Echo", 1, timeout=10)
        took = time.monotonic() - back_at
        print(f"worker re-registered {took * 1000:.0f} ms after the broker came back "
              f"(heartbeat {float(HEARTBEAT) * 1000:.0f} ms)")
        # The same client reconnects by itself and is served again.
        reply = wait_for(lambda: _try_say(echo, b"after"), 10, message="a call after the restart")
        assert reply.payload.endswith(b"after")


def _try_say(echo, payload: bytes):
    try:
        return echo.Say(echo_pb2.EchoRequest(payload=payload), timeout=1.0)
    except zrpc.Error as error:
        assert error.code in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.NOT_FOUND)
        return None


def test_sigterm_drains_a_worker_under_load_without_client_errors(cli_broker, spawn):
    _, frontend, backend = cli_broker
    leaving = start_worker(spawn, backend, "--concurrency", "4")
    start_worker(spawn, backend, "--concurrency", "4")
    wait_for_workers(frontend, "echo.Echo", 2)
    errors: list[zrpc.Error] = []
    done = 0
    with zrpc.Client(frontend, timeout=10.0) as client:
        echo = client.stub(echo_pb2.DESCRIPTOR.services_by_name["Echo"])
        window = collections.deque()

        def settle_one():
            nonlocal done
            try:
                window.popleft().result(10)
            except zrpc.Error as error:
                errors.append(error)
            done += 1

        # Non-idempotent calls: a drain must not fail them, and must not run them twice.
        for i in range(400):
            window.append(echo.Sleep.future(echo_pb2.SleepRequest(ms=20)))
            if len(window) >= 8:
                settle_one()
            if i == 40:
                leaving.signal(signal.SIGTERM)
        while window:
            settle_one()
    assert leaving.popen.wait(10) == 0
    assert done == 400 and errors == []


def test_garbage_on_both_endpoints_does_not_stop_the_broker(cli_broker, spawn):
    broker, frontend, backend = cli_broker
    start_worker(spawn, backend)
    wait_for_workers(frontend, "echo.Echo", 1)
    rng = random.Random(20261125)
    context = zmq.Context()
    garbage_sent = 0
    try:
        peers = []
        for endpoint in (frontend, backend):
            for _ in range(3):
                peer = context.socket(zmq.DEALER)
                peer.linger = 0
                peer.connect(endpoint)
                peers.append(peer)
        with zrpc.Client(frontend, timeout=5.0) as client:
            echo = client.stub(echo_pb2.DESCRIPTOR.services_by_name["Echo"])
            for round_ in range(20):
                for peer in peers:
                    for _ in range(25):
                        frames = _random_message(rng)
                        peer.send_multipart(frames)
                        garbage_sent += 1
                reply = echo.Say(echo_pb2.EchoRequest(payload=b"%d" % round_), timeout=5.0)
                assert reply.payload.endswith(b"%d" % round_)
        assert broker.popen.poll() is None
        assert "echo.Echo" in list_services(frontend)
    finally:
        for peer in peers:
            peer.close(0)
        context.term()
    print(f"sent {garbage_sent} garbage messages; every good call in between succeeded")


def _random_message(rng: random.Random) -> list[bytes]:
    kind = rng.random()
    junk = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 6))]
    if kind < 0.4:
        return junk or [b""]
    command = rng.choice([p.READY, p.REQUEST, p.REPLY, p.HEARTBEAT, p.DISCONNECT, p.CANCEL, b"\x07", b""])
    return [p.TAG, command, *junk]
