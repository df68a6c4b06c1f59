"""Prometheus metrics: scraped over HTTP after real traffic, numbers that add up."""
from __future__ import annotations

import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from zrpc import Broker, BrokerConfig, Client, Error, StatusCode, Worker
from zrpc._broker._metrics import broker_registry
from zrpc._broker._stats import RecentLatency
from zrpc._metrics import LATENCY_BUCKETS, UNKNOWN, Histogram, quantile, serve_metrics
from zrpc._worker._metrics import worker_registry
from workers.echo import Echo, echo_pb2

from .conftest import wait_for

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
CALLS = 40


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample at ``url``: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def served(endpoints):
    """A broker and an Echo worker in threads, each with its /metrics on a free port."""
    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0)).start()
    worker = Worker([Echo()], backend, concurrency=4, heartbeat_interval=0.2, drain_grace=0.0).start()
    broker_http = serve_metrics(broker_registry(broker), "127.0.0.1", 0)
    worker_http = serve_metrics(worker_registry(worker), "127.0.0.1", 0)
    wait_for(lambda: "echo.Echo" in broker.engine.services and broker.engine.services["echo.Echo"].workers)
    try:
        yield broker, worker, broker_http.url, worker_http.url
    finally:
        broker_http.close()
        worker_http.close()
        worker.stop(grace=0.5)
        broker.stop()


def test_scraped_counts_add_up_after_real_traffic(served):
    broker, worker, broker_url, worker_url = served
    with Client(broker.frontend_endpoint, timeout=5.0) as client:
        stub = client.stub(ECHO)
        for i in range(CALLS):
            assert stub.Say(echo_pb2.EchoRequest(payload=b"x" * i)).payload == b"x" * i
        with pytest.raises(Error) as failed:
            stub.Fail(echo_pb2.FailRequest(code=StatusCode.NOT_FOUND, message="nope"))
        assert failed.value.code == StatusCode.NOT_FOUND
        with pytest.raises(Error):
            client.call("no.Such", "Method", b"", timeout=2.0)
    samples = scrape(broker_url)
    ok = value(samples, "zrpc_broker_requests_total", service="echo.Echo", method="Say", code="OK")
    assert ok == CALLS
    assert value(samples, "zrpc_broker_requests_total", service="echo.Echo", method="Fail", code="NOT_FOUND") == 1
    # A name no worker offered goes to one bucket: a client cannot create series.
    assert value(samples, "zrpc_broker_requests_total", service=UNKNOWN, method=UNKNOWN, code="NOT_FOUND") == 1
    for histogram in ("zrpc_broker_queue_wait_seconds", "zrpc_broker_service_seconds"):
        assert value(samples, f"{histogram}_count", service="echo.Echo", method="Say") == CALLS
        assert value(samples, f"{histogram}_bucket", service="echo.Echo", method="Say", le="+Inf") == CALLS
    # A free worker takes a call in the round it arrives (one clock reading): no queue wait.
    assert value(samples, "zrpc_broker_service_seconds_sum", service="echo.Echo", method="Say") > 0
    assert value(samples, "zrpc_broker_queue_depth", service="echo.Echo") == 0
    assert value(samples, "zrpc_broker_in_flight", service="echo.Echo") == 0
    assert value(samples, "zrpc_broker_workers", service="echo.Echo", state="live") == 1
    assert value(samples, "zrpc_broker_workers", service="echo.Echo", state="busy") == 0
    assert value(samples, "zrpc_broker_worker_expiries_total") == 0
    assert value(samples, "zrpc_broker_redispatches_total") == 0
    for reason in ("queue_full", "queue_full_pushed_out", "client_not_reading"):
        assert ("zrpc_broker_rejected_total", frozenset({("reason", reason)})) in samples
    # Every payload went in from the client and out to the worker, then back: bytes add up.
    payload = sum(range(CALLS))
    assert value(samples, "zrpc_broker_bytes_total", direction="in") >= 2 * payload
    assert value(samples, "zrpc_broker_bytes_total", direction="out") >= 2 * payload

    samples = scrape(worker_url)
    assert value(samples, "zrpc_worker_handler_seconds_count", service="echo.Echo", method="Say", code="OK") == CALLS
    assert value(samples, "zrpc_worker_handler_seconds_count", service="echo.Echo", method="Fail",
                 code="NOT_FOUND") == 1
    assert value(samples, "zrpc_worker_capacity") == 4
    assert value(samples, "zrpc_worker_in_flight") == 0


def test_malformed_input_is_counted_by_reason(served):
    broker, _, broker_url, _ = served
    context = zmq.Context.instance()
    garbage = context.socket(zmq.DEALER)
    garbage.linger = 0
    try:
        garbage.connect(broker.frontend_endpoint)
        garbage.send_multipart([b"NOT-ZRPC", b"\x01"])
        assert garbage.poll(5000)  # the broker answers what it can answer
        garbage.recv_multipart()
    finally:
        garbage.close(0)
    samples = scrape(broker_url)
    rejected = {dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "zrpc_broker_rejected_total"}
    assert sum(rejected.values()) == 1 and rejected["queue_full"] == 0


def test_gauges_follow_calls_held_at_the_worker(served):
    broker, worker, broker_url, worker_url = served
    with Client(broker.frontend_endpoint, timeout=5.0) as client:
        futures = [client.stub(ECHO).Sleep.future(echo_pb2.SleepRequest(ms=2000), timeout=5.0) for _ in range(6)]
        wait_for(lambda: worker.running == 4)
        samples = scrape(broker_url)
        assert value(samples, "zrpc_broker_in_flight", service="echo.Echo") == 4
        assert value(samples, "zrpc_broker_queue_depth", service="echo.Echo") == 2
        assert value(samples, "zrpc_broker_workers", service="echo.Echo", state="busy") == 1
        assert value(scrape(worker_url), "zrpc_worker_in_flight") == 4
        for future in futures:
            future.cancel()


def test_histogram_buckets_are_cumulative_and_quantiles_interpolate():
    histogram = Histogram()
    for seconds in (0.0001, 0.002, 0.002, 100.0):
        histogram.observe(seconds)
    buckets = dict(histogram.cumulative())
    assert buckets["0.0005"] == 1 and buckets["0.0025"] == 3 and buckets["+Inf"] == 4
    assert histogram.count == 4
    assert quantile(histogram.counts, 0.5) == pytest.approx(0.001 + 0.0015 * (2 - 1) / 2)
    assert quantile(histogram.counts, 0.99) == LATENCY_BUCKETS[-1]
    assert quantile([0] * (len(LATENCY_BUCKETS) + 1), 0.99) == 0.0


def test_recent_latency_forgets_calls_older_than_its_window():
    recent = RecentLatency(window=60.0, slots=6)
    recent.observe(2.0, now=5.0)
    assert recent.quantile(0.99, now=30.0) > 1.0
    recent.observe(0.001, now=70.0)  # the 2 s call is now more than a window ago
    assert recent.quantile(0.99, now=70.0) <= 0.001


def test_recent_latency_never_says_more_than_its_longest_call():
    # The second tester: one 1.2 s call showed as P99 2485 ms (linear within the 1-2.5 s bucket).
    recent = RecentLatency(window=60.0, slots=6)
    recent.observe(1.2, now=5.0)
    assert recent.quantile(0.99, now=6.0) == 1.2
    for _ in range(99):
        recent.observe(0.001, now=7.0)
    assert recent.quantile(0.5, now=8.0) <= 0.001
    recent.observe(0.5, now=80.0)  # the 1.2 s call left the window, and its slot's longest with it
    assert 0.25 < recent.quantile(0.99, now=80.0) <= 0.5


def test_a_handler_that_finishes_past_its_deadline_counts_as_what_its_caller_saw(endpoints):
    """A plain handler cannot be interrupted: when it returns after the deadline, the caller
    has had DEADLINE_EXCEEDED from the broker. The worker counts (and answers) that, not OK."""
    from ._services import HangingEcho

    frontend, backend = endpoints
    broker = Broker(BrokerConfig(frontend=frontend, backend=backend)).start()
    worker = Worker([HangingEcho()], backend, concurrency=2, heartbeat_interval=0.2, drain_grace=0.0).start()
    try:
        wait_for(lambda: "echo.Echo" in broker.engine.services and broker.engine.services["echo.Echo"].workers)
        with Client(frontend, timeout=5.0) as client:
            with pytest.raises(Error) as late:
                client.call("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"x").SerializeToString(),
                            timeout=0.3, metadata={"hang_s": "0.8"})
            assert late.value.code == StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: worker.running == 0 and worker.stats.handlers)
            codes = {code for (_, method, code) in worker.stats.handlers if method == "Say"}
            assert codes == {StatusCode.DEADLINE_EXCEEDED}
            # A call that ends in time is still OK.
            reply = client.call("echo.Echo", "Say", echo_pb2.EchoRequest(payload=b"y").SerializeToString(),
                                timeout=5.0, metadata={"hang_s": "0"})
            assert echo_pb2.EchoReply.FromString(reply).payload.endswith(b"y")
            assert worker.stats.handlers[("echo.Echo", "Say", StatusCode.OK)].count == 1
    finally:
        worker.stop(grace=0.5)
        broker.stop()


def test_an_async_callers_deadline_is_counted_as_a_deadline_by_the_broker(served):
    """The async client used to CANCEL a call at its own deadline, a moment before the broker's:
    the broker then counted CANCELLED what its caller saw as DEADLINE_EXCEEDED (the tester's 3
    in 24). The broker's deadline is the caller's, so it fails the call itself."""
    import asyncio

    from zrpc import AsyncClient

    broker, _, broker_url, _ = served

    async def late_calls() -> list[Error]:
        async with AsyncClient(broker.frontend_endpoint) as client:
            results = await asyncio.gather(*(client.stub(ECHO).Sleep(echo_pb2.SleepRequest(ms=1500), timeout=0.3)
                                             for _ in range(4)), return_exceptions=True)
        return results

    errors = asyncio.run(late_calls())
    assert all(isinstance(e, Error) and e.code == StatusCode.DEADLINE_EXCEEDED for e in errors), errors
    assert all("reachable" not in e.message for e in errors)
    wait_for(lambda: broker.engine.calls_held == 0)
    samples = scrape(broker_url)
    assert value(samples, "zrpc_broker_requests_total", service="echo.Echo", method="Sleep",
                 code="DEADLINE_EXCEEDED") == 4
    assert value(samples, "zrpc_broker_requests_total", service="echo.Echo", method="Sleep", code="CANCELLED") == 0
