#!/usr/bin/env bash
# The accuracy table on the device machine (see benchmarks/README.md).
#
# The default model's GGUF (98 MB) is larger than what one device call may carry (64 MiB), so it
# travels in two parts: `part0` on one call (copied to $MODEL_DIR, which lives while the machine
# is held), `part1` on the next, which joins them and runs the table. Run from the repo root:
#   call 1: bash benchmarks/device_accuracy.sh stage .devcarry_a/model.part0
#   call 2: bash benchmarks/device_accuracy.sh run .devcarry_b/model.part1 [accuracy_table.py options]
set -euo pipefail
MODEL_DIR=/root/lowbit-model
mode=$1 part=$2
shift 2
mkdir -p "$MODEL_DIR"
if [ "$mode" = stage ]; then
    cp "$part" "$MODEL_DIR/part0"
    ls -la "$MODEL_DIR"
    exit 0
fi
cat "$MODEL_DIR/part0" "$part" > "$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256sum "$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
out=${OUT:-/tmp/out}/accuracy
mkdir -p "$out"
python3 benchmarks/accuracy_table.py --model "$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" --device cuda \
    --out "$out" --state "$out/state.json" --work-dir /tmp/accuracy-work "$@" 2>&1 | tee "$out/log.txt" \
    | grep -v "layer [0-9]*/30"
