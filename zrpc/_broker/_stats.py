"""Per-call statistics of a broker, fed by the engine's ``on_call_done`` hook; no I/O.

The engine stays free of metrics: it calls one hook when a call gets its answer. This observer
keeps what the Prometheus collector and ``zrpc status`` read: requests by code, queue-wait and
service-time histograms per (service, method), and per service the totals and a recent p99.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING

from .._metrics import LATENCY_BUCKETS, UNKNOWN, Histogram, quantile
from .._status import StatusCode

if TYPE_CHECKING:
    from ._engine import BrokerEngine
    from ._state import Call

_OK = StatusCode.OK


class RecentLatency:
    """Bucket counts over the last ``window`` seconds, in ``slots`` rotating slots (cheap p99),
    and each slot's longest call: a quantile is never more than the longest call it counts
    (one 1.2 s call read 2485 ms, interpolated in its 1-2.5 s bucket: the second tester)."""

    __slots__ = ("_slot_seconds", "_ids", "_counts", "_longest")

    def __init__(self, window: float = 60.0, slots: int = 6):
        self._slot_seconds = window / slots
        self._ids = [-1] * slots
        self._counts = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in range(slots)]
        self._longest = [0.0] * slots

    def observe(self, seconds: float, now: float) -> None:
        slot_id = int(now // self._slot_seconds)
        index = slot_id % len(self._ids)
        counts = self._counts[index]
        if self._ids[index] != slot_id:  # a slot from a past round of the ring: start it afresh
            self._ids[index] = slot_id
            counts[:] = [0] * len(counts)
            self._longest[index] = 0.0
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if seconds > self._longest[index]:
            self._longest[index] = seconds

    def quantile(self, q: float, now: float) -> float:
        """The ``q`` quantile in seconds over the window (0.0 when nothing was observed)."""
        current = int(now // self._slot_seconds)
        merged = [0] * (len(LATENCY_BUCKETS) + 1)
        longest = 0.0
        for slot_id, counts, slot_longest in zip(self._ids, self._counts, self._longest):
            if current - len(self._ids) < slot_id <= current:
                for i, count in enumerate(counts):
                    merged[i] += count
                longest = max(longest, slot_longest)
        return min(quantile(merged, q), longest)


@dataclasses.dataclass(slots=True)
class MethodStats:
    """One (service, method): answers by code name, and where its calls spent their time."""

    codes: dict[str, int] = dataclasses.field(default_factory=dict)
    queue_wait: Histogram = dataclasses.field(default_factory=Histogram)
    service_time: Histogram = dataclasses.field(default_factory=Histogram)


@dataclasses.dataclass(slots=True)
class ServiceTotals:
    """One service, for ``zrpc status``: answers, errors, and recent end-to-end latency."""

    calls: int = 0
    errors: int = 0
    recent: RecentLatency = dataclasses.field(default_factory=RecentLatency)


class CallStats:
    """The observer installed as ``engine.on_call_done`` (and read as ``engine.stats``)."""

    def __init__(self, engine: "BrokerEngine"):
        self._engine = engine
        self.methods: dict[tuple[str, str], MethodStats] = {}
        self.services: dict[str, ServiceTotals] = {}
        # (service, method) as called -> where its calls are counted, for names a worker
        # offered: those stay known (a service once offered keeps its methods), so the labels
        # are worked out once per name, not once per call.
        self._known: dict[tuple[str, str], tuple[MethodStats, ServiceTotals]] = {}

    def install(self) -> "CallStats":
        self._engine.on_call_done = self.on_call_done
        self._engine.stats = self
        return self

    def _labels(self, service: str, method: str) -> tuple[str, str]:
        """Only names a worker offered become label values (bounded series, spec §9)."""
        known = self._engine.services.get(service)
        if known is None or not known.offered:
            return UNKNOWN, UNKNOWN
        return service, (method if method in known.methods else UNKNOWN)

    def _counted_under(self, service: str, method: str) -> tuple[MethodStats, ServiceTotals]:
        key = self._labels(service, method)
        stats = self.methods.get(key)
        if stats is None:
            stats = self.methods[key] = MethodStats()
        totals = self.services.get(key[0])
        if totals is None:
            totals = self.services[key[0]] = ServiceTotals()
        if key[1] is not UNKNOWN:
            self._known[service, method] = stats, totals
        return stats, totals

    def on_call_done(self, service: str, method: str, code: StatusCode, call: "Call | None", now: float) -> None:
        counted = self._known.get((service, method))
        stats, totals = counted if counted is not None else self._counted_under(service, method)
        name = code._name_  # the plain attribute behind .name (a descriptor, 5x slower)
        stats.codes[name] = stats.codes.get(name, 0) + 1
        totals.calls += 1
        if code is not _OK:
            totals.errors += 1
        if call is None:  # refused on arrival: it never waited anywhere
            return
        if call.attempt > 0:  # it reached a worker: split its time at the (last) dispatch
            stats.queue_wait.observe(call.dispatched_at - call.enqueued_at)
            stats.service_time.observe(now - call.dispatched_at)
        else:
            stats.queue_wait.observe(now - call.enqueued_at)
        totals.recent.observe(now - call.enqueued_at, now)

    def service_summary(self, service: str, now: float) -> tuple[int, int, float]:
        """(calls answered, errors, p99 ms over the last minute) of one service."""
        totals = self.services.get(service)
        if totals is None:
            return 0, 0, 0.0
        return totals.calls, totals.errors, totals.recent.quantile(0.99, now) * 1000.0
