#!/usr/bin/env bash
# Install the project with its dev extra into .venv and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# tests/test_prometheus_scrape.py runs the real Prometheus server (Debian's package). On a
# machine without it, install it; outside CI a failed install only warns (the test skips).
install_prometheus() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else return 1; fi
    fi
    command -v apt-get >/dev/null || return 1
    # Where systemd runs, the package also starts prometheus.service on :9090; the tests
    # run their own server on a free port and leave it alone.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
}
if [ ! -x /usr/bin/prometheus ]; then
    if ! install_prometheus; then
        if [ "${CI:-}" = "true" ]; then
            echo "error: could not install Debian's prometheus (apt-get, root or sudo -n needed)" >&2
            exit 1
        fi
        echo "warning: /usr/bin/prometheus missing and not installable here:" \
            "the Prometheus scrape test will be skipped" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
