# Sourced by demo.sh and test.sh: make .venv and install this checkout into it (editable, with
# the extras given), unless that install is there already. A stamp records what was installed
# and from which setup.cfg and pyproject.toml, so a second run, or `scripts/demo.sh --help`,
# starts at once instead of after pip's 8 s; changed dependencies install again.
#   ensure_venv SPEC NAME [MODULE...]   MODULE: what else the install must make importable
ensure_venv() {
    local spec="$1" stamp=".venv/.zrpc-install-${2}" want imports="" module
    shift 2
    for module in "$@"; do imports="$imports; import $module"; done
    # python3, not sha256sum: that is not on every system (macOS has shasum).
    want="$spec $(python3 -c 'import hashlib, sys
print(hashlib.sha256(open("setup.cfg", "rb").read() + open("pyproject.toml", "rb").read()).hexdigest(),
      sys.version.split()[0])')"
    # -P: not the checkout's zrpc/ from the current directory; the installed distribution.
    if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
            && .venv/bin/python -P -c "import importlib.metadata; importlib.metadata.version('zrpc-broker')$imports" \
                2>/dev/null; then
        return
    fi
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # setuptools warns on every editable install of a flat layout (harmless here): keep the output readable.
    PYTHONWARNINGS=ignore::UserWarning .venv/bin/python -m pip install -q -e "$spec"
    printf '%s\n' "$want" > "$stamp"
}
