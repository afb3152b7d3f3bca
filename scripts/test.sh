#!/usr/bin/env bash
# The test command: from a fresh clone, creates .venv if missing, installs the
# package with its dev extras (CPU torch pinned), then runs ruff and pytest on
# 8 virtual CPU devices. Extra arguments go to pytest (e.g. -k parity).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.cn_jax_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing cn-jax[dev] into .venv"
  .venv/bin/pip install -q --upgrade pip
  # torch first and pinned: this version is a CPU wheel on disk here, while an
  # unpinned torch pulled in by another package would be a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  touch "$stamp"
fi

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "== pytest"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export HF_HUB_OFFLINE=1  # the tests never touch the network
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
