#!/usr/bin/env bash
# The test command: from a fresh clone, creates .venv if missing, installs the
# package with its dev extras (CPU torch pinned), then runs ruff and pytest in
# parallel workers (pytest-xdist, one per core, at most 8). Extra arguments go
# to pytest:
#
#   bash scripts/test.sh                  # everything (what CI runs)
#   bash scripts/test.sh -m "not slow"    # the fast tier, for every change
#   bash scripts/test.sh -n 0 -k parity   # one process, a selection
#
# Tests run on one CPU device; those marked devices(n) run in a child process
# with n (tests/conftest.py, docs/testing.md).
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
export HF_HUB_OFFLINE=1  # the tests never touch the network
# Compiling is mostly single-threaded, so one worker per core; worksteal keeps
# both busy to the end (the slowest tests take about a minute each).
cores=$(nproc 2>/dev/null || echo 2)
workers="${CN_JAX_TEST_WORKERS:-$(( cores < 8 ? cores : 8 ))}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist worksteal "$@"
