"""The public surface is what zrpc/__init__.py exports; generated code matches its .proto."""
from __future__ import annotations

import subprocess
import sys

import zrpc

from .conftest import REPO


def test_public_api_is_pinned_and_sorted():
    assert zrpc.__all__ == sorted(zrpc.__all__)
    assert zrpc.__all__ == [
        "AsyncClient", "Broker", "BrokerConfig", "CircuitBreaker", "Client", "Context", "Error",
        "NotABrokerBackend", "RetryPolicy", "Service", "StatusCode", "Worker", "nonblocking", "tune_allocator",
    ]
    for name in zrpc.__all__:
        assert getattr(zrpc, name).__module__.startswith("zrpc._"), name


def test_generated_protobuf_modules_match_their_proto_files():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
