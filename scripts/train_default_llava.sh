#!/usr/bin/env bash
# Train the embedded LLaVA-style default (default-llava) on easy-VQA (CPU) and ship it to
# blipkit/weights/default-llava: DINOv2-S/14 patches (cached features, all 64 of the 8x8 grid) -> 2-layer GELU
# MLP -> frozen SmolLM2-135M-Instruct in its chat template. Only the projector trains (0.55 M parameters).
#   1. llava1: feature alignment, the projector on caption requests ("Describe the image briefly." -> caption)
#   2. llava2: easy-VQA questions, "Describe the image." -> a sentence, multi-turn chats that refer back
# Usage: scripts/train_default_llava.sh [RUN_DIR]   (re-running continues an interrupted stage with --resume)
#   THREADS=N: torch threads (default: the configs' 2)
#   STAGE1_STEPS / STAGE2_STEPS: override the configs' max_steps (a shorter budget)
#   BASE=DIR:  continue a trained projector instead (how the shipped one was made since v2): no stage 1, and
#              stage 2 is configs/default_llava_stage2_tune.json started from DIR
#   SHIP=0:    leave blipkit/weights/default-llava alone (check $RUN/stage2/final-fp16 first)
#   ARGS="...": extra options for every stage, e.g. ARGS=--precision=fp32 on a CPU without bf16
set -euo pipefail
RUN=${1:-runs/default-llava}
BASE=${BASE:-}
SHIP=${SHIP:-1}
read -r -a extra <<< "${ARGS:-}"
[ -n "${THREADS:-}" ] && extra+=("--threads=$THREADS")
resume_flag() { [ -f "$1/resume.json" ] && echo --resume || true; }
s1=(); [ -n "${STAGE1_STEPS:-}" ] && s1+=("--max_steps=$STAGE1_STEPS")
s2=(); [ -n "${STAGE2_STEPS:-}" ] && s2+=("--max_steps=$STAGE2_STEPS")

mkdir -p "$RUN"
stamp() { echo "$1 $(date -u +%s)" >> "$RUN/times.txt"; }   # wall-clock per stage, for the report
if [ -n "$BASE" ]; then
    if [ ! -d "$RUN/stage2/final-fp16" ]; then
        stamp stage2-start
        python -m blipkit.train llava2 --config configs/default_llava_stage2_tune.json \
            --out "$RUN/stage2" --init_from="$BASE" "${extra[@]}" "${s2[@]}" $(resume_flag "$RUN/stage2")
        stamp stage2-end
    fi
fi
if [ -z "$BASE" ] && [ ! -d "$RUN/stage1/final" ]; then
    stamp stage1-start
    python -m blipkit.train llava1 --config configs/default_llava_stage1.json \
        --out "$RUN/stage1" "${extra[@]}" "${s1[@]}" $(resume_flag "$RUN/stage1")
    stamp stage1-end
fi
if [ -z "$BASE" ] && [ ! -d "$RUN/stage2/final-fp16" ]; then
    stamp stage2-start
    python -m blipkit.train llava2 --config configs/default_llava_stage2.json \
        --out "$RUN/stage2" --init_from="$RUN/stage1/final" "${extra[@]}" "${s2[@]}" $(resume_flag "$RUN/stage2")
    stamp stage2-end
fi

[ "$SHIP" = 1 ] || { echo "trained: $RUN/stage2/final-fp16 (not shipped, SHIP=$SHIP)"; exit 0; }
mkdir -p blipkit/weights/default-llava
cp "$RUN/stage2/final-fp16/config.json" "$RUN/stage2/final-fp16/projector.safetensors" \
    blipkit/weights/default-llava/
blipkit eval vqa-model --model default-llava --dataset easy-vqa --limit 1000 --out "$RUN/vqa.json"
echo "shipped: blipkit/weights/default-llava ($(du -h blipkit/weights/default-llava/projector.safetensors | cut -f1))"
