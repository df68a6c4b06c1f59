#!/usr/bin/env python3
"""Regenerate the repository's own committed ``*_pb2.py`` from their ``.proto`` files.

Usage: ``python scripts/gen_protos.py [--check]`` from anywhere. It needs grpcio-tools (the
``dev`` extra). ``--check`` regenerates into a temporary directory and exits 1 when a
committed file differs (the test suite runs this check). For your own service's ``.proto``,
run protoc yourself (README, "Your own service").
"""
from __future__ import annotations

import argparse
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
    try:
        from grpc_tools import protoc  # imported late: only the dev extra has it
    except ImportError:
        raise SystemExit("gen_protos.py needs grpcio-tools: pip install grpcio-tools "
                         "(or the dev extra, pip install -e '.[dev]')") from None

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    for proto in PROTOS:
        if not (ROOT / proto).exists():
            continue
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", proto]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gen_protos.py",
        description="Regenerate this repository's own *_pb2.py files (" + ", ".join(PROTOS) + ") "
                    "with grpcio-tools' protoc. It takes no .proto of yours: for those run "
                    "`python -m grpc_tools.protoc -I. --python_out=. mysvc/calc.proto` "
                    "(see README, 'Your own service').")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and exit 1 if a committed file differs")
    # Unknown arguments (a .proto path, say) are refused rather than ignored while it regenerates.
    check = parser.parse_args(argv).check
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
