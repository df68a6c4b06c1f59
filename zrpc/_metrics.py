"""What broker and worker metrics share: a cheap histogram, and the /metrics HTTP server.

Hot paths only bump plain counters and bucket lists (a dict lookup and a bisect per call); the
Prometheus families are built from them when /metrics is scraped, by collectors registered in a
``CollectorRegistry`` of each Broker or Worker's own (tests run several in one process).
"""
from __future__ import annotations

import bisect
import logging
from typing import Iterable

log = logging.getLogger("zrpc.metrics")

# Upper bounds in seconds, from half a millisecond (a broker hop) to half a minute (a deadline).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The label value for a service or method the broker was not told about by a worker, so that a
# hostile client sending random names cannot create new time series.
UNKNOWN = "<unknown>"


class Histogram:
    """Counts per bucket (the last one is +Inf) and a sum; ``observe`` is a bisect and two adds."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (le, observations <= le), ending with +Inf."""
        counts = list(self.counts)  # a copy: the owning thread may be adding meanwhile
        total, buckets = 0, []
        for bound, count in zip((*map(repr, LATENCY_BUCKETS), "+Inf"), counts):
            total += count
            buckets.append((bound, total))
        return buckets


def quantile(counts: Iterable[int], q: float) -> float:
    """The ``q`` quantile of bucket counts (as ``histogram_quantile`` does: linear in a bucket)."""
    counts = list(counts)
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if seen + count >= rank and count:
            if index == len(LATENCY_BUCKETS):  # +Inf: the highest finite bound is all we know
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[index - 1] if index else 0.0
            return lower + (LATENCY_BUCKETS[index] - lower) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


class MetricsServer:
    """prometheus_client's /metrics HTTP server for one registry, stoppable (tests start many)."""

    def __init__(self, registry, host: str = "127.0.0.1", port: int = 0):
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = self._server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(registry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on http://host:port/metrics (port 0: the OS picks; see ``.port``)."""
    server = MetricsServer(registry, host, port)
    log.info("metrics served at %s", server.url)
    return server

