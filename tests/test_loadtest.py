"""scripts/loadtest.py: exact percentiles, generated requests, and whole runs as processes."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import zmq

from workers.echo import Echo, echo_pb2
from zrpc import Client, StatusCode
from zrpc._broker import Broker, BrokerConfig
from zrpc._worker import Worker

from .conftest import REPO, wait_for, wait_until_served, zrpc_cli
from .test_security import Keys, served

SCRIPT = REPO / "scripts" / "loadtest.py"
RUN_TIMEOUT = 90.0  # bound on one whole load-test process, spawning included


def _load_script():
    spec = importlib.util.spec_from_file_location("zrpc_loadtest", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


loadtest = _load_script()


def run_loadtest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env or {}))
    env.pop("PYTHONPATH", None)  # the script finds the checkout by itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


@pytest.mark.parametrize("q, expected", [(50, 50), (90, 90), (99, 99), (100, 100), (0.1, 1)])
def test_percentiles_are_exact_nearest_rank(q, expected):
    assert loadtest.percentile(list(range(1, 101)), q) == expected


def test_percentile_of_nothing_is_none_and_of_one_value_is_that_value():
    assert loadtest.percentile([], 50) is None
    assert loadtest.percentile([7], 99) == 7


def test_summary_counts_calls_ok_and_errors_by_code_name():
    result = loadtest.Result(latencies_ns=[3000, 1000, 2000], elapsed_s=0.5)
    result.errors["UNAVAILABLE"] = 1
    report = loadtest.summary(result, concurrency=2, payload_size=10, target="echo.Echo/Say",
                              brokers=["ipc:///x"], spawned_workers=0)
    assert report["calls"] == 4 and report["ok"] == 3
    assert report["errors"] == {"UNAVAILABLE": 1}
    assert report["calls_per_s"] == 8.0
    assert (report["p50_us"], report["max_us"], report["min_us"]) == (2.0, 3.0, 1.0)
    text = loadtest.format_summary(report)
    assert "errors       UNAVAILABLE 1" in text
    assert "max 0.003 (of the ok calls)" in text  # a failed call's wait is not in the percentiles
    # Refusals come back at once: a new-user tester's overloaded run read 19,727 calls/s, 318 ok.
    assert "throughput   8.0 calls/s (6.0 ok/s)" in text


def test_generated_request_fills_the_first_bytes_field_with_payload_size_bytes():
    say = echo_pb2.DESCRIPTOR.services_by_name["Echo"].methods_by_name["Say"]
    raw = loadtest.build_request(say, 100, None)
    assert echo_pb2.EchoRequest.FromString(raw).payload == b"x" * 100
    raw = loadtest.build_request(say, 100, '{"payload": "aGk="}')
    assert echo_pb2.EchoRequest.FromString(raw).payload == b"hi"


def test_a_request_type_without_a_bytes_or_string_field_is_sent_empty_and_said_so():
    """A tester's calc Divide read "request 0 bytes serialized (generated 100-byte payload)"."""
    import types

    import click
    from google.protobuf import duration_pb2

    method = types.SimpleNamespace(input_type=duration_pb2.Duration.DESCRIPTOR)  # int fields only
    assert loadtest.build_request(method, 100, None) == b"" and not loadtest.has_payload_field(method)
    with pytest.raises(click.UsageError, match="has no bytes or string field for --payload-size"):
        loadtest.build_request(method, 100, None, size_given=True)
    report = loadtest.summary(loadtest.Result(elapsed_s=1.0), concurrency=1, payload_size=None, target="a.B/C",
                              brokers=["x"], spawned_workers=0, request_bytes=0)
    report["empty_request"] = True
    assert "empty request (its type has no bytes or string field; give one with --data)" in \
        loadtest.format_summary(report)


def test_spawned_run_makes_every_call_and_reports_one_json_line():
    result = run_loadtest("--spawn", "1", "--requests", "300", "--concurrency", "8", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["ok"] == 300 and report["calls"] == 300 and report["errors"] == {}
    assert report["concurrency"] == 8 and report["payload_size"] == 100
    assert report["request_bytes"] == len(echo_pb2.EchoRequest(payload=b"x" * 100).SerializeToString())
    assert report["calls_per_s"] > 0
    assert 0 < report["p50_us"] <= report["p90_us"] <= report["p99_us"] <= report["max_us"]
    # Everything it started is gone: the temporary directory of its ipc endpoints too.
    frontend = report["brokers"][0]
    assert frontend.startswith("ipc://") and not os.path.exists(os.path.dirname(frontend[len("ipc://"):]))


def test_a_method_that_fails_is_load_tested_and_the_summary_describes_the_request_sent():
    data = '{"code": 3, "message": "no"}'
    result = run_loadtest("--spawn", "1", "--service", "echo.Echo/Fail", "--data", data,
                          "--requests", "40", "--concurrency", "4", "--max-errors", "1")
    assert result.returncode == 0, result.stderr
    size = len(echo_pb2.FailRequest(code=3, message="no").SerializeToString())
    assert f"concurrency 4, request from --data, {size} bytes serialized\n" in result.stdout
    assert "payload 100 bytes" not in result.stdout
    assert "calls        40 (0 ok)" in result.stdout
    assert "errors       INVALID_ARGUMENT 40" in result.stdout
    assert result.stderr.strip() == ("note: first call to echo.Echo/Fail failed with INVALID_ARGUMENT; "
                                     "going on, its errors are counted")  # no hint: --max-errors 1 is given
    # By default a failed call fails the run, after the report.
    strict = run_loadtest("--spawn", "1", "--service", "echo.Echo/Fail", "--data", data,
                          "--requests", "40", "--concurrency", "4", "--json")
    assert strict.returncode == 1
    assert json.loads(strict.stdout)["errors"] == {"INVALID_ARGUMENT": 40}
    assert strict.stderr.strip().endswith("error: 40 of 40 calls failed (100.0 %), more than --max-errors 0 allows")
    assert "(--max-errors 1 to exit 0 all the same)" in strict.stderr
    # A first call failing as no handler could (UNAVAILABLE) stops the run: exit 10 + its code, as
    # `zrpc call` and as NOT_FOUND found while describing the service (a tester's said "Error:", 1).
    setup = run_loadtest("--spawn", "1", "--service", "echo.Echo/Fail", "--data",
                         '{"code": 14, "message": "by design"}', "--requests", "4")
    assert setup.returncode == 10 + StatusCode.UNAVAILABLE
    assert setup.stderr.strip().splitlines()[-1] == "error: first call to echo.Echo/Fail failed: UNAVAILABLE: by design"


def test_summary_text_gives_the_serialized_size_of_a_generated_request():
    report = loadtest.summary(loadtest.Result(elapsed_s=1.0), concurrency=2, payload_size=10, target="a.B/C",
                              brokers=["ipc:///x"], spawned_workers=0, request_bytes=12)
    assert "concurrency 2, request 12 bytes serialized (generated 10-byte payload)" in loadtest.format_summary(report)


def test_spawned_brokers_share_the_calls_and_every_worker_serves_each():
    result = run_loadtest("--spawn", "2", "--spawn-brokers", "2", "--requests", "400", "--concurrency", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["brokers"]) == 2 and report["ok"] == 400 and report["errors"] == {}
    alone = run_loadtest("--spawn-brokers", "2", "--requests", "10")
    assert alone.returncode == 2 and "give --spawn too" in alone.stderr


def test_scale_script_measures_each_row_and_rejects_a_malformed_one():
    script = REPO / "scripts" / "scale.py"
    run = subprocess.run([sys.executable, str(script), "--rows", "1x1x1,2x1x2", "--duration", "0.5", "-c", "4",
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["rows"]
    assert [(r["brokers"], r["workers"], r["clients"]) for r in rows] == [(1, 1, 1), (2, 1, 2)]
    for row in rows:
        assert row["calls"] > 0 and row["errors"] == 0
        assert row["cpu_us_per_call"]["broker"] > 0 and row["cpu_us_per_call"]["client"] > 0
    bad = subprocess.run([sys.executable, str(script), "--rows", "2x2"], cwd=REPO, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT)
    assert bad.returncode == 2 and "is not BROKERSxWORKERSxCLIENTS" in bad.stderr


def test_run_against_a_running_broker_for_a_duration_prints_a_readable_summary(cli_broker, spawn):
    _, frontend, backend = cli_broker
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend, "--heartbeat-interval", "0.2"))
    worker.wait_line("zrpc worker ready:")
    result = run_loadtest("--broker", frontend, "--duration", "0.5", "--concurrency", "4", "--payload-size", "10")
    assert result.returncode == 0, result.stderr
    for label in ("calls", "throughput", "calls/s", "p50", "p90", "p99", "max", "errors       none"):
        assert label in result.stdout
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_the_broker_counts_the_calls_reported_and_the_warm_up_call_the_report_names(endpoints):
    """A user checks the report against the broker's metrics: they differ by the warm-up call."""
    frontend, backend = endpoints
    with Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0, log_level="WARNING")) as broker, \
            Worker([Echo()], brokers=backend):
        wait_until_served(frontend, "echo.Echo")
        result = run_loadtest("--broker", frontend, "--requests", "120", "--concurrency", "6", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["calls"] == 120 and report["warmup_calls"] == 1
        codes = broker.stats.methods["echo.Echo", "Say"].codes
        assert codes == {"OK": report["calls"] + report["warmup_calls"]}
        text = run_loadtest("--broker", frontend, "--requests", "10", "--concurrency", "2")
        assert "calls        10 (10 ok) in " in text.stdout
        assert ", after a warm-up call (not counted)\n" in text.stdout


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_ends_the_run_with_a_report_of_the_calls_made(endpoints, signum, status):
    """A tester's Ctrl-C printed only "Aborted!" (exit 1): what was measured was lost. SIGTERM
    (review: `timeout 60 loadtest.py ...`) ends the run the same way, exit 143."""
    frontend, backend = endpoints
    with Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0, log_level="WARNING")) as broker, \
            Worker([Echo()], brokers=backend):
        wait_until_served(frontend, "echo.Echo")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        # 4 in flight: the broker's count below runs ahead of the report by the answers the load
        # test had not read yet when the signal came (a run with 32 in flight reported 192 of 200).
        run = subprocess.Popen([sys.executable, str(SCRIPT), "--broker", frontend, "--duration", "60", "--json",
                                "--concurrency", "4"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def calls_made() -> bool:
                counted = broker.stats.methods.get(("echo.Echo", "Say"))
                return counted is not None and counted.codes.get("OK", 0) >= 200
            wait_for(calls_made, message="the load test to make calls")
            run.send_signal(signum)
            stdout, stderr = run.communicate(timeout=30)
        finally:
            run.kill()
            run.wait(timeout=10)
    assert run.returncode == status, stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True and report["calls"] >= 200 - 4 - 1 and report["errors"] == {}
    assert report.get("terminated", False) is (signum == signal.SIGTERM)
    said = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    assert f"interrupted  by {said}: these are the calls made until then" in loadtest.format_summary(report)


def test_ctrl_c_during_the_warm_up_call_exits_130_without_a_report(endpoints):
    """Nothing was measured yet: "interrupted", as the zrpc commands say, not click's "Aborted!"."""
    frontend, backend = endpoints
    with Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=0.0, log_level="WARNING")) as broker, \
            Worker([Echo()], brokers=backend, drain_grace=0.0):
        wait_until_served(frontend, "echo.Echo")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        run = subprocess.Popen([sys.executable, str(SCRIPT), "--broker", frontend, "--service", "echo.Echo/Sleep",
                                "--data", '{"ms": 60000}', "--timeout", "90", "--json"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: broker.engine.calls_held == 1, message="the warm-up call to be held")
            run.send_signal(signal.SIGINT)
            stdout, stderr = run.communicate(timeout=30)
        finally:
            run.kill()
            run.wait(timeout=10)
    assert run.returncode == 130, stderr
    assert stdout == "" and stderr.strip().splitlines()[-1] == "interrupted"


def test_the_broker_comes_from_ZRPC_BROKER_as_for_the_cli_commands(ipc_dir):
    """README: one ZRPC_BROKER export serves the client commands (a tester's load test ignored it)."""
    dead = f"ipc://{ipc_dir}/nobody-here"
    result = run_loadtest("--requests", "5", env={"ZRPC_BROKER": dead})
    assert result.returncode == 24 and f"cannot connect to broker at {dead}:" in result.stderr
    own = run_loadtest("--requests", "5", env={"ZRPC_BROKER": dead, "ZRPC_LOADTEST_BROKER": dead + "-own"})
    assert f"cannot connect to broker at {dead}-own:" in own.stderr  # the script's own variable first


def test_unknown_service_fails_in_one_line(cli_broker):
    _, frontend, _ = cli_broker
    result = run_loadtest("--broker", frontend, "--service", "nobody.Offers/This", "--requests", "5")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: NOT_FOUND: no worker has offered service 'nobody.Offers'"]


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_run_against_a_curve_broker_with_its_keys(tmp_path):
    keys = Keys(tmp_path)
    broker = Broker(keys.config()).start()
    worker = None
    try:
        worker = Worker([Echo()], brokers=broker.backend_endpoint, concurrency=4, heartbeat_interval=0.1,
                        curve_secret=keys.secret("w1"), broker_key=keys.broker_public).start()
        # start() returns once connected; its READY crosses the CURVE handshake after that, and this
        # broker answers NOT_FOUND at once for a service nobody has offered yet.
        wait_for(lambda: served(broker), 10, message="the worker registered")
        with Client(broker.frontend_endpoint, timeout=5.0, curve_secret=keys.secret("alice"),
                    broker_key=keys.broker_public) as client:
            assert client.call("echo.Echo", "Say", b"", timeout=5.0) == b""  # the worker serves
        result = run_loadtest("--broker", broker.frontend_endpoint, "--broker-key", str(keys.broker_public),
                              "--curve-secret", str(keys.secret("alice")), "--requests", "50", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] == 50 and report["errors"] == {}
        # Without keys the broker refuses the handshake: the hint names the options it now has.
        plain = run_loadtest("--broker", broker.frontend_endpoint, "--timeout", "0.5", "--requests", "5")
        # UNAUTHENTICATED when ZeroMQ reports the mechanism mismatch; else only a closed
        # connection is seen, and the no-answer error carries the hint.
        if plain.returncode == 10 + StatusCode.UNAUTHENTICATED:
            assert "requires CURVE: give its public key (--broker-key)" in plain.stderr
        else:
            assert plain.returncode == 10 + StatusCode.UNAVAILABLE
            assert "pass --broker-key and --curve-secret" in plain.stderr
    finally:
        if worker is not None:
            worker.stop(grace=0)
        broker.stop()


def test_curve_options_come_in_pairs_and_not_with_spawn(tmp_path):
    keys = Keys(tmp_path)
    half = run_loadtest("--broker-key", str(keys.broker_public), "--requests", "5")
    assert half.returncode == 2 and "CURVE needs both --curve-secret and --broker-key" in half.stderr
    spawned = run_loadtest("--spawn", "1", "--broker-key", str(keys.broker_public),
                           "--curve-secret", str(keys.secret("alice")), "--requests", "5")
    assert spawned.returncode == 2 and "--spawn starts brokers without CURVE" in spawned.stderr


@pytest.mark.parametrize("script, option, words", [
    ("scale.py", "--worker-concurrency", "--concurrency of each spawned worker"),
    ("bench.py", "--profile-concurrency", "calls kept in flight while the broker is profiled"),
    ("loadtest.py", "--worker-concurrency", "--concurrency of each spawned worker"),
])
def test_the_scripts_worker_and_profile_concurrency_options_have_help_texts(script, option, words):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # click wraps lines
    described = text[text.index(option + " "):]
    assert described.split("[default:")[0].count(words) == 1, described[:200]


def test_a_run_in_which_no_call_finished_says_to_lengthen_the_duration():
    """A tester's Sleep 3000 at -d 2 read "calls 0 (0 ok) ... errors none", exit 0, and a rate
    taken over the duration and its grace."""
    report = {"unfinished": 8, "stuck": 0, "end_grace_s": 1.0, "calls": 0}
    assert loadtest._unfinished_text(report) == (
        "unfinished   8 call(s) still in flight 1 s after --duration: cancelled, not counted: no call finished; "
        "each takes longer than --duration, lengthen it")


@pytest.mark.parametrize("option", [("--worker", "workers.kv:KeyValue"), ("--worker-concurrency", "4")])
def test_worker_options_without_spawn_are_usage_errors(option):
    """A tester's --worker workers.kv:KeyValue without --spawn load-tested echo.Echo/Say."""
    result = run_loadtest(*option, "--requests", "1")
    assert result.returncode == 2
    assert f"{option[0]} is for the workers --spawn N starts: give --spawn too" in result.stderr


def test_a_duration_run_ends_a_grace_after_it_and_cuts_a_slow_methods_last_calls_short():
    """A tester's `-d 8` ran 34.5 s, its calls waiting out a 30 s timeout; now calls still in
    flight a second after --duration are cancelled and reported, not waited for. Calls of a
    method this slow (the uncounted first call took its 4 s) are cut short, not failed."""
    result = run_loadtest("--spawn", "1", "--service", "echo.Echo/Sleep", "--data", '{"ms": 4000}',
                          "--duration", "0.5", "--timeout", "30", "--concurrency", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["unfinished"], report["stuck"], report["calls"]) == (2, 0, 0)
    assert report["elapsed_s"] == 0.5  # calls/s over --duration, not over its grace too
    text = loadtest.format_summary(report)
    assert "unfinished   2 call(s) still in flight 1 s after --duration: cancelled, not counted" in text


def test_calls_stuck_at_the_end_of_the_duration_fail_the_run_unless_errors_are_allowed():
    """A tester stopped the broker mid-run: every call in flight went unanswered, was cancelled
    after the grace, and the run exited 0. Here the worker stops answering after 20 quick calls:
    the calls it holds are stuck (in flight far longer than any call that finished) and fail."""
    args = ("--spawn", "1", "--worker", "tests._services:StallingEcho", "--duration", "0.8",
            "--timeout", "30", "--concurrency", "3")
    result = run_loadtest(*args)
    assert result.returncode == 1, result.stderr
    assert ("unfinished   3 call(s) still in flight 1 s after --duration: cancelled; 3 stuck (in flight "
            "over 2 x the slowest finished call), counted as failed") in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 3 of 22 calls stuck (no answer 1 s after --duration) (13.6 %), more than --max-errors 0 allows")
    allowed = run_loadtest(*args, "--max-errors", "0.5", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["stuck"] == 3
