#!/usr/bin/env bash
# The README's main command: installs zrpc in a virtualenv, then starts a broker and echo
# workers on this machine and measures them with the load generator: 20,000 calls, or 10 s if
# that comes first (at one call in flight, say). Extra arguments go to the load generator
# (e.g. `scripts/demo.sh --concurrency 64`, `scripts/demo.sh --duration 30`); a --duration or
# --requests given replaces both limits (a tester's `--duration 30` ended at 20,000 calls).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv . demo
limits=(--requests 20000 --duration 10)
for arg in "$@"; do
    case "$arg" in
        --duration|--duration=*|-d|-d?*|--requests|--requests=*|-n|-n?*) limits=() ;;
    esac
done
exec .venv/bin/python scripts/loadtest.py --spawn 2 --concurrency 32 ${limits[@]+"${limits[@]}"} --payload-size 100 "$@"
