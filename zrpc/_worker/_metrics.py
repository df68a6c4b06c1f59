"""The worker's metrics: handler latency by (service, method, code), in flight, capacity.

``HandlerStats`` is bumped on the loop thread when a handler's answer is sent; the collector
builds the ``zrpc_worker_*`` families from it and the worker's admission state at scrape time.
Label values come only from the services this worker serves, so series stay bounded.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._metrics import Histogram
from .._status import StatusCode

if TYPE_CHECKING:
    from ._runtime import Worker


class HandlerStats:
    """Handler run time per (service, method, status code)."""

    def __init__(self) -> None:
        self.handlers: dict[tuple[str, str, StatusCode], Histogram] = {}

    def observe(self, service: str, method: str, code: StatusCode, seconds: float) -> None:
        key = (service, method, code)
        histogram = self.handlers.get(key)
        if histogram is None:
            histogram = self.handlers[key] = Histogram()
        histogram.observe(seconds)


class WorkerCollector:
    def __init__(self, worker: "Worker"):
        self._worker = worker

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        worker = self._worker
        handler = HistogramMetricFamily("zrpc_worker_handler_seconds",
                                        "Handler run time, from start to the answer, by status code.",
                                        labels=["service", "method", "code"])
        for (service, method, code), histogram in list(worker.stats.handlers.items()):
            handler.add_metric([service, method, code.name], histogram.cumulative(), histogram.sum)
        yield handler
        admission = worker._admission
        yield GaugeMetricFamily("zrpc_worker_in_flight", "Calls held: running plus waiting for a slot.",
                                value=admission.running + len(admission.waiting))
        yield GaugeMetricFamily("zrpc_worker_running", "Handlers running now.", value=admission.running)
        yield GaugeMetricFamily("zrpc_worker_capacity", "Calls this worker runs at once (--concurrency).",
                                value=worker.concurrency)


def worker_registry(worker: "Worker"):
    """A registry of this worker's own (not the process-global one)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker))
    return registry
