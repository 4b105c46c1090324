#!/usr/bin/env bash
# The README's first command: set up, then run the main job on the default model
# (SmolLM2-135M-Instruct): convert it, then answer a prompt through its chat template, streaming.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
lowbit=.venv/bin/lowbit
out=out/smollm2-135m-instruct
[ -f "$out/config.json" ] || $lowbit convert default "$out" --dtype fp16
$lowbit generate "$out" --prompt "${PROMPT:-What are three tips for writing clear code?}" --max-new-tokens 200
