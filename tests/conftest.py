"""Fixtures shared by the suite: endpoints, processes started by PID, bounded waits."""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
             message: str = "condition") -> object:
    """Poll ``condition`` until it returns a truthy value; fail loudly after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        threading.Event().wait(interval)  # a bounded poll interval, not synchronisation



def wait_until_served(frontend: str, service: str, timeout: float = 15.0) -> None:
    """Wait until the broker at ``frontend`` lists a live worker for ``service`` (asked as a
    client would, through zrpc.Broker/ListServices)."""
    import zrpc
    from zrpc import broker_service_pb2

    with zrpc.Client(frontend, timeout=5.0) as client:
        def served() -> bool:
            raw = client.call("zrpc.Broker", "ListServices", b"", timeout=2.0)
            return any(s.name == service and s.live_workers
                       for s in broker_service_pb2.ListServicesReply.FromString(raw).services)
        wait_for(served, timeout, message=f"a worker of {service} to register")

@pytest.fixture
def ipc_dir():
    """A short temporary directory for ipc:// endpoints (socket paths are limited to ~107 bytes)."""
    path = tempfile.mkdtemp(prefix="zrpc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def endpoints(ipc_dir):
    """A fresh (frontend, backend) pair of ipc:// endpoints."""
    return f"ipc://{ipc_dir}/frontend", f"ipc://{ipc_dir}/backend"


class Process:
    """A child process whose stdout lines are collected by a thread, so tests can wait on them."""

    def __init__(self, args: list[str], cwd: pathlib.Path = REPO, env: dict | None = None):
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
        full_env.update(env or {})
        self.args = args
        self.popen = subprocess.Popen(args, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.popen.stdout, self.lines), daemon=True),
                         threading.Thread(target=self._read, args=(self.popen.stderr, self.errors), daemon=True)]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_line(self, prefix: str, timeout: float = 15.0) -> str:
        """The first stdout line starting with ``prefix`` (fails if the process exits first)."""
        def found():
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.args} exited with {self.popen.returncode} before printing "
                                     f"{prefix!r}; stderr:\n" + "\n".join(self.errors[-30:]))
            return None
        return wait_for(found, timeout, message=f"{prefix!r} from {self.args}")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL past ``timeout``; returns the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for reader in self._readers:
            reader.join(5)
        return self.popen.returncode


@pytest.fixture
def spawn():
    """Start processes; every one is stopped by its PID when the test ends."""
    started: list[Process] = []

    def start(*args: str, **kwargs) -> Process:
        process = Process(list(args), **kwargs)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


def zrpc_cli(*args: str) -> list[str]:
    """The argv that runs the zrpc CLI with this interpreter (no console script needed)."""
    return [sys.executable, "-m", "zrpc", *args]


@pytest.fixture
def cli_broker(spawn, endpoints):
    """A `zrpc broker start` process on ipc endpoints; returns (process, frontend, backend)."""
    frontend, backend = endpoints
    process = spawn(*zrpc_cli("broker", "start", "--frontend", frontend, "--backend", backend,
                              "--unknown-service-grace", "0"))
    process.wait_line("zrpc broker ready")
    return process, frontend, backend
