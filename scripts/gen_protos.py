#!/usr/bin/env python3
"""Regenerate every committed ``*_pb2.py`` from its ``.proto`` (needs the ``dev`` extra).

Usage: ``python scripts/gen_protos.py`` from anywhere. ``--check`` regenerates into a temporary
directory and exits 1 when a committed file differs (the test suite runs this check).
"""
from __future__ import annotations

import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Paths are relative to ROOT, so a generated module imports its siblings as `zrpc.x_pb2`.
PROTOS = [
    "zrpc/wire.proto",
    "zrpc/broker_service.proto",
    "workers/echo/echo.proto",
    "workers/greeter/helloworld.proto",
    "workers/kv/kv.proto",
]


def _generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # imported late: only the dev extra has it

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in PROTOS:
        if not (ROOT / proto).exists():
            continue
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", proto]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def main(argv: list[str]) -> int:
    check = "--check" in argv
    if not check:
        _generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        _generate(pathlib.Path(tmp))
        stale = []
        for proto in PROTOS:
            if not (ROOT / proto).exists():
                continue
            name = proto.removesuffix(".proto") + "_pb2.py"
            fresh = (pathlib.Path(tmp) / name).read_text()
            committed = ROOT / name
            if not committed.exists() or committed.read_text() != fresh:
                stale.append(name)
        if stale:
            print("stale generated files (run scripts/gen_protos.py):", *stale, sep="\n  ")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
