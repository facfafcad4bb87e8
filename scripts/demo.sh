#!/usr/bin/env bash
# The demo: precompute teacher stores with the embedded default teacher (SmolLM2-135M-Instruct) on the
# built-in offline corpus (docstrings of the Python standard library), then move the teacher to a pure byte
# tokenizer and train it from the store on CPU. Sets up .venv first if needed. Rerunning resumes/reuses
# what is finished; pass --fresh to start over (it replaces only runs/demo, which the demo owns).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
train_flags=(--resume)
if [[ "${1:-}" == "--fresh" ]]; then
  rm -rf runs/demo
  train_flags=()
fi
.venv/bin/alm precompute stages/demo_precompute.yaml
.venv/bin/alm precompute stages/demo_precompute_heldout.yaml
if [[ -f runs/demo/student_bytes/student/config.json ]]; then
  echo "demo: the student is already trained in runs/demo/student_bytes (use --fresh to start over)"
else
  .venv/bin/alm train stages/demo_train.yaml "${train_flags[@]}"
fi
