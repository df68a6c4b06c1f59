# Sourced by demo.sh and test.sh: make .venv and install this checkout into it (editable, with
# the extras given), unless that install is there already. A stamp records what was installed
# and from which setup.cfg and pyproject.toml, so a second run, or `scripts/demo.sh --help`,
# starts at once instead of after pip's 8 s; changed dependencies install again.
ensure_venv() {
    local spec="$1" stamp=".venv/.zrpc-install-${2}" want
    want="$spec $(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1) $(python3 -V 2>&1)"
    if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
            && .venv/bin/python -c "import zrpc" 2>/dev/null; then
        return
    fi
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # setuptools warns on every editable install of a flat layout (harmless here): keep the output readable.
    PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e "$spec"
    printf '%s\n' "$want" > "$stamp"
}
