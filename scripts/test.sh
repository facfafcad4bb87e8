#!/usr/bin/env bash
# Run the default (fast) test tier, setting up .venv first if needed. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m slow` for the end-to-end tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
