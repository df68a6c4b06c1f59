"""Slow links (issue 3, fault 10): delay and jitter through a user-space TCP proxy on loopback.

`tc netem` is not available here, so a small proxy delays every chunk it relays. While the delay
stays well under the heartbeat budget (liveness x interval), no worker may be expired, and
deadlines still hold.
"""
from __future__ import annotations

import collections
import random
import socket
import threading
import time

import pytest

import zrpc
from zrpc import Broker, BrokerConfig, Client, StatusCode, Worker
from workers.echo import Echo, echo_pb2

from .conftest import wait_for

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]


class DelayingProxy:
    """Relays TCP from a loopback port to ``target``, holding each chunk ``delay`` +- ``jitter`` s.

    Each direction keeps its order (a chunk is never due before the one ahead of it), as a real
    slow link would.
    """

    def __init__(self, target: tuple[str, int], delay: float, jitter: float, seed: int = 7):
        self.target = target
        self.delay = delay
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = [self.listener]
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                pending: collections.deque = collections.deque()
                ready = threading.Condition()
                self._spawn(self._read, source, pending, ready)
                self._spawn(self._write, sink, pending, ready)

    def _read(self, source: socket.socket, pending: collections.deque, ready: threading.Condition) -> None:
        last_due = 0.0
        source.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                chunk = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            due = max(last_due, time.monotonic() + self.delay + self.rng.uniform(-self.jitter, self.jitter))
            last_due = due
            with ready:
                pending.append((due, chunk))
                ready.notify()
            if not chunk:
                return

    def _write(self, sink: socket.socket, pending: collections.deque, ready: threading.Condition) -> None:
        while not self.stopping.is_set():
            with ready:
                if not pending:
                    ready.wait(0.1)
                    continue
                due, chunk = pending[0]
                wait = due - time.monotonic()
                if wait > 0:
                    ready.wait(min(wait, 0.1))  # bounded: re-check stopping and the head
                    continue
                pending.popleft()
            if not chunk:
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                sink.sendall(chunk)
            except OSError:
                return

    def close(self) -> None:
        self.stopping.set()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def slow_backend():
    """A broker on loopback TCP whose workers reach it through a 60 ms +- 40 ms link."""
    config = BrokerConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0",
                          unknown_service_grace=0.0, heartbeat_liveness=3)
    with Broker(config) as broker:
        port = int(broker.backend_endpoint.rsplit(":", 1)[1])
        proxy = DelayingProxy(("127.0.0.1", port), delay=0.06, jitter=0.04)
        try:
            yield broker, f"tcp://127.0.0.1:{proxy.port}"
        finally:
            proxy.close()


def test_delay_under_the_heartbeat_budget_expires_no_worker_and_loses_no_call(slow_backend):
    broker, backend_via_proxy = slow_backend
    # Budget: 3 x 0.25 s = 750 ms of silence; the link adds at most 100 ms each way.
    with Worker([Echo()], backend_via_proxy, concurrency=8, heartbeat_interval=0.25):
        wait_for(lambda: "echo.Echo" in broker.engine.services and broker.engine.services["echo.Echo"].workers,
                 10, message="the worker registered through the slow link")
        with Client(broker.frontend_endpoint, timeout=10.0) as client:
            echo = client.stub(ECHO)
            started = time.monotonic()
            futures = []
            # Spread over a few heartbeat budgets, so expiry would have had its chance.
            while time.monotonic() - started < 2.0:
                base = len(futures)
                futures += [echo.Say.future(echo_pb2.EchoRequest(payload=b"%d" % (base + i))) for i in range(8)]
                futures[-1].result(10)
            replies = [f.result(10).payload for f in futures]
    assert replies == [b"%d" % i for i in range(len(futures))]
    assert broker.engine.counters["workers_expired"] == 0
    assert broker.engine.counters["redispatched"] == 0
    print(f"slow link 60+-40 ms: {len(futures)} calls, all OK, 0 expiries")


def test_deadlines_still_hold_across_a_slow_link(slow_backend):
    broker, backend_via_proxy = slow_backend
    with Worker([Echo()], backend_via_proxy, concurrency=2, heartbeat_interval=0.25):
        wait_for(lambda: "echo.Echo" in broker.engine.services and broker.engine.services["echo.Echo"].workers,
                 10, message="the worker registered through the slow link")
        with Client(broker.frontend_endpoint, timeout=10.0) as client:
            echo = client.stub(ECHO)
            began = time.monotonic()
            with pytest.raises(zrpc.Error) as caught:
                echo.Sleep(echo_pb2.SleepRequest(ms=2_000), timeout=0.4)
            elapsed = time.monotonic() - began
            assert caught.value.code == StatusCode.DEADLINE_EXCEEDED
            assert elapsed < 0.4 + 0.5  # on time: the slow link does not stretch the deadline
            # A call that fits in its deadline despite the delay still succeeds.
            assert echo.Say(echo_pb2.EchoRequest(payload=b"ok"), timeout=3.0).payload == b"ok"
    assert broker.engine.counters["workers_expired"] == 0
