"""The zrpc command line: usage errors in-process (CliRunner), the rest with real processes."""
from __future__ import annotations

import base64
import importlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import click
import pytest
import zmq
from click.testing import CliRunner

import zrpc
from workers.echo import Echo, echo_pb2
from zrpc import _protocol as protocol
from zrpc import broker_service_pb2 as bpb
from zrpc._descriptors import file_descriptor_set
from zrpc._broker._config import BrokerConfig, load_config_file
from zrpc._cli import _broker_cmd
from zrpc._cli._call_cmd import format_services
from zrpc._cli.main import main

from ._fake_frontend import FakeFrontend
from .conftest import REPO, wait_for, wait_until_served, zrpc_cli
from .test_security import Keys

needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

CLI_TIMEOUT = 30.0  # bound on any one CLI subprocess


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (stdout and stderr kept apart)."""
    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None, input: str | None = None):
        return runner.invoke(main, list(args), env=env, input=input, prog_name="zrpc")
    return invoke


def run_cli(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a process from the repository root, as a user would (bounded)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.pop("ZRPC_BROKER", None)
    full_env.update(env or {})
    return subprocess.run(zrpc_cli(*args), cwd=REPO, env=full_env, input=input, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------ help and usage (no sockets)

def test_help_lists_every_command(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("broker", "worker", "call", "services", "health"):
        assert command in result.output
    assert "start" in cli("broker", "--help").output
    assert "run" in cli("worker", "--help").output
    assert "10+code" in result.output  # the exit statuses are documented


def test_help_shows_the_environment_variable_of_each_option(cli):
    assert "ZRPC_BROKER_START_FRONTEND" in cli("broker", "start", "--help").output
    assert "ZRPC_BROKER_START_UNKNOWN_SERVICE_GRACE" in cli("broker", "start", "--help").output
    assert "ZRPC_WORKER_RUN_CONCURRENCY" in cli("worker", "run", "--help").output
    call_help = cli("call", "--help").output
    assert "ZRPC_BROKER" in call_help and "ZRPC_CALL_TIMEOUT" in call_help


CLIENT_COMMANDS = ("call", "services", "health", "status")


def leaf_commands(group=main, path=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_option_reads_the_environment_variable_readme_names(monkeypatch):
    """README: ZRPC_ + command path + long option name, dashes as underscores; --broker of the
    client commands reads ZRPC_BROKER."""
    root = click.Context(main, info_name="zrpc", **main.context_settings)
    for path, command in leaf_commands():
        context = root
        for name in path:  # each level adds its name to the prefix, as in a real invocation
            context = click.Context(command, info_name=name, parent=context)
        for param in command.params:
            if not isinstance(param, click.Option) or not param.show_envvar:
                continue
            long_name = max(param.opts, key=len).lstrip("-")
            expected = "_".join(["ZRPC", *path, long_name]).upper().replace("-", "_")
            if long_name == "broker" and path[0] in CLIENT_COMMANDS:
                expected = "ZRPC_BROKER"
            monkeypatch.setenv(expected, "from-the-environment")
            assert param.resolve_envvar_value(context) == "from-the-environment", (path, param.opts, expected)
            monkeypatch.delenv(expected)


def test_keys_generate_reads_its_directory_from_ZRPC_KEYS_GENERATE_DIR(cli, tmp_path):
    result = cli("keys", "generate", "node", env={"ZRPC_KEYS_GENERATE_DIR": str(tmp_path / "k")})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "node.key").exists() and (tmp_path / "k" / "node.key_secret").exists()


@pytest.mark.parametrize("command", [("call", "zrpc.Broker/Health"), ("services",), ("status",),
                                     ("worker", "run", "workers.echo:Echo")])
def test_a_key_file_that_holds_no_usable_key_is_a_bad_value_exit_2(cli, tmp_path, command):
    """A tester's wrong key file got "error: cannot connect to ...: cannot read CURVE key", exit
    1 (a missing one, exit 2): both are bad values of the option, said before connecting."""
    assert cli("keys", "generate", "alice", "--dir", str(tmp_path)).exit_code == 0
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    public, secret = str(tmp_path / "alice.key"), str(tmp_path / "alice.key_secret")
    broken = tmp_path / "broken.key_secret"  # its secret-key line damaged: "Invalid argument", exit 1
    broken.write_text(re.sub(r'secret-key = ".*"', 'secret-key = "' + "~" * 40 + '"',
                             (tmp_path / "alice.key_secret").read_text()))
    broker = ("--broker", "ipc:///nonexistent/zrpc")
    for options, words in [
        (("--curve-secret", str(junk), "--broker-key", public),
         f"Invalid value for '--curve-secret': cannot read CURVE key from {junk}"),
        (("--curve-secret", public, "--broker-key", public),
         f"Invalid value for '--curve-secret': {public} holds no secret key (pass the NAME.key_secret file)"),
        (("--curve-secret", str(broken), "--broker-key", public),
         f"Invalid value for '--curve-secret': bad secret key in {broken}: not z85"),
        (("--curve-secret", secret, "--broker-key", str(junk)),
         f"Invalid value for '--broker-key': cannot read CURVE key from {junk}"),
        (("--curve-secret", secret, "--broker-key", "~" * 40), "Invalid value for '--broker-key': bad public key: not z85"),
    ]:
        result = cli(*command, *broker, *options)
        assert result.exit_code == 2, (options, result.output)
        assert words in " ".join(result.stderr.split()), result.stderr
    # A secret key file where the broker's public key goes works (its public half is read), but
    # the broker's secret has left its host: said (a tester handed it to a client). Not run for
    # `worker run`: with usable keys it would wait for a broker.
    if command[0] == "worker":
        return
    handed = cli(*command, *broker, "--curve-secret", secret, "--broker-key", secret)
    assert f"warning: {secret} holds the broker's secret key: clients and workers need only its public" in \
        handed.stderr


def test_keys_generate_refuses_to_replace_a_key_pair_unless_forced(cli, tmp_path):
    first = cli("keys", "generate", "alice", "--dir", str(tmp_path))
    assert first.exit_code == 0, first.output
    public = (tmp_path / "alice.key").read_bytes()
    again = cli("keys", "generate", "alice", "--dir", str(tmp_path))
    assert again.exit_code == 2
    line = one_line_error(again.stderr)
    assert f"{tmp_path / 'alice.key'} and {tmp_path / 'alice.key_secret'} already exist" in line
    assert "--force" in line
    assert (tmp_path / "alice.key").read_bytes() == public  # untouched
    forced = cli("keys", "generate", "alice", "--dir", str(tmp_path), "--force")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "alice.key").read_bytes() != public


def test_every_command_help_ends_with_the_exit_statuses(cli):
    for path, _ in leaf_commands():
        assert "Exit status: 0 success" in cli(*path, "--help").output, path


def test_health_with_no_broker_exits_as_its_help_says(cli, ipc_dir):
    help_text = " ".join(cli("health", "--help").output.split())
    assert "4 for the other two" in help_text and "does not answer exits 24 (UNAVAILABLE)" in help_text
    result = cli("health", "--broker", f"ipc://{ipc_dir}/nobody", "--timeout", "0.2")
    assert result.exit_code == 24 == 10 + zrpc.StatusCode.UNAVAILABLE
    assert result.stdout == ""


def test_python_dash_m_zrpc_and_the_console_script_entry_point_are_the_same_group():
    importlib.import_module("zrpc.__main__")  # importing must not run the CLI
    assert main.name == "main" and set(main.commands) >= {"broker", "worker", "call", "services"}


def test_unknown_flag_is_a_usage_error(cli):
    result = cli("call", "--no-such-flag", "a.B/C")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


@pytest.mark.parametrize("args, problem", [
    (("call", "-t", "nan", "a.B/C"), "'nan' is not a finite number"),
    (("status", "--timeout", "inf"), "'inf' is not a finite number"),
    (("worker", "run", "--heartbeat-interval", "inf", "workers.echo:Echo"), "'inf' is not a finite number"),
    (("broker", "start", "--drain-grace", "nan"), "'nan' is not a finite number"),
    (("broker", "start", "--max-message-bytes", "9223372036854775807"), "is not in the range 1<=x<=1099511627776"),
])
def test_nan_inf_and_huge_limits_are_usage_errors(cli, args, problem):
    """A tester's `-t nan` read "cannot connect" (exit 1), a huge --max-message-bytes "cannot
    bind broker: Python int too large to convert to C long"."""
    result = cli(*args)
    assert result.exit_code == 2 and problem in result.stderr


@pytest.mark.parametrize("request_json, problem", [
    ("{", "request is not valid JSON"),
    ("[1, 2]", "request must be a JSON object"),
    (" \n", "the request is empty: give a JSON object ('{}' for a request of defaults)"),
])
def test_bad_json_is_a_one_line_error_before_any_connection(cli, request_json, problem):
    result = cli("call", "--broker", "ipc:///nonexistent/zrpc", "a.B/C", request_json)
    assert result.exit_code == 2
    assert problem in one_line_error(result.stderr)


def test_json_from_stdin_is_read_with_dash(cli):
    result = cli("call", "--broker", "ipc:///nonexistent/zrpc", "a.B/C", "-", input="not json")
    assert result.exit_code == 2
    assert "not valid JSON" in one_line_error(result.stderr)


@pytest.mark.parametrize("args, problem", [
    (["call", "no-method-here"], "expected SERVICE/METHOD"),
    (["call", "echo.Echo", "{}"], "bad method 'echo.Echo': expected SERVICE/METHOD"),
    (["call", "a.B/C", "-m", "novalue"], "expected KEY=VALUE"),
    (["call", "--broker", "localhost:5555", "a.B/C"], "bad broker endpoint 'localhost:5555'"),
    (["worker", "run", "workers.echo:Echo", "--broker", "127.0.0.1:17556"], "(did you mean tcp://127.0.0.1:17556?)"),
    (["services", "--broker", "tcp:/x"], "bad broker endpoint"),
    (["broker", "start", "--frontend", "5555"], "bad frontend endpoint"),
    (["broker", "start", "--frontend", "tcp://127.0.0.1:99999"],
     "bad frontend endpoint 'tcp://127.0.0.1:99999': port '99999' is not a number from 0 to 65535"),
    (["broker", "start", "--backend", "tcp://127.0.0.1:http"], "port 'http' is not a number"),
    (["broker", "start", "--backend", "tcp://127.0.0.1"], "no port: expected HOST:PORT"),
    (["broker", "start", "--frontend", "tcp://127.0.0.1:5599", "--backend", "tcp://127.0.0.1:5599"],
     "frontend and backend are the same endpoint tcp://127.0.0.1:5599"),
    (["call", "--broker", "tcp://127.0.0.1:65536", "a.B/C"], "port '65536' is not a number"),
    (["services", "--broker", "tcp://*:5555"], "a wildcard (* or port 0) is for binding"),
    (["worker", "run", "workers.echo"], "expected MODULE:CLASS"),
    (["worker", "run", "workers.echo:Echo,workers.kv:KeyValue"],
     "give each MODULE:CLASS as an argument of its own, e.g. zrpc worker run workers.echo:Echo workers.kv:KeyValue"),
])
def test_user_mistakes_are_one_line_usage_errors(cli, args, problem):
    result = cli(*args)
    assert result.exit_code == 2
    assert problem in one_line_error(result.stderr)


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root with a sys.path that is restored afterwards."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.parametrize("target, problem", [
    ("no_such_module_zz:Echo", "cannot import 'no_such_module_zz': no such module"),
    ("workers.no_such_service:Echo", "cannot import 'workers.no_such_service': no such module"),
    ("workers.echo:NoSuchClass", "module 'workers.echo' has no attribute 'NoSuchClass'"),
    ("workers.echo:Ech", "module 'workers.echo' has no attribute 'Ech' (did you mean workers.echo:Echo?)"),
    ("json:JSONDecoder", "json:JSONDecoder is not a zrpc Service subclass"),
])
def test_worker_run_reports_a_bad_module_or_class_in_one_line(cli, in_repo, target, problem):
    result = cli("worker", "run", target)
    assert result.exit_code == 1
    assert problem in one_line_error(result.stderr)


def test_call_with_no_broker_answering_says_so_in_one_line(cli, ipc_dir):
    with zmq.Context() as context, context.socket(zmq.ROUTER) as silent:  # takes calls, never answers
        silent.bind(f"ipc://{ipc_dir}/silent")
        result = cli("call", "--broker", f"ipc://{ipc_dir}/silent", "--timeout", "0.2", "a.B/C")
        silent.close(linger=0)
    assert result.exit_code == 10 + zrpc.StatusCode.UNAVAILABLE
    line = one_line_error(result.stderr)
    assert f"no answer from broker at ipc://{ipc_dir}/silent within 0.2s" in line
    assert "zrpc broker start" in line
    assert "If it requires CURVE keys, pass --broker-key and --curve-secret." in line


@pytest.mark.parametrize("command", [("call", "a.B/C"), ("services",), ("health",), ("status",)])
def test_a_command_with_no_broker_there_fails_at_once_not_at_its_timeout(cli, ipc_dir, command):
    # Not "no answer ... within 60s": the first failed connection attempt ends it.
    result = cli(*command, "--broker", f"ipc://{ipc_dir}/nobody", "--timeout", "60")
    assert result.exit_code == 10 + zrpc.StatusCode.UNAVAILABLE
    assert (f"cannot connect to broker at ipc://{ipc_dir}/nobody: nothing accepted the connection "
            f"(is `zrpc broker start` running there?)") in result.stderr


@needs_curve
def test_a_plain_client_of_a_curve_broker_is_told_it_may_need_keys(cli, tmp_path):
    keys = Keys(tmp_path)
    broker = zrpc.Broker(keys.config()).start()
    try:
        result = cli("services", "--broker", broker.frontend_endpoint, "--timeout", "0.3")
    finally:
        broker.stop()
    line = one_line_error(result.stderr)
    if result.exit_code == 10 + zrpc.StatusCode.UNAUTHENTICATED:  # ZeroMQ reported the mismatch
        assert line.endswith("requires CURVE: give its public key (--broker-key) and a secret key (--curve-secret)")
        return
    assert result.exit_code == 10 + zrpc.StatusCode.UNAVAILABLE  # it saw only connections closed
    assert line.endswith("(is `zrpc broker start` running? If it requires CURVE keys, "
                         "pass --broker-key and --curve-secret.)")


# ------------------------------------------------------------------ broker settings

def test_shipped_config_file_lists_every_setting_with_its_default():
    settings = load_config_file(REPO / "broker" / "zrpc-broker.toml", extra=_broker_cmd._PROCESS_SETTINGS)
    process = {name: settings.pop(name) for name in _broker_cmd._PROCESS_SETTINGS}
    assert set(settings) == set(BrokerConfig.field_names())
    assert BrokerConfig(**settings) == BrokerConfig()
    # The metrics port broker/prometheus.yml scrapes, for a unit that passes only --config.
    assert process == {"log_format": "text", "metrics_port": 9464, "metrics_host": "127.0.0.1"}
    assert '"127.0.0.1:9464"' in (REPO / "broker" / "prometheus.yml").read_text()


def test_a_config_file_sets_the_process_settings_too_and_flags_still_win(spawn, tmp_path, ipc_dir):
    path = tmp_path / "broker.toml"
    path.write_text(f'[broker]\nfrontend = "ipc://{ipc_dir}/f"\nbackend = "ipc://{ipc_dir}/b"\n'
                    'metrics_port = 0\nlog_format = "json"\n')
    broker = spawn(*zrpc_cli("broker", "start", "--config", str(path)))
    ready = broker.wait_line("zrpc broker ready")
    assert " metrics=http://127.0.0.1:" in ready
    wait_for(lambda: any(line.startswith("{") and '"broker bound' in line for line in broker.errors))
    broker.stop()
    flagged = spawn(*zrpc_cli("broker", "start", "--config", str(path), "--log-format", "text"))
    flagged.wait_line("zrpc broker ready")
    wait_for(lambda: any("broker bound" in line for line in flagged.errors))
    assert not any(line.startswith("{") for line in flagged.errors)


def test_relative_key_paths_in_a_config_file_are_relative_to_the_file(tmp_path):
    path = tmp_path / "etc" / "broker.toml"
    path.parent.mkdir()
    path.write_text('[broker]\ncurve_secret = "secrets/broker.key_secret"\nclient_keys = "/abs/clients"\n')
    settings = load_config_file(path)
    assert settings["curve_secret"] == str(tmp_path / "etc" / "secrets" / "broker.key_secret")
    assert settings["client_keys"] == "/abs/clients"


def test_a_key_directory_that_does_not_exist_is_a_bad_setting_exit_2(tmp_path, ipc_dir):
    from zrpc import _security

    _security.generate_keys("broker", tmp_path / "secrets")
    path = tmp_path / "broker.toml"
    path.write_text(f'[broker]\nfrontend = "ipc://{ipc_dir}/f"\nbackend = "ipc://{ipc_dir}/b"\n'
                    'curve_secret = "secrets/broker.key_secret"\nclient_keys = "nope"\nworker_keys = "nope"\n')
    result = run_cli("broker", "start", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "bad broker setting: key directory" in result.stderr and "nope does not exist" in result.stderr


def test_sighup_to_a_broker_without_curve_is_logged_and_the_broker_serves_on(cli_broker):
    process, frontend, _ = cli_broker
    process.signal(signal.SIGHUP)  # what `systemctl reload` sends
    wait_for(lambda: any("there are no keys to reload" in line for line in process.errors))
    assert process.popen.poll() is None
    result = run_cli("health", "--broker", frontend)
    assert result.returncode == 0, result.stderr


def test_flags_win_over_the_file_and_the_file_over_defaults(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nqueue-size = 7\nunavailable_wait = 1.5\nfrontend = "ipc:///tmp/x"\n')
    from_file, _ = _broker_cmd._read_config_file(str(path))
    config = _broker_cmd._build_config(str(path), from_file, queue_size=9, frontend=None, backend=None, log_level=None)
    assert config.queue_size == 9  # flag
    assert config.unavailable_wait == 1.5 and config.frontend == "ipc:///tmp/x"  # file
    assert config.heartbeat_liveness == BrokerConfig().heartbeat_liveness  # default


@pytest.mark.parametrize("text, problem", [
    ("[broker]\nqueue_sise = 3\n", "unknown setting 'queue_sise'"),
    ("[broker]\nqueue_size = 0\n", "queue_size must be at least 1"),
    ("[broker\n", "not valid TOML"),
    ("queue_size = 5\n[broker]\nmax_in_flight = 9\n", "unknown key 'queue_size' outside the [broker] table"),
    ("[broker]\nqueue_size = 5\n[limits]\nmax_in_flight = 9\n", "unknown table [limits]"),
    ("[brokers]\nqueue_size = 5\n", "unknown table [brokers]"),
    ('broker = "on"\n', "broker must be a table"),
    ('[broker]\nlog_level = "LOUD"\n', "bad log_level 'LOUD'"),
    ("[broker]\nbusy_poll = true\n", "busy_poll must be a finite number, not True"),
    ('[broker]\nfrontend = "tcp://127.0.0.1:70000"\n', "bad frontend endpoint"),
])
def test_a_bad_config_file_stops_the_broker_with_one_line_naming_the_file(cli, tmp_path, text, problem):
    path = tmp_path / "broker.toml"
    path.write_text(text)
    result = cli("broker", "start", "--config", str(path))
    assert result.exit_code == 2
    line = one_line_error(result.stderr)
    assert problem in line and line.startswith(f"error: {path}: ")


def test_a_bad_setting_names_the_file_only_for_what_came_from_it(cli, tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nfrontend = "ipc:///tmp/zrpc-same"\nbackend = "ipc:///tmp/zrpc-same"\n')
    both = one_line_error(cli("broker", "start", "--config", str(path)).stderr)
    assert both.startswith(f"error: {path}: bad broker setting: frontend and backend are the same endpoint")
    mixed = one_line_error(cli("broker", "start", "--config", str(path), "--frontend", "ipc:///tmp/zrpc-same").stderr)
    assert mixed.startswith("error: bad broker setting: frontend and backend") and mixed.endswith(f"(backend from {path})")
    flags = one_line_error(cli("broker", "start", "--config", str(path), "--frontend", "ipc:///tmp/zrpc-x",
                               "--backend", "ipc:///tmp/zrpc-x").stderr)
    assert "the same endpoint" in flags and str(path) not in flags


@pytest.mark.parametrize("frontend, backend, problem", [
    ("tcp://127.0.0.1:70000", "tcp://127.0.0.1:0", "port '70000' is not a number from 0 to 65535"),
    ("ipc:///tmp/zrpc-same", "ipc:///tmp/zrpc-same", "the same endpoint"),
    ("ipc:///tmp/zrpc-x/./same", "ipc:///tmp/zrpc-x/same", "the same endpoint"),  # one path, spelt twice
    ("ipc:////tmp/zrpc-x/same", "ipc:///tmp/zrpc-x/same", "the same endpoint"),
    (f"ipc://{os.path.relpath('/tmp/zrpc-x/same')}", "ipc:///tmp/zrpc-x/same", "the same endpoint"),
    ("tcp://[::1]", "tcp://127.0.0.1:0", "no port"),  # the last colon is inside the IPv6 literal
])
def test_broker_config_refuses_endpoints_that_cannot_work_from_python_too(frontend, backend, problem):
    with pytest.raises(ValueError, match=problem):
        BrokerConfig(frontend=frontend, backend=backend).validate()


def test_a_bind_failure_says_when_frontend_and_backend_ask_for_one_port(cli):
    import socket

    with socket.socket() as taken:  # held: the broker's first bind fails whatever the host spelling
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("broker", "start", "--frontend", f"tcp://127.0.0.1:{port}", "--backend", f"tcp://localhost:{port}")
    assert result.exit_code == 1
    line = one_line_error(result.stderr)
    assert "Address already in use" in line and line.endswith(f"the frontend and the backend both ask for port {port}")
    with socket.socket() as taken:  # two addresses, one port: no clash between them to hint at
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("broker", "start", "--frontend", f"tcp://127.0.0.1:{port}", "--backend", f"tcp://127.0.0.2:{port}")
    assert result.exit_code == 1 and "both ask for port" not in result.stderr


def test_two_free_tcp_ports_are_not_the_same_endpoint():
    BrokerConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0").validate()
    BrokerConfig(frontend="ipc://@zrpc-x/../same", backend="ipc://same").validate()  # an abstract name is no path
    BrokerConfig(frontend="tcp://*:*", backend="tcp://*:*").validate()


def test_broker_bind_failure_is_one_line_and_non_zero(cli):
    context = zmq.Context.instance()
    taken = context.socket(zmq.ROUTER)
    taken.linger = 0
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        result = cli("broker", "start", "--frontend", f"tcp://127.0.0.1:{port}", "--backend", "tcp://127.0.0.1:0")
    finally:
        taken.close()
    assert result.exit_code == 1
    assert "Address already in use" in one_line_error(result.stderr)


def test_broker_refuses_an_ipc_path_a_live_broker_serves(cli_broker, cli):
    _, frontend, _ = cli_broker
    result = cli("broker", "start", "--frontend", frontend, "--backend", "tcp://127.0.0.1:0")
    assert result.exit_code == 1
    assert "Address already in use" in one_line_error(result.stderr)


# ------------------------------------------------------------------ services table

def test_services_table_columns_are_aligned():
    listing = bpb.ListServicesReply()
    listing.services.add(name="a.B", methods=["X"], live_workers=12, in_flight=3, capacity=160, queue_depth=0)
    listing.services.add(name="helloworld.Greeter", methods=["SayHello", "Other"], live_workers=1,
                         in_flight=0, capacity=16, queue_depth=250)
    listing.services.add(name="zrpc.Broker", methods=["Health"], live_workers=1, in_flight=0, capacity=1)
    rolling = listing.services.add(name="kv.KeyValue", methods=["Get"], live_workers=1, in_flight=3, capacity=8)
    rolling.workers.add(name="kv-1", capacity=8, in_flight=1)
    rolling.workers.add(name="kv-2", capacity=8, in_flight=2, draining=True)
    listing.services.add(name="hung.H", methods=["M"], live_workers=1, in_flight=0, capacity=2, held_by_answered=2)
    lines = format_services(listing).splitlines()
    assert lines[0].split() == ["SERVICE", "METHODS", "WORKERS", "IN-FLIGHT/CAPACITY", "QUEUED"]
    # Its two slots are held by calls answered without it (a hung handler): not "0/2", free.
    assert lines[5].split() == ["hung.H", "M", "1", "0", "+2", "held/2", "0"]
    assert lines[1].split() == ["a.B", "X", "12", "3/160", "0"]
    assert lines[2].split() == ["helloworld.Greeter", "SayHello,Other", "1", "0/16", "250"]
    # The broker answers its own service: no worker, capacity or queue to count.
    assert lines[3].split() == ["zrpc.Broker", "Health", "-", "built-in", "-"]
    # A rolling upgrade: the draining worker is not live, and its calls still count.
    assert lines[4].split() == ["kv.KeyValue", "Get", "1", "+1", "draining", "3/8", "0"]
    assert len({len(line) for line in lines}) == 1  # numbers right-aligned to one width


# ------------------------------------------------------------------ end to end, real processes

@pytest.fixture
def greeter(cli_broker, spawn):
    """A CLI broker and a `zrpc worker run workers.greeter:Greeter workers.echo:Echo`, registered."""
    broker, frontend, backend = cli_broker
    worker = spawn(*zrpc_cli("worker", "run", "workers.greeter:Greeter", "workers.echo:Echo",
                             "--broker", backend, "--heartbeat-interval", "0.2", "--concurrency", "4"))
    ready = worker.wait_line("zrpc worker ready:")
    assert ready == (f"zrpc worker ready: services=helloworld.Greeter,echo.Echo brokers={backend} "
                     f"concurrency=4")
    with zrpc.Client(frontend, timeout=5.0) as client:
        def registered():
            raw = client.call("zrpc.Broker", "ListServices", b"", timeout=2.0)
            names = {s.name for s in bpb.ListServicesReply.FromString(raw).services if s.live_workers}
            return {"helloworld.Greeter", "echo.Echo"} <= names
        wait_for(registered, 15.0, message="the worker to register")
    return broker, worker, frontend


def test_call_prints_the_json_reply(greeter):
    _, _, frontend = greeter
    result = run_cli("call", "--broker", frontend, "helloworld.Greeter/SayHello", '{"name":"Ada"}')
    assert result.returncode == 0, result.stderr
    assert '"message": "Hello, Ada!"' in result.stdout
    assert json.loads(result.stdout) == {"message": "Hello, Ada!"}
    # Text as it is, not as \u escapes (a tester's "\u0410\u0434\u0430 \ud83d\ude00").
    result = run_cli("call", "--broker", frontend, "helloworld.Greeter/SayHello", '{"name":"Ада 😀"}',
                     env={"PYTHONIOENCODING": "utf-8"})
    assert '"message": "Hello, Ада 😀!"' in result.stdout, result.stdout


@pytest.mark.parametrize("request_json, problem", [
    ('{"paylod": "aGk="}', "bad request for echo.EchoRequest: it has no field 'paylod' (did you mean 'payload'? "
                           "fields: payload)"),
    ('{"payload": "hello"}', 'bytes fields take base64 in protobuf\'s JSON: "aGVsbG8=" for hello'),
])
def test_a_request_with_a_misspelt_field_or_bytes_not_in_base64_says_so(greeter, request_json, problem):
    """A new-user tester read protobuf's 'Available Fields(except extensions): "['payload']"', and
    a base64 error with no word that bytes fields take base64."""
    _, _, frontend = greeter
    result = run_cli("call", "--broker", frontend, "echo.Echo/Say", request_json)
    assert result.returncode == 2
    assert problem in one_line_error(result.stderr)


def test_call_reads_the_broker_from_ZRPC_BROKER_and_the_request_from_stdin(greeter):
    _, _, frontend = greeter
    result = run_cli("call", "helloworld.Greeter/SayHello", "-", env={"ZRPC_BROKER": frontend},
                     input='{"name": "Grace"}')
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"message": "Hello, Grace!"}


def test_services_reads_ZRPC_BROKER_and_ZRPC_SERVICES_JSON(greeter):
    _, _, frontend = greeter
    result = run_cli("services", env={"ZRPC_BROKER": frontend, "ZRPC_SERVICES_JSON": "1"})
    assert result.returncode == 0, result.stderr
    assert "helloworld.Greeter" in {service["name"] for service in json.loads(result.stdout)["services"]}


def test_call_unknown_service_is_not_found_with_its_exit_status(greeter):
    _, _, frontend = greeter
    result = run_cli("call", "--broker", frontend, "nobody.Offers/This", "{}")
    assert result.returncode == 10 + zrpc.StatusCode.NOT_FOUND
    assert one_line_error(result.stderr).startswith("error: NOT_FOUND: ")
    assert result.stdout == ""


def test_call_right_after_the_broker_started_waits_for_a_worker_still_registering(endpoints):
    """A tester's script: start the broker, start a worker, call at once. The call asked for the
    service's description before the worker had registered and failed NOT_FOUND, though the
    broker was in its start-up grace, when calls to an unknown service wait for one."""
    frontend, backend = endpoints
    broker = zrpc.Broker(BrokerConfig(frontend=frontend, backend=backend, unknown_service_grace=30.0,
                                      log_level="WARNING")).start()
    call = subprocess.Popen(zrpc_cli("call", "--broker", frontend, "--timeout", "20", "echo.Echo/Say",
                                     '{"payload": "aGk="}'), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # Its first DescribeService is answered NOT_FOUND (no worker yet); then the worker comes.
        wait_for(lambda: broker.engine.counters["requests"] >= 1, message="the call to ask the broker")
        with zrpc.Worker([Echo()], brokers=backend):
            stdout, stderr = call.communicate(timeout=30)
        assert call.returncode == 0, stderr
        assert json.loads(stdout) == {"payload": "aGk="}
    finally:
        call.kill()
        call.wait(timeout=10)
        broker.stop()
    assert broker.engine.services["echo.Echo"].offered


def test_call_unknown_method_and_unknown_field_name_the_problem(greeter):
    _, _, frontend = greeter
    result = run_cli("call", "--broker", frontend, "helloworld.Greeter/SayGoodbye")
    assert result.returncode == 10 + zrpc.StatusCode.UNIMPLEMENTED
    assert "it has: SayHello" in one_line_error(result.stderr)
    result = run_cli("call", "--broker", frontend, "helloworld.Greeter/SayHello", '{"nam": "Ada"}')
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "helloworld.HelloRequest: it has no field 'nam' (did you mean 'name'? fields: name)" in line


def test_a_service_named_without_its_package_is_answered_with_the_one_meant(greeter):
    """A tester's `zrpc call Greeter/SayHello` was told only NOT_FOUND."""
    _, _, frontend = greeter
    for target in ("Greeter/SayHello", "helloworld.greeter/SayHello"):
        result = run_cli("call", "--broker", frontend, target, '{"name": "Ada"}')
        assert result.returncode == 10 + zrpc.StatusCode.NOT_FOUND
        assert one_line_error(result.stderr).endswith("(did you mean 'helloworld.Greeter'?)"), result.stderr
    unlike = run_cli("call", "--broker", frontend, "nothing.Like/This", "{}")
    assert "did you mean" not in unlike.stderr


def test_call_takes_grpcurls_dotted_method_form_and_grpcs_full_method_name_too(greeter):
    _, _, frontend = greeter
    for target in ("helloworld.Greeter.SayHello", "/helloworld.Greeter/SayHello"):
        result = run_cli("call", "--broker", frontend, target, '{"name": "Ada"}')
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"message": "Hello, Ada!"}


class SilentEchoBroker(FakeFrontend):
    """Describes echo.Echo as a broker would, then never answers a call to it."""

    def answer(self, header, payload: bytes):
        if header.service == "zrpc.Broker" and header.method == "DescribeService":
            echo = echo_pb2.DESCRIPTOR.services_by_name["Echo"]
            reply = bpb.DescribeServiceReply(service=echo.full_name, file_descriptor_set=file_descriptor_set([echo]))
            return protocol.encode_ok_reply_header(header.request_id), reply.SerializeToString()
        return None


def test_a_deadline_error_of_a_service_with_no_live_worker_gets_no_timeout_hint():
    from zrpc._cli import _common

    assert _common._UNSERVED_DETAIL == protocol.UNSERVED_DETAIL
    unserved = zrpc.Error(zrpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while queued (500 ms were left "
                          "when the broker took the call): service 'a.S' has had no live worker for 3.0s",
                          {protocol.UNSERVED_DETAIL: "1"})
    failed = _common.call_failed(unserved)
    assert str(failed).endswith("no live worker for 3.0s") and failed.details == {protocol.UNSERVED_DETAIL: "1"}
    slow = zrpc.Error(zrpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded at the worker")
    assert str(_common.call_failed(slow)).endswith("; pass a larger --timeout if the call is slow")


def test_call_max_message_bytes_is_a_flag_and_its_error_names_it():
    """A tester's oversized request was told to raise max_message_bytes=, which the CLI had no
    flag for."""
    broker = SilentEchoBroker()  # describes echo.Echo; the request never leaves the client
    payload = base64.b64encode(b"x" * 2000).decode()
    try:
        small = run_cli("call", "--broker", broker.endpoint, "--max-message-bytes", "1000", "echo.Echo/Say",
                        json.dumps({"payload": payload}))
    finally:
        broker.stop()
    assert small.returncode == 10 + zrpc.StatusCode.RESOURCE_EXHAUSTED
    line = one_line_error(small.stderr)
    assert "over the client's max_message_bytes (1,000)" in line and "in the client (--max-message-bytes)" in line
    assert broker.request_messages == 1  # DescribeService only


def test_ctrl_c_during_a_call_exits_130():
    """A tester's Ctrl-C printed "Aborted!" and exited 1, the status of file and bind errors."""
    broker = SilentEchoBroker()
    try:
        call = subprocess.Popen(zrpc_cli("call", "--broker", broker.endpoint, "--timeout", "60", "echo.Echo/Say", "{}"),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: broker.request_messages >= 2, message="the call to be sent")  # after DescribeService
            call.send_signal(signal.SIGINT)
            _, stderr = call.communicate(timeout=20)
        finally:
            call.kill()
            call.wait(timeout=10)
    finally:
        broker.stop()
    assert call.returncode == 130
    assert stderr == "interrupted\n"


def test_call_deadline_error_names_the_timeout_flag():
    broker = SilentEchoBroker()
    try:
        result = run_cli("call", "--broker", broker.endpoint, "--timeout", "0.5", "echo.Echo/Say", "{}")
    finally:
        broker.stop()
    assert result.returncode == 10 + zrpc.StatusCode.DEADLINE_EXCEEDED
    line = one_line_error(result.stderr)
    assert line.startswith("error: DEADLINE_EXCEEDED: deadline of 0.500s exceeded calling echo.Echo/Say")
    assert "pass a larger --timeout" in line and "timeout=" not in line


def test_a_broker_that_accepts_the_connection_and_answers_nothing_is_said_to_be_stuck():
    broker = SilentEchoBroker()  # its Health goes unanswered too, as in a broker whose loop hangs
    try:
        result = run_cli("health", "--broker", broker.endpoint, "--timeout", "3")
    finally:
        broker.stop()
    assert result.returncode == 10 + zrpc.StatusCode.UNAVAILABLE
    assert one_line_error(result.stderr) == (
        f"error: the broker at {broker.endpoint} accepted the connection but has answered nothing for "
        f"3.0s, not even a Health call: is it stuck, or starved of CPU?")


def test_a_slow_call_says_to_pass_a_larger_timeout_whichever_deadline_fires_first(greeter):
    _, _, frontend = greeter
    for _ in range(3):  # the client's, the broker's or the worker's: each says it
        result = run_cli("call", "--broker", frontend, "--timeout", "0.3", "echo.Echo/Sleep", '{"ms": 1500}')
        assert result.returncode == 10 + zrpc.StatusCode.DEADLINE_EXCEEDED
        line = one_line_error(result.stderr)
        assert line.startswith("error: DEADLINE_EXCEEDED: ") and "pass a larger --timeout" in line, line


def test_a_call_to_a_service_whose_workers_are_gone_says_so_whichever_answer_comes_first(spawn, endpoints):
    """A tester stopped the only worker: `zrpc call` (5 s timeout, the broker's unavailable_wait
    too) said DEADLINE_EXCEEDED "pass a larger --timeout", and with a larger one the idempotent
    call was retried at the same broker, to wait again and end the same way."""
    frontend, backend = endpoints
    spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                    "--unknown-service-grace", "0", "--unavailable-wait", "3")).wait_line("zrpc broker ready")
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend, "--drain-grace", "0"))
    worker.wait_line("zrpc worker ready:")
    wait_until_served(frontend, "echo.Echo")
    worker.stop()
    with zrpc.Client(frontend, timeout=5.0) as client:
        wait_for(lambda: not any(s.live_workers for s in bpb.ListServicesReply.FromString(
            client.call("zrpc.Broker", "ListServices", b"", timeout=2.0)).services if s.name == "echo.Echo"),
            message="the worker to leave")
    # Its deadline first: the broker's expiry says why the call waited, without the hint. The
    # client sends its deadline 20 ms short (spec §5), so the broker's answer comes first: the
    # client's own timer won when the deadlines were the same, and knew only "no answer".
    result = run_cli("call", "--broker", frontend, "--timeout", "2", "echo.Echo/Say", "{}")
    assert result.returncode == 10 + zrpc.StatusCode.DEADLINE_EXCEEDED
    line = one_line_error(result.stderr)
    assert line.startswith("error: DEADLINE_EXCEEDED: deadline exceeded while queued"), line
    assert "service 'echo.Echo' has had no live worker for" in line and "zrpc worker run" in line
    assert "--timeout" not in line and "zrpc-no-live-worker" not in result.stderr
    # unavailable_wait first: its refusal, once, though Say is idempotent.
    result = run_cli("call", "--broker", frontend, "--timeout", "30", "echo.Echo/Say", "{}")
    assert result.returncode == 10 + zrpc.StatusCode.UNAVAILABLE
    assert result.stderr.splitlines() == [
        "error: UNAVAILABLE: no live worker for service 'echo.Echo' (waited 3s); start one with: zrpc worker run MODULE:CLASS",
        "  zrpc-retry: not-run"]  # and no zrpc-attempts: it was not retried


def test_call_greeter_with_an_empty_name_is_invalid_argument(greeter):
    _, _, frontend = greeter
    result = run_cli("call", "--broker", frontend, "helloworld.Greeter/SayHello", '{"name": ""}')
    assert result.returncode == 10 + zrpc.StatusCode.INVALID_ARGUMENT
    assert one_line_error(result.stderr) == "error: INVALID_ARGUMENT: name must not be empty"
    assert result.stdout == ""


def test_call_handler_error_maps_to_ten_plus_its_code(greeter):
    _, _, frontend = greeter
    result = run_cli("call", "--broker", frontend, "echo.Echo/Fail", '{"code": 9, "message": "not yet"}')
    assert result.returncode == 10 + zrpc.StatusCode.FAILED_PRECONDITION
    assert one_line_error(result.stderr) == "error: FAILED_PRECONDITION: not yet"


def test_call_prints_the_error_details_after_the_error_line(cli_broker, spawn):
    _, frontend, backend = cli_broker
    worker = spawn(*zrpc_cli("worker", "run", "tests._services:DetailedFailEcho", "--broker", backend))
    worker.wait_line("zrpc worker ready:")
    wait_until_served(frontend, "echo.Echo")
    result = run_cli("call", "--broker", frontend, "echo.Echo/Fail", '{"code": 3, "message": "division by zero"}')
    assert result.returncode == 10 + zrpc.StatusCode.INVALID_ARGUMENT
    assert result.stderr.splitlines() == ["error: INVALID_ARGUMENT: division by zero",
                                          "  field: b", "  hint: division by zero"]
    assert result.stdout == ""


def test_services_lists_the_worker(greeter):
    _, _, frontend = greeter
    result = run_cli("services", "--broker", frontend)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["helloworld.Greeter"][1:] == ["SayHello", "1", "0/4", "0"]
    assert rows["echo.Echo"][1:3] == ["Fail,Say,Sleep", "1"]
    listing = json.loads(run_cli("services", "--broker", frontend, "--json").stdout)
    greeter_info = next(s for s in listing["services"] if s["name"] == "helloworld.Greeter")
    assert greeter_info["live_workers"] == 1 and greeter_info["capacity"] == 4
    assert greeter_info["calls_total"] == 0  # a number, not proto3 JSON's "0" (a tester's jq)


def test_health_exit_status_tells_serving_from_not(greeter):
    _, _, frontend = greeter
    serving = run_cli("health", "--broker", frontend, "helloworld.Greeter")
    assert serving.returncode == 0 and "SERVING" in serving.stdout
    unknown = run_cli("health", "--broker", frontend, "nobody.Offers")
    assert unknown.returncode == 4 and "SERVICE_UNKNOWN" in unknown.stdout


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_on_call_cancels_the_call(greeter, spawn, signum, status, said):
    """A tester's Ctrl-C ended `zrpc call`, and the call ran on at its worker to its end; so did
    `timeout 5 zrpc call ...` (SIGTERM killed the process, no CANCEL sent)."""
    _, _, frontend = greeter

    def in_flight() -> int:
        with zrpc.Client(frontend, timeout=5.0) as client:
            raw = client.call("zrpc.Broker", "ListServices", b"", timeout=5.0)
        return next(s.in_flight for s in bpb.ListServicesReply.FromString(raw).services if s.name == "echo.Echo")

    caller = spawn(*zrpc_cli("call", "--broker", frontend, "--timeout", "120", "echo.Echo/Sleep", '{"ms": 120000}'))
    wait_for(lambda: in_flight() == 1, 15.0, message="the call to reach the worker")
    caller.signal(signum)
    assert caller.popen.wait(10) == status
    wait_for(lambda: in_flight() == 0, 10.0, message="the call to be cancelled at its broker")
    assert said in caller.errors


def test_sigterm_stops_worker_and_broker_with_exit_status_0(greeter, cli_broker):
    broker, worker, _ = greeter
    _, frontend, backend = cli_broker
    files = [endpoint[len("ipc://"):] for endpoint in (frontend, backend)]
    assert all(os.path.exists(path) for path in files)
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(15) == 0
    broker.signal(signal.SIGTERM)
    assert broker.popen.wait(15) == 0
    assert not any("Traceback" in line for line in broker.errors + worker.errors)
    # Its ipc socket files go with it (libzmq 4.3 leaves them; a tester found them after stops).
    assert [path for path in files if os.path.exists(path)] == []


def test_a_second_signal_stops_a_draining_worker_at_once(cli_broker, spawn):
    """A tester's worker, draining a call that hung (grace 60 s), ignored every later Ctrl-C and
    SIGTERM; the broker stops at once on a second signal, and now so does the worker."""
    _, frontend, backend = cli_broker
    worker = spawn(*zrpc_cli("worker", "run", "tests._services:HangingEcho", "--broker", backend,
                             "--drain-grace", "60", "--heartbeat-interval", "0.2"))
    worker.wait_line("zrpc worker ready:")
    wait_until_served(frontend, "echo.Echo")
    with zrpc.Client(frontend, timeout=60.0) as client:
        hung = client.call_future("echo.Echo", "Say", b"", metadata={"hang_s": "30"})
        wait_for(lambda: _in_flight(client) == 1, 15.0, message="the call to reach the worker")
        worker.signal(signal.SIGTERM)
        wait_for(lambda: any("draining: 1 call(s) running" in line for line in worker.errors), 15.0,
                 message="the drain to begin")
        worker.signal(signal.SIGINT)
        assert worker.popen.wait(15) == 0  # not after the hung call's 30 s, or the grace's 60
        assert any("received another signal; stopping now" in line for line in worker.errors)
        assert any("1 call(s) still running when asked to stop now" in line for line in worker.errors)
        hung.cancel()


def _in_flight(client) -> int:
    raw = client.call("zrpc.Broker", "ListServices", b"", timeout=5.0)
    return sum(s.in_flight for s in bpb.ListServicesReply.FromString(raw).services)


def test_broker_start_with_its_metrics_port_taken_exits_1_and_leaves_no_ipc_file(ipc_dir):
    """The broker had bound its ipc:// paths when the metrics port failed: their files stayed."""
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli("broker", "start", "--frontend", f"ipc://{ipc_dir}/f", "--backend", f"ipc://{ipc_dir}/b",
                         "--metrics-port", str(port))
    finally:
        taken.close()
    assert result.returncode == 1, result.stderr
    assert f"error: cannot serve metrics on 127.0.0.1:{port}: " in result.stderr
    assert os.listdir(ipc_dir) == []


def test_broker_start_reads_the_config_file_and_prints_resolved_endpoints(spawn, ipc_dir, tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text(f'[broker]\nfrontend = "tcp://127.0.0.1:0"\nbackend = "ipc://{ipc_dir}/from-file"\n'
                    f'log_level = "WARNING"\n')
    broker = spawn(*zrpc_cli("broker", "start", "--config", str(path), "--backend", f"ipc://{ipc_dir}/flag"))
    line = broker.wait_line("zrpc broker ready:")
    fields = dict(part.split("=", 1) for part in line.split(": ", 1)[1].split())
    assert fields["frontend"].startswith("tcp://127.0.0.1:") and not fields["frontend"].endswith(":0")
    assert fields["backend"] == f"ipc://{ipc_dir}/flag"  # the flag wins over the file
    assert broker.lines == [line]  # exactly one line on stdout
    assert broker.stop() == 0
    assert not any(" INFO " in line for line in broker.errors)  # log_level from the file


def test_services_and_health_ask_every_broker_of_a_list(spawn, ipc_dir):
    frontends, backends = [], []
    for name in ("one", "two"):
        frontend, backend = f"ipc://{ipc_dir}/{name}-frontend", f"ipc://{ipc_dir}/{name}-backend"
        spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                        "--log-level", "WARNING")).wait_line("zrpc broker ready:")
        frontends.append(frontend)
        backends.append(backend)
    worker = spawn(*zrpc_cli("worker", "run", "workers.greeter:Greeter", "--broker", ",".join(backends),
                             "--heartbeat-interval", "0.2"))
    worker.wait_line("zrpc worker ready:")

    def both_list_the_greeter():
        result = run_cli("services", "--json", "--broker", frontends[0], "--broker", frontends[1])
        by_broker = json.loads(result.stdout)["brokers"]
        return all(any(s["name"] == "helloworld.Greeter" and s["live_workers"] == 1 for s in listing["services"])
                   for listing in by_broker.values())
    wait_for(both_list_the_greeter, 15.0, interval=0.1, message="both brokers to list the greeter")
    table = run_cli("services", "--broker", ",".join(frontends)).stdout
    assert f"broker {frontends[0]}" in table and f"broker {frontends[1]}" in table
    assert table.count("helloworld.Greeter") == 2
    health = run_cli("health", "--broker", ",".join(frontends), "helloworld.Greeter")
    assert health.returncode == 0
    assert health.stdout.count("helloworld.Greeter: SERVING") == 2


def test_sigterm_with_a_silent_broker_stops_the_worker_without_waiting_out_the_grace(cli_broker, spawn):
    broker, frontend, backend = cli_broker
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend,
                             "--heartbeat-interval", "0.2", "--drain-grace", "60"))
    worker.wait_line("zrpc worker ready")
    wait_for(lambda: "echo.Echo" in run_cli("services", "--broker", frontend).stdout, 15,
             message="the worker registered")
    broker.signal(signal.SIGSTOP)  # its connection stays open, but it says nothing any more
    try:
        worker.signal(signal.SIGTERM)
        # No drain acknowledgement can come: the worker stops once the broker has been silent
        # for liveness x interval (0.6 s), not after the 60 s grace.
        assert worker.popen.wait(20) == 0
    finally:
        broker.signal(signal.SIGCONT)
    assert wait_for(lambda: any("went silent" in line for line in worker.errors), 5, message="the warning")


@needs_curve
def test_broker_start_warns_when_an_allow_list_directory_holds_no_keys(spawn, endpoints, tmp_path):
    keys = Keys(tmp_path)
    empty = tmp_path / "no-clients-yet"
    empty.mkdir()
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                             "--curve-secret", str(keys.broker_secret), "--client-keys", str(empty),
                             "--worker-keys", str(keys.workers)))
    broker.wait_line("zrpc broker ready")
    warning = wait_for(lambda: next((line for line in broker.errors if "allow-list" in line), None), 10,
                       message="the empty allow-list warning")
    assert "WARNING" in warning and f"client allow-list {empty} holds no *.key files" in warning
    assert not any("worker allow-list" in line for line in broker.errors)  # that one has a key


@needs_curve
@pytest.mark.parametrize("command", [["call", "echo.Echo/Say", "{}"], ["services"]])
def test_a_refused_handshake_is_reported_once(tmp_path, command):
    keys = Keys(tmp_path)
    broker = zrpc.Broker(keys.config()).start()
    try:
        result = run_cli(*command, "--broker", broker.frontend_endpoint, "--timeout", "10",
                         "--curve-secret", str(keys.secret("w1")), "--broker-key", str(keys.broker_public))
    finally:
        broker.stop()
    assert result.returncode == 10 + zrpc.StatusCode.UNAUTHENTICATED
    line = one_line_error(result.stderr)  # not a warning line and then the same as an error
    assert line.startswith("error: UNAUTHENTICATED: handshake refused by broker at "
                           f"{broker.frontend_endpoint}")


def test_held_refusals_are_kept_once_each_and_only_the_error_lines_own_is_dropped():
    """`zrpc status --watch` retries a refusing broker at every refresh: one warning each, not a
    pile at exit; the command's error line repeats only its own broker's refusal."""
    import logging

    from zrpc._cli._discovery import _HeldRefusals

    held = _HeldRefusals()

    def refusal(endpoint: str) -> logging.LogRecord:
        return logging.LogRecord("zrpc.client", logging.WARNING, __file__, 1,
                                 "zrpc client: handshake refused by broker at %s: %s",
                                 (endpoint, "our key is not allowed (ZAP status 400)"), None)

    for _ in range(30):
        assert not held.filter(refusal("tcp://127.0.0.1:1"))
    assert not held.filter(refusal("tcp://127.0.0.1:2"))
    assert len(held.records) == 2
    held.drop_said_by("handshake refused by broker at tcp://127.0.0.1:1: our key is not allowed (ZAP status 400)")
    assert [r.args[0] for r in held.records] == ["tcp://127.0.0.1:2"]
    backend = logging.LogRecord("zrpc.client", logging.ERROR, __file__, 1, "zrpc client: %s answers like a broker's "
                                "backend (the endpoint for workers): ...", ("tcp://127.0.0.1:3",), None)
    assert not held.filter(backend)
    held.drop_said_by("NOT_FOUND: no worker offers service 'a.B'")  # another error: both lines stay
    assert [r.args[0] for r in held.records] == ["tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]
    held.drop_said_by("tcp://127.0.0.1:3 is a broker's backend (the endpoint for workers): give its frontend")
    assert [r.args[0] for r in held.records] == ["tcp://127.0.0.1:2"]


def test_services_health_and_status_report_every_broker_when_one_does_not_answer(greeter, ipc_dir):
    """The live broker's answers are printed, the silent one is named, and the exit status is
    the silent one's (24), not the first answer's."""
    _, _, live = greeter
    silent = f"ipc://{ipc_dir}/nobody-here"
    services = run_cli("services", "--broker", silent, "--broker", live, "--timeout", "1")
    assert services.returncode == 24, services
    assert f"broker {live}" in services.stdout and "helloworld.Greeter" in services.stdout
    assert f"cannot connect to broker at {silent}" in one_line_error(services.stderr)

    health = run_cli("health", "--broker", silent, "--broker", live, "--timeout", "1", "helloworld.Greeter")
    assert health.returncode == 24, health
    assert f"{live} helloworld.Greeter: SERVING" in health.stdout
    assert f"{silent} helloworld.Greeter: NO ANSWER" in health.stdout

    status = run_cli("status", "--broker", silent, "--broker", live, "--timeout", "1", "--interval", "0.1")
    assert status.returncode == 24, status
    assert f"broker {live}: 2 service(s)" in status.stdout
    assert f"broker {silent}: cannot connect to broker at {silent}" in status.stdout


@pytest.mark.parametrize("args, variable, value", [
    (("broker", "start"), "ZRPC_BROKER_START_BUSY_POLL", "x"),  # the automatic name
    (("broker", "start"), "ZRPC_BROKER_START_QUEUE_SIZE", "0"),
    (("call", "echo.Echo/Say"), "ZRPC_CALL_TIMEOUT", "-1"),
])
def test_a_bad_value_from_the_environment_is_blamed_on_its_variable_not_the_flag(cli, args, variable, value):
    result = cli(*args, env={variable: value})
    assert result.exit_code == 2
    assert f"Invalid value for environment variable {variable}: " in result.stderr
    flag = cli(*args, f"--{variable.split('_', 3)[-1].lower().replace('_', '-')}", value)
    assert flag.exit_code == 2 and "Invalid value for '--" in flag.stderr and variable not in flag.stderr


@pytest.mark.parametrize("args, env, said", [
    (("services",), {"ZRPC_BROKER": "foo://"}, "bad broker endpoint 'foo://'"),
    (("broker", "start"), {"ZRPC_BROKER_START_FRONTEND": "foo://"}, "bad frontend endpoint 'foo://'"),
    (("broker", "start"), {"ZRPC_BROKER_START_FRONTEND": "ipc:///tmp/zrpc-same-env",
                           "ZRPC_BROKER_START_BACKEND": "ipc:///tmp/zrpc-same-env"}, "the same endpoint"),
])
def test_an_endpoint_checked_by_the_command_is_blamed_on_its_variable_too(cli, args, env, said):
    line = one_line_error(cli(*args, env=env).stderr)
    variables = ", ".join(env)
    assert said in line and line.endswith(f"(from environment variable{'s' if len(env) > 1 else ''} {variables})")


def test_a_command_given_a_brokers_backend_says_so_at_once(cli, ipc_dir):
    broker = zrpc.Broker(BrokerConfig(frontend=f"ipc://{ipc_dir}/f", backend=f"ipc://{ipc_dir}/b",
                                      log_level="ERROR")).start()
    try:
        result = cli("services", "--broker", f"ipc://{ipc_dir}/b", "--timeout", "60")
    finally:
        broker.stop()
    assert result.exit_code == 10 + zrpc.StatusCode.UNAVAILABLE
    assert one_line_error(result.stderr) == (
        f"error: ipc://{ipc_dir}/b is a broker's backend (the endpoint for workers): give its frontend "
        f"(`zrpc broker start --frontend`, port 5555 by default)")


def test_a_broker_variable_no_option_reads_is_warned_about(spawn, endpoints):
    frontend, backend = endpoints
    broker = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend),
                   env={"ZRPC_BROKER_START_MAX_FRAMES": "10", "ZRPC_BROKER_START_QUEUESIZE": "3"})
    broker.wait_line("zrpc broker ready")

    def warnings() -> list[str]:  # stderr is read by a thread of its own
        return [line.split(" WARNING zrpc.cli ")[1] for line in broker.errors if "is not read by" in line]

    wait_for(lambda: len(warnings()) == 2, message="the two warnings")
    assert warnings() == [
        "ZRPC_BROKER_START_MAX_FRAMES is not read by `zrpc broker start` and is ignored: max_frames is set in "
        "the config file (--config)",
        "ZRPC_BROKER_START_QUEUESIZE is not read by `zrpc broker start` and is ignored"]


def test_worker_run_logs_each_broker_that_takes_its_registration(spawn, endpoints):
    """"ready" says the worker started (it may start before its broker); a log line says when a
    broker has it."""
    frontend, backend = endpoints
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", backend,
                             "--heartbeat-interval", "0.2"))
    worker.wait_line("zrpc worker ready:")
    assert not any("registered with broker" in line for line in worker.errors)  # no broker there yet
    spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend)).wait_line("zrpc broker ready")
    wait_for(lambda: any(f"registered with broker {backend}" in line for line in worker.errors),
             15.0, message="the registration to be logged")


def test_the_cli_spells_the_silent_broker_detail_as_the_client_does():
    from zrpc._cli import _common
    from zrpc._client import _core

    assert _common._SILENT_DETAIL == _core.SILENT_DETAIL


def test_the_cli_spells_the_registration_grace_detail_as_the_broker_does():
    from zrpc._broker import _builtin
    from zrpc._cli import _discovery

    assert _discovery.GRACE_DETAIL == _builtin.GRACE_DETAIL


@pytest.fixture
def offline_netns():
    """A network namespace of our own with no interface up, whose name lookups read only its own
    hosts file (`ip netns exec` mounts /etc/netns/NAME/* over /etc): no packet leaves it (this
    machine's resolver is not on loopback), and the answers are the test's."""
    name = f"zrpc-dns{os.getpid() % 100_000}"
    config = pathlib.Path("/etc/netns", name)
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"network namespaces unavailable (`ip netns add` failed: {getattr(exc, 'stderr', None) or exc})")
    try:
        config.mkdir(parents=True)
        (config / "hosts").write_text("127.0.0.1 localhost\n2001:db8::1 v6only.test\n")  # a documentation address
        (config / "nsswitch.conf").write_text("hosts: files\n")
        yield name
    finally:
        shutil.rmtree(config, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)


def test_a_broker_host_name_that_cannot_work_is_named(offline_netns):
    brokers = "tcp://nosuchhost.invalid:5555,tcp://v6only.test:5555,tcp://a..b:5555,tcp://localhost:5555"
    result = subprocess.run(["ip", "netns", "exec", offline_netns, *zrpc_cli("call", "echo.Echo/Say", "{}",
                                                                               "--broker", brokers)],
                            capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 10 + zrpc.StatusCode.UNAVAILABLE
    assert one_line_error(result.stderr) == (
        f"error: cannot connect to broker at {brokers.replace(',', ', ')}: "
        "host 'nosuchhost.invalid' does not resolve (Name or service not known); "
        "host 'v6only.test' has no IPv4 address (zrpc connects to host names over IPv4): give its IPv6 "
        "address, as tcp://[ADDRESS]:PORT; "
        "host 'a..b' is not a valid host name; "
        "nothing accepted the connection at the others")


@pytest.mark.parametrize("endpoint, host", [
    ("tcp://broker.example:5555", "broker.example"),
    ("tcp://eth0;broker.example:5555", "broker.example"),  # libzmq's source;host form
    ("tcp://127.0.0.1:5555", None),  # addresses need no lookup
    ("tcp://[::1]:5555", None),
    ("ipc:///tmp/zrpc-frontend", None),
])
def test_only_tcp_host_names_are_looked_up(endpoint, host):
    from zrpc._endpoints import tcp_host_name

    assert tcp_host_name(endpoint) == host


def test_no_answer_within_a_very_short_timeout_names_the_timeout_too():
    """A tester's `zrpc call -t 0.005` at a running broker was told to check the broker."""
    from zrpc._cli import _discovery

    assert "Or is --timeout 0.005s too short to connect and ask?" in _discovery.no_answer(["ipc:///x"], 0.005).message
    assert "too short" not in _discovery.no_answer(["ipc:///x"], 5.0).message


def test_a_misspelt_variable_of_a_client_command_is_said_with_the_likely_one(cli):
    """A tester's ZRPC_CALL_TIMEUOT=1 was ignored without a word (the broker says so of its own)."""
    result = cli("call", "--broker", "ipc:///nonexistent/zrpc", "a.B/C", "[",
                 env={"ZRPC_CALL_TIMEUOT": "1", "ZRPC_CALL_TIMEOUT": None})
    assert ("warning: ZRPC_CALL_TIMEUOT is not read by `zrpc call` and is ignored (did you mean "
            "ZRPC_CALL_TIMEOUT?)") in result.stderr
    assert result.exit_code == 2  # and the command goes on: here, to refuse its bad JSON
    quiet = cli("call", "--broker", "ipc:///nonexistent/zrpc", "a.B/C", "[", env={"ZRPC_CALL_TIMEOUT": "1"})
    assert "warning" not in quiet.stderr
    # The variable --help shows, not the automatic one click reads too (ZRPC_CALL_BROKERS), and
    # compared without prefixes: ZRPC_CALL_BROKER_KEY is closer as a whole name.
    misspelt = cli("call", "--broker", "ipc:///nonexistent/zrpc", "a.B/C", "[", env={"ZRPC_CALL_BROKR": "x"})
    assert "is ignored (did you mean ZRPC_BROKER?)" in misspelt.stderr
    # Arguments read no variable: nothing to suggest for a name close to one (ZRPC_CALL_TARGET).
    argument = cli("call", "--broker", "ipc:///nonexistent/zrpc", "a.B/C", "[", env={"ZRPC_CALL_TARGT": "x"})
    assert "warning: ZRPC_CALL_TARGT is not read by `zrpc call` and is ignored\n" in argument.stderr


def test_worker_run_at_a_brokers_frontend_exits_1_naming_the_backend_option(cli_broker, spawn):
    _, frontend, _ = cli_broker
    worker = spawn(*zrpc_cli("worker", "run", "workers.echo:Echo", "--broker", frontend,
                             "--heartbeat-interval", "0.2", "--drain-grace", "60"))
    assert worker.popen.wait(20) == 1
    last = wait_for(lambda: next((line for line in worker.errors if line.startswith("error:")), None), 5,
                    message="the worker's error line")
    assert last.startswith(f"error: worker stopped: {frontend} answers like a broker's frontend")
    assert "workers connect to its backend (`zrpc broker start --backend`" in last
    # Said once: a new user saw the log line and then the same words as the error line.
    assert sum("answers like a broker's frontend" in line for line in worker.errors) == 1, worker.errors


def test_call_at_a_port_where_another_program_listens_says_no_handshake_came():
    """A new-user tester's `zrpc call` at an HTTP server's port read "no answer from broker ...
    (is `zrpc broker start` running?)": something did accept the connection."""
    import socket
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        accepted = []
        stop = threading.Event()

        def accept_and_say_nothing() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():  # bounded: the test sets stop, and each wait is 0.2 s
                try:
                    accepted.append(listener.accept()[0])
                except OSError:
                    continue

        thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
        thread.start()
        try:
            result = run_cli("call", "--broker", endpoint, "echo.Echo/Say", "{}", "--timeout", "1")
        finally:
            stop.set()
            thread.join(5)
            for connection in accepted:
                connection.close()
    assert result.returncode == 10 + zrpc.StatusCode.UNAVAILABLE
    assert one_line_error(result.stderr) == (
        f"error: something accepted a connection at {endpoint}, but no ZeroMQ handshake completed within 1s: "
        f"is a zrpc broker's frontend what listens there (not another program), and is that broker not stuck?")
