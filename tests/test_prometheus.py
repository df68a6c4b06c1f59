"""A real Prometheus (Debian's package) scrapes a broker and a worker; the dashboard's queries work."""
from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import urllib.parse
import urllib.request

import pytest
import zmq

from zrpc import Client, Error
from workers.echo import echo_pb2

from .conftest import REPO, wait_for, zrpc_cli

ECHO = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
DASHBOARD = REPO / "broker" / "grafana-dashboard.json"
# Grafana's template variables, as Grafana would fill them for a 1 s scrape interval.
TEMPLATE_VARS = {"$__rate_interval": "5s", "${__rate_interval}": "5s", "$__interval": "1s", "$__range": "1m"}

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="the prometheus binary is missing (apt-get install prometheus)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:  # a bad expression: 400 with a JSON error body
        body = error.read()
        try:
            return json.loads(body)
        except ValueError:  # "Service Unavailable" (503, text) while Prometheus starts
            return {"status": "starting", "http": error.code, "body": body[:200].decode(errors="replace")}
    except OSError:
        return {"status": "unreachable"}


def metrics_target(ready_line: str) -> str:
    return re.search(r"metrics=http://([^/]+)/metrics", ready_line).group(1)


def test_prometheus_scrapes_broker_and_worker_and_every_dashboard_query_returns_data(spawn, endpoints, tmp_path):
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--unknown-service-grace", "0", "--metrics-port", "0"))
    broker_target = metrics_target(broker.wait_line("zrpc broker ready"))
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend,
                             "--heartbeat-interval", "0.2", "--metrics-port", "0"))
    worker_target = metrics_target(worker.wait_line("zrpc worker ready"))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: zrpc-broker\n    static_configs:\n      - targets: ['{broker_target}']\n"
        f"  - job_name: zrpc-worker\n    static_configs:\n      - targets: ['{worker_target}']\n")
    port = free_port()
    spawn("prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn")
    base = f"http://127.0.0.1:{port}"

    stop = threading.Event()

    def traffic() -> None:  # steady calls, so every rate() over the last 5 s has data
        with Client(frontend, timeout=5.0) as client:
            stub = client.stub(ECHO)
            while not stop.is_set():
                try:
                    stub.Say(echo_pb2.EchoRequest(payload=b"p" * 100))
                except Error:
                    pass
                stop.wait(0.005)

    driver = threading.Thread(target=traffic, daemon=True)
    driver.start()
    garbage = zmq.Context.instance().socket(zmq.DEALER)  # one malformed message: a rejected reason
    garbage.linger = 0
    garbage.connect(frontend)
    garbage.send_multipart([b"NOT-ZRPC", b"\x01"])
    try:
        def both_up():
            result = query(base, "sum(up)")
            return result.get("status") == "success" and result["data"]["result"] and \
                float(result["data"]["result"][0]["value"][1]) == 2
        wait_for(both_up, timeout=20, interval=0.2, message="prometheus scraping broker and worker")
        wait_for(lambda: query(base, 'zrpc_broker_requests_total{service="echo.Echo",code="OK"}')
                 .get("data", {}).get("result"), timeout=15, interval=0.2, message="the requests series")

        expressions = dashboard_expressions()
        assert len(expressions) >= 12
        for expr in expressions:
            concrete = expr
            for variable, value in TEMPLATE_VARS.items():
                concrete = concrete.replace(variable, value)
            assert "$" not in concrete, f"unsubstituted template variable in {expr}"

            def answered():
                result = query(base, concrete)
                assert result.get("status") in ("success", "unreachable", "starting"), f"{concrete}: {result}"
                return result.get("data", {}).get("result")
            wait_for(answered, timeout=10, interval=0.25, message=f"data for {concrete}")
    finally:
        stop.set()
        driver.join(10)
        garbage.close(0)
