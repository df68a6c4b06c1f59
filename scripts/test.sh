#!/usr/bin/env bash
# The README's test command: installs everything the tests need on a fresh machine, then runs
# the whole suite. Extra arguments go to pytest (e.g. `scripts/test.sh -k broker -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages for tests that need real system tools (network namespaces, nftables, Prometheus).
need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)  # tests/test_prometheus.py
if [ ${#need_apt[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

source scripts/_venv.sh
ensure_venv '.[test]' test pytest
exec .venv/bin/python -m pytest "$@"
