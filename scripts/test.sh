#!/usr/bin/env bash
# The test command: makes .venv if missing, installs the package with its test extra, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
export HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest "$@"
