"""zrpc.tune_allocator: payload-sized blocks are reused from the C heap instead of being mapped,
faulted in and unmapped for each payload (glibc; see zrpc/_allocator.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zrpc import tune_allocator

from .conftest import wait_for, zrpc_cli

pytestmark = pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"),
                                reason="the settings are glibc's")

# A few payloads in flight, then all freed, round after round: the pattern of a broker or
# worker moving megabyte payloads. Prints the page faults per MiB allocated.
_PATTERN = """
import resource, sys
import zrpc
if sys.argv[1] == "tuned":
    assert zrpc.tune_allocator()
MIB = 1 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    held = [b"x" * MIB for _ in range(4)]
    del held
before = faults()
for _ in range(50):
    held = [b"x" * MIB for _ in range(4)]
    del held
print((faults() - before) / 200)
"""


def _faults_per_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


def test_megabyte_payloads_reuse_heap_pages_once_tuned():
    plain, tuned = _faults_per_mib("plain"), _faults_per_mib("tuned")
    assert plain > 64  # glibc's own settings: most of the 256 pages of each MiB are new
    assert tuned < 4


@pytest.mark.parametrize("name, value", [
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("MALLOC_MMAP_THRESHOLD_", "131072"),
    ("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.mmap_threshold=131072"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
])
def test_thresholds_the_operator_gave_glibc_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert tune_allocator() is False


@pytest.mark.parametrize("command", [
    ("broker", "start", "--frontend", "ipc://{d}/f", "--backend", "ipc://{d}/b"),
    ("worker", "run", "workers.echo:Echo", "--broker", "ipc://{d}/b"),
])
def test_the_broker_and_worker_commands_tune_the_allocator(spawn, ipc_dir, command):
    process = spawn(*zrpc_cli(*(part.format(d=ipc_dir) for part in command), "--log-level", "DEBUG"))
    process.wait_line("zrpc ")
    wait_for(lambda: any("allocator: blocks under 16 MiB stay in the heap" in line for line in process.errors),
             10.0, message="the allocator's debug line")
    assert process.stop() == 0
