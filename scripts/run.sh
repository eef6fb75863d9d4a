#!/usr/bin/env bash
# Install the project into .venv and run the main job on the embedded default:
# an offline replay of a seeded synthetic click log (pass --data PATH for a real log).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/adengine replay "$@"
