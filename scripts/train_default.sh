#!/usr/bin/env bash
# Train the embedded default model on easy-VQA (CPU, about an hour) and ship it to blipkit/weights/default.
#   1. stage 1 (ITC/ITM/ITG) on derived captions, Q-Former started from all-MiniLM-L6-v2
#   2. stage 2: caption/answer warm start, then the LM loss through frozen SmolLM2 (question-aware queries)
#   2b. augmented views held to the plain view's visual prompt (keep loss, teacher = stage 2, no LLM)
#   3. image-text matching (ITM with hard negatives) on the stage-2 Q-Former, held to stage 2's visual
#      prompts by the keep loss (no LLM forward), so the answers stay as they were
#   4. a short stage-1 pass that trains only the ITC projections and temperature on that Q-Former, so the
#      shipped checkpoint answers questions and also embeds / matches / classifies
# Usage: scripts/train_default.sh [RUN_DIR]   (re-running continues an interrupted stage with --resume)
#   BASE=DIR: continue a trained checkpoint instead (the shipped model's way since v2): no stage 1, and
#             stage 2 is configs/default_stage2_tune.json (no warm start) started from DIR
#   SHIP=0:   leave blipkit/weights/default alone (check $RUN/stage1_heads/final-fp16 first)
set -euo pipefail
RUN=${1:-runs/default}
BASE=${BASE:-}
SHIP=${SHIP:-1}
resume_flag() { [ -f "$1/resume.json" ] && echo --resume || true; }

if [ -n "$BASE" ]; then
    [ -d "$RUN/stage2/final" ] || python -m blipkit.train stage2 --config configs/default_stage2_tune.json \
        --out "$RUN/stage2" --init_from="$BASE" $(resume_flag "$RUN/stage2")
else
    [ -d "$RUN/stage1/final" ] || python -m blipkit.train stage1 --config configs/default_stage1.json \
        --out "$RUN/stage1" $(resume_flag "$RUN/stage1")
    [ -d "$RUN/stage2/final" ] || python -m blipkit.train stage2 --config configs/default_stage2.json \
        --out "$RUN/stage2" --init_from="$RUN/stage1/final" $(resume_flag "$RUN/stage2")
fi
[ -d "$RUN/stage2_views/final" ] || python -m blipkit.train stage2 --config configs/default_stage2_views.json \
    --out "$RUN/stage2_views" --init_from="$RUN/stage2/final" --teacher="$RUN/stage2/final" \
    $(resume_flag "$RUN/stage2_views")
[ -d "$RUN/stage2_itm/final" ] || python -m blipkit.train stage2 --config configs/default_stage2_itm.json \
    --out "$RUN/stage2_itm" --init_from="$RUN/stage2_views/final" --teacher="$RUN/stage2_views/final" \
    $(resume_flag "$RUN/stage2_itm")
[ -d "$RUN/stage1_heads/final-fp16" ] || python -m blipkit.train stage1 \
    --config configs/default_stage1_heads.json --out "$RUN/stage1_heads" --init_from="$RUN/stage2_itm/final" \
    $(resume_flag "$RUN/stage1_heads")

[ "$SHIP" = 1 ] || { echo "trained: $RUN/stage1_heads/final-fp16 (not shipped, SHIP=$SHIP)"; exit 0; }
mkdir -p blipkit/weights/default
cp "$RUN/stage1_heads/final-fp16/config.json" "$RUN/stage1_heads/final-fp16/bridge.safetensors" \
    blipkit/weights/default/
blipkit eval vqa-model --model blipkit/weights/default --dataset easy-vqa --limit 1000 --out "$RUN/vqa.json"
echo "shipped: blipkit/weights/default ($(du -h blipkit/weights/default/bridge.safetensors | cut -f1))"
