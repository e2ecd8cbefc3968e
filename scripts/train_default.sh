#!/usr/bin/env bash
# Train the embedded default model on easy-VQA (CPU, about an hour) and ship it to blipkit/weights/default.
# Usage: scripts/train_default.sh [RUN_DIR]   (re-running continues an interrupted stage with --resume)
set -euo pipefail
RUN=${1:-runs/default}
resume_flag() { [ -f "$1/resume.pt" ] && echo --resume || true; }

[ -d "$RUN/stage1/final" ] || python -m blipkit.train stage1 --config configs/default_stage1.json \
    --out "$RUN/stage1" $(resume_flag "$RUN/stage1")
[ -d "$RUN/stage2/final-fp16" ] || python -m blipkit.train stage2 --config configs/default_stage2.json \
    --out "$RUN/stage2" --init_from="$RUN/stage1/final" $(resume_flag "$RUN/stage2")

mkdir -p blipkit/weights/default
cp "$RUN/stage2/final-fp16/config.json" "$RUN/stage2/final-fp16/bridge.safetensors" blipkit/weights/default/
echo "shipped: blipkit/weights/default ($(du -h blipkit/weights/default/bridge.safetensors | cut -f1))"
