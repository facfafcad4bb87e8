#!/usr/bin/env bash
# The reproduction study of issue 14 (docs/reproduction.md): SmolLM2-135M-Instruct moved to bytes and to a locally
# trained BPE, trained with SFT, ALM, ALM+SFT (and ALM without debiasing for bytes) plus a learning-rate sweep, all
# from the same init, data, seed and steps; evaluated with `alm eval` in and out of domain. Long: run it alone on
# the machine. Rerunning continues where it stopped. Options: scripts/reproduce.py --help (--quick: a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/reproduce.py "$@"
