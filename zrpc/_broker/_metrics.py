"""The broker's Prometheus metrics: one collector that reads engine state and CallStats at scrape.

Nothing here runs per request: gauges (queue depth, in flight, workers) are computed from the
engine's tables when /metrics is read, counters from ``engine.counters`` and ``CallStats``, so
they are always consistent with each other and cost the broker loop nothing between scrapes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from ._loop import Broker

# Engine counters that refuse a message or a call, beyond the malformed_* ones, by reason.
_REJECT_COUNTERS = {"queue_full": "queue_full", "queue_full_pushed_out": "queue_full_pushed_out",
                    "unknown_worker": "unknown_worker", "refused_draining": "draining",
                    "refused_not_reading": "client_not_reading"}


class BrokerCollector:
    """Builds every ``zrpc_broker_*`` family from one Broker's engine and CallStats."""

    def __init__(self, broker: "Broker"):
        self._broker = broker

    def collect(self):
        engine = self._broker.engine
        stats = self._broker.stats
        counters = dict(engine.counters)  # copies: the broker thread keeps going meanwhile

        requests = CounterMetricFamily("zrpc_broker_requests", "Calls answered, by final status code.",
                                       labels=["service", "method", "code"])
        queue_wait = HistogramMetricFamily(
            "zrpc_broker_queue_wait_seconds", "Time calls waited in the broker's queue before a worker took them.",
            labels=["service", "method"])
        service_time = HistogramMetricFamily(
            "zrpc_broker_service_seconds", "Time from dispatch to a worker until the answer.",
            labels=["service", "method"])
        for (service, method), method_stats in list(stats.methods.items()):
            for code, count in list(method_stats.codes.items()):
                requests.add_metric([service, method, code], count)
            for family, histogram in ((queue_wait, method_stats.queue_wait), (service_time, method_stats.service_time)):
                family.add_metric([service, method], histogram.cumulative(), histogram.sum)
        yield requests
        yield queue_wait
        yield service_time

        depth = GaugeMetricFamily("zrpc_broker_queue_depth", "Calls queued, waiting for a worker.", labels=["service"])
        in_flight = GaugeMetricFamily("zrpc_broker_in_flight", "Calls held by workers now.", labels=["service"])
        workers = GaugeMetricFamily("zrpc_broker_workers", "Workers offering the service: live, and busy (no free capacity).",
                                    labels=["service", "state"])
        for service in list(engine.services.values()):
            if not service.offered:
                continue
            members = list(service.workers.values())
            depth.add_metric([service.name], len(service.queue))
            in_flight.add_metric([service.name], service.dispatched)
            workers.add_metric([service.name, "live"], len(members))
            workers.add_metric([service.name, "busy"], sum(1 for w in members if w.free <= 0))
        yield depth
        yield in_flight
        yield workers

        yield CounterMetricFamily("zrpc_broker_worker_expiries", "Workers expired after missing heartbeats.",
                                  value=counters.get("workers_expired", 0))
        yield CounterMetricFamily("zrpc_broker_redispatches", "Idempotent calls dispatched again after their worker died.",
                                  value=counters.get("redispatched", 0))
        yield CounterMetricFamily("zrpc_broker_requeued_undelivered", "Calls queued again because the message "
                                  "dispatching them could not reach their worker (it was gone).",
                                  value=counters.get("requeued_undelivered", 0))
        yield CounterMetricFamily("zrpc_broker_workers_joined", "Worker registrations (READY accepted).",
                                  value=counters.get("workers_joined", 0))
        rejected = CounterMetricFamily("zrpc_broker_rejected", "Messages and calls refused, by reason "
                                       "(malformed input, queue full, unknown worker, draining, a client not reading).",
                                       labels=["reason"])
        for counter, reason in _REJECT_COUNTERS.items():
            rejected.add_metric([reason], counters.get(counter, 0))  # always present, 0 included
        for counter, count in counters.items():
            if counter.startswith("malformed_"):
                rejected.add_metric([counter[len("malformed_"):]], count)
        yield rejected
        traffic = CounterMetricFamily("zrpc_broker_bytes", "Message bytes received and handed to the sockets.",
                                      labels=["direction"])
        traffic.add_metric(["in"], counters.get("bytes_in", 0))
        traffic.add_metric(["out"], counters.get("bytes_out", 0))
        yield traffic
        yield CounterMetricFamily("zrpc_broker_undeliverable", "Messages to peers that were gone or not reading.",
                                  value=counters.get("undeliverable", 0))
        yield CounterMetricFamily("zrpc_broker_internal_errors", "Bugs caught by the loop (see the log).",
                                  value=counters.get("internal_errors", 0))

        # The connection cap (max_connections): open connections and refusals, per endpoint.
        connections = GaugeMetricFamily("zrpc_broker_connections", "Connections accepted and open, per endpoint.",
                                        labels=["side"])
        refused = CounterMetricFamily("zrpc_broker_connections_refused", "Connections closed on arrival because "
                                      "the endpoint held max_connections.", labels=["side"])
        for side, guard in list(self._broker.connections.guards.items()):
            connections.add_metric([side], len(guard.count.admitted))
            refused.add_metric([side], guard.count.refused)
        yield connections
        yield refused
        yield GaugeMetricFamily("zrpc_broker_max_connections", "Connections each endpoint may hold.",
                                value=self._broker.max_connections)
        yield CounterMetricFamily("zrpc_broker_fds_exhausted", "Checks (one a second) that found the broker "
                                  "out of file descriptors: nothing could be accepted.",
                                  value=counters.get("fds_exhausted", 0))


def broker_registry(broker: "Broker") -> CollectorRegistry:
    """A registry of this broker's own (not the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    return registry
