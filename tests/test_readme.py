"""What README.md shows runs as shown: the greeter it prints is the shipped one, and its
three-line test example passes quietly."""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys

import pytest

import zrpc
from workers.greeter import Greeter, helloworld_pb2
from zrpc.testing import serve

from .conftest import REPO, wait_until_served, zrpc_cli

README = (REPO / "README.md").read_text()


def python_block(first_line: str, language: str = "python") -> str:
    """The body of README's ```python (or ``language``) block whose first line is ``first_line``."""
    start = README.index(f"```{language}\n{first_line}\n") + len(f"```{language}\n")
    return README[start:README.index("```\n", start)]


def test_readme_greeter_is_the_shipped_workers_greeter_service():
    shown = python_block("# workers/greeter/service.py")
    shipped = (REPO / "workers" / "greeter" / "service.py").read_text()
    assert shown == "# workers/greeter/service.py\n" + shipped


def test_greeter_refuses_an_empty_name_as_readme_says():
    with serve(Greeter()) as client:
        greeter = client.stub(helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"])
        with pytest.raises(zrpc.Error) as raised:
            greeter.SayHello(helloworld_pb2.HelloRequest(name=""))
    # README prints: INVALID_ARGUMENT name must not be empty
    assert (raised.value.code.name, raised.value.message) == ("INVALID_ARGUMENT", "name must not be empty")


def test_readme_testing_example_passes_and_exits_without_a_warning(caplog):
    example = python_block("from zrpc.testing import serve")
    namespace = {"Greeter": Greeter, "helloworld_pb2": helloworld_pb2}
    exec(compile(example, "README.md", "exec"), namespace)
    with caplog.at_level(logging.WARNING):
        namespace["test_greeter"]()
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_readme_own_service_steps_generate_run_and_call_it(tmp_path, cli_broker, spawn):
    pytest.importorskip("grpc_tools")
    _, frontend, backend = cli_broker
    package = tmp_path / "mysvc"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "calc.proto").write_text(python_block("// mysvc/calc.proto", "proto"))
    (package / "service.py").write_text(python_block("# mysvc/service.py"))
    commands = [shlex.split(line.partition("#")[0])
                for line in python_block("python -m grpc_tools.protoc -I. --python_out=. mysvc/calc.proto"
                                         "   # writes mysvc/calc_pb2.py", "sh").splitlines()]
    protoc, worker_run, call = commands
    env = dict(os.environ, PYTHONPATH=str(REPO))  # zrpc from the checkout; mysvc from the cwd
    subprocess.run([sys.executable, *protoc[1:]], cwd=tmp_path, env=env, check=True, timeout=60)
    assert (package / "calc_pb2.py").exists()
    worker = spawn(*zrpc_cli(*worker_run[1:], "--broker", backend), cwd=tmp_path)
    worker.wait_line("zrpc worker ready:")
    wait_until_served(frontend, "calc.Calculator")

    def zrpc_call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(zrpc_cli(*args, "--broker", frontend), cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=30)
    result = zrpc_call(*call[1:])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"quotient": 0.25}
    result = zrpc_call("call", "calc.Calculator/Divide", '{"a": 1, "b": 0}')
    assert result.returncode == 10 + zrpc.StatusCode.INVALID_ARGUMENT
    assert result.stderr.splitlines() == ["error: INVALID_ARGUMENT: division by zero", "  field: b"]


def test_readme_and_scripts_cite_no_document_outside_the_repository():
    # DESIGN.md is a team-internal document: what it says is written out where it matters.
    for path in [REPO / "README.md", *sorted((REPO / "scripts").glob("*.py"))]:
        assert "DESIGN" not in path.read_text(), path


def test_readme_retry_and_circuit_breaker_example_builds_such_a_client():
    namespace: dict = {}
    exec(compile(python_block("from zrpc import CircuitBreaker, Client, RetryPolicy, StatusCode"),
                 "README.md", "exec"), namespace)
    client = namespace["client"]
    assert client._core.retry.max_attempts == 5
    assert client._core.retry.retryable_status_codes == {zrpc.StatusCode.UNAVAILABLE, zrpc.StatusCode.ABORTED}
    assert client._core.circuit_breaker == zrpc.CircuitBreaker(failure_threshold=5, reset_timeout=5.0)


class LeakyGreeter(Greeter):
    def SayHello(self, request, context):
        return {}[f"user-{request.name}"]  # a bug, not a deliberate error


def test_a_handler_exception_that_is_not_an_error_reaches_the_caller_as_internal_as_readme_says(caplog):
    with caplog.at_level(logging.CRITICAL, logger="zrpc"), serve(LeakyGreeter()) as client:
        greeter = client.stub(helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"])
        with pytest.raises(zrpc.Error) as raised:
            greeter.SayHello(helloworld_pb2.HelloRequest(name="42"))
    assert (raised.value.code.name, raised.value.message) == ("INTERNAL", "KeyError: 'user-42'")
    assert "`INTERNAL: KeyError: 'user-42'`" in README
