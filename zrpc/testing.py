"""Helpers for testing zrpc services (shipped, as nameko ships its own, because users test too).

    from zrpc.testing import serve

    def test_greeter():
        with serve(Greeter()) as client:
            reply = client.stub(Greeter.descriptor).SayHello(HelloRequest(name="Ada"))
        assert reply.message == "Hello, Ada!"
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

from . import broker_service_pb2
from ._broker import Broker, BrokerConfig
from ._client import Client
from ._errors import Error
from ._service import Service
from ._worker import Worker

__all__ = ["serve"]

_BROKER = broker_service_pb2.DESCRIPTOR.services_by_name["Broker"]
_DRAIN_GRACE = 1.0  # bounds the exit when a test leaves a call running in a handler


@contextlib.contextmanager
def serve(*services: Service, concurrency: int = 4, timeout: float = 10.0) -> Iterator[Client]:
    """Run ``services`` in an in-process broker and worker; yield a Client connected to them.

    Everything listens on ``ipc://`` paths in a fresh temporary directory, so tests may run in
    parallel. The services are registered before the client is yielded; ``timeout`` is the
    client's default call deadline and the bound on starting up. All of it stops on exit.
    """
    directory = tempfile.mkdtemp(prefix="zrpc-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        config = BrokerConfig(frontend=f"ipc://{directory}/frontend", backend=f"ipc://{directory}/backend",
                              unknown_service_grace=0.0, log_level="WARNING")
        broker = Broker(config).start()
        stack.callback(broker.stop)
        # A positive grace lets the broker acknowledge the drain (it answers within milliseconds):
        # with none, every normal exit logged "no drain acknowledgement". The worker stops before
        # the broker (the stack unwinds in reverse), so the acknowledgement can come.
        worker = Worker(services, brokers=broker.backend_endpoint, concurrency=concurrency,
                        heartbeat_interval=0.25, drain_grace=_DRAIN_GRACE, name="zrpc.testing")
        worker.start(timeout)
        stack.callback(worker.stop)
        client = Client(broker.frontend_endpoint, timeout=timeout)
        stack.callback(client.close)
        _wait_until_served(client, [service.descriptor.full_name for service in worker.table.services], timeout)
        yield client


def _wait_until_served(client: Client, names: list[str], timeout: float) -> None:
    """Ask the broker's Health method until every service has a live worker (bounded)."""
    health = client.stub(_BROKER).Health
    serving = broker_service_pb2.HealthReply.SERVING
    deadline = time.monotonic() + timeout
    pending = list(names)
    pause = threading.Event()
    while pending:
        try:
            if health(broker_service_pb2.HealthRequest(service=pending[0]), timeout=timeout).status == serving:
                pending.pop(0)
                continue
        except Error:
            pass  # not ready to answer yet: ask again
        if time.monotonic() >= deadline:
            raise RuntimeError(f"services not registered within {timeout}s: {', '.join(pending)}")
        pause.wait(0.005)
