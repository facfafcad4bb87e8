#!/usr/bin/env bash
# The demo: precompute a teacher store with the embedded default teacher (SmolLM2-135M-Instruct) on the
# built-in offline corpus, then train a student from it on CPU. Sets up .venv first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/alm precompute stages/demo_precompute.yaml "$@"
.venv/bin/alm train stages/demo_train.yaml
