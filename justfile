# Developer tasks. `just` comes with the dev extra (rust-just); every recipe sets up .venv first.
set shell := ["bash", "-euo", "pipefail", "-c"]
export HF_HUB_OFFLINE := "1"
export TOKENIZERS_PARALLELISM := "false"
venv := ".venv/bin"

default:
    @just --list

# create or refresh .venv (idempotent)
bootstrap:
    bash scripts/bootstrap.sh

# format the code
fmt: bootstrap
    {{venv}}/ruff format alm tests bench
    {{venv}}/ruff check --fix alm tests bench

# ruff + import-linter layer contracts
lint: bootstrap
    {{venv}}/ruff check alm tests bench
    {{venv}}/lint-imports

# basedpyright (standard mode on alm/, config in pyproject.toml)
type: bootstrap
    {{venv}}/basedpyright

# fast test tier (what CI runs)
test *ARGS: bootstrap
    bash scripts/test.sh {{ARGS}}

# CPU end-to-end tier (minutes)
test-slow *ARGS: bootstrap
    bash scripts/test.sh -m slow {{ARGS}}

# lint + type check + tests
check: lint type test

# tiny precompute + train on CPU with the embedded default teacher
demo *ARGS:
    bash scripts/demo.sh {{ARGS}}

# benchmarks (each prints one line per figure)
bench: bootstrap
    for f in bench/bench_*.py; do {{venv}}/python "$f"; done

# on a CUDA machine (one call, a few minutes): precompute FLOP rate and ALM-step MFU of ~1B models built from
# real configurations (bench/gpu_perf.py), then HF (and vLLM when installed) backends compared
gpu-check: bootstrap
    {{venv}}/python bench/gpu_perf.py
    {{venv}}/python bench/gpu_check.py
