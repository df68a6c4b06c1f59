#!/usr/bin/env bash
# The README's main command: installs zrpc in a virtualenv, then starts a broker and echo
# workers on this machine and measures them with the load generator: 20,000 calls, or 10 s if
# that comes first (at one call in flight, say). Extra arguments go to the load generator
# (e.g. `scripts/demo.sh --concurrency 64`, `scripts/demo.sh --duration 30`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv . demo
exec .venv/bin/python scripts/loadtest.py --spawn 2 --concurrency 32 --requests 20000 --duration 10 --payload-size 100 "$@"
