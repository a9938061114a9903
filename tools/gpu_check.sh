#!/usr/bin/env bash
# The GPU check of docs/performance.md: one table (printed) and a JSON file, about 8 minutes on
# one H200. Measures eager vs SDPA attention vs torch.compile, gradient checkpointing, batches of
# 8/16/32 crops (crops/s, peak memory, loss against eager), the largest batch for 80 and 141 GB,
# and the pre-training loop's crops/s and data wait with 0/4/8 loader workers.
#
#   tools/gpu_check.sh                        # writes gpu_check.json
#   tools/gpu_check.sh --out /tmp/h200.json   # any tools/gpu_check.py option
#   tools/gpu_check.sh --smoke                # CPU, tiny preset: checks the script, not the GPU
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ -n "${PYTHON:-}" ]]; then
    exec "$PYTHON" tools/gpu_check.py "$@"
fi
exec uv run --locked python tools/gpu_check.py "$@"
