"""scripts/gen_protos.py as a user runs it: it says what it does and refuses what it does not."""
from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

SCRIPT = REPO / "scripts" / "gen_protos.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_help_says_it_regenerates_the_repositorys_own_protos():
    result = run(str(SCRIPT), "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "Regenerate this repository's own *_pb2.py files" in text
    assert "--check" in text and "python -m grpc_tools.protoc" in text


def test_an_unknown_argument_is_refused_and_nothing_is_regenerated():
    before = (REPO / "workers" / "echo" / "echo_pb2.py").stat().st_mtime_ns
    result = run(str(SCRIPT), "mysvc/calc.proto")
    assert result.returncode == 2
    assert "unrecognized arguments: mysvc/calc.proto" in result.stderr
    assert (REPO / "workers" / "echo" / "echo_pb2.py").stat().st_mtime_ns == before


def test_without_grpcio_tools_it_says_what_to_install():
    # None in sys.modules makes `import grpc_tools` fail, as it does where it is not installed.
    result = run("-c", "import runpy, sys; sys.modules['grpc_tools'] = None; "
                       f"sys.argv = ['gen_protos.py', '--check']; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    assert result.returncode == 1
    assert "pip install grpcio-tools" in result.stderr and "Traceback" not in result.stderr
