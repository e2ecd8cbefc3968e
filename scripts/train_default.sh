#!/usr/bin/env bash
# Train the embedded default model on easy-VQA (CPU, about an hour) and ship it to blipkit/weights/default.
#   1. stage 1 (ITC/ITM/ITG) on derived captions, Q-Former started from all-MiniLM-L6-v2
#   2. stage 2: caption/answer warm start, then the LM loss through frozen SmolLM2 (question-aware queries)
#   2b. augmented views held to the plain view's visual prompt (keep loss, teacher = stage 2, no LLM)
#   2c. the LM loss on augmented views and prompted captions ("a photo of" -> "a red circle"), held near 2b's
#       visual prompts by a lighter keep loss
#   3. image-text matching (ITM with hard negatives) jointly with the LM loss, held near 2c's visual prompts
#      (an ITM stage without the LM loss moved the colour answers of drawn scenes that sit near a boundary)
#   4. a short stage-1 pass that trains only the ITC projections and temperature on that Q-Former, so the
#      shipped checkpoint answers questions and also embeds / matches / classifies
# Usage: scripts/train_default.sh [RUN_DIR]   (re-running continues an interrupted stage with --resume)
#   BASE=DIR: continue a trained checkpoint instead (the shipped model's way since v2): no stage 1, and
#             stage 2 is configs/default_stage2_tune.json (no warm start) started from DIR
#   TUNE=0:   with BASE, no LM tune before 2b either: 2b starts from DIR and holds the augmented views to
#             DIR's own visual prompts on the plain views (the shipped model's way since v3)
#   SHIP=0:   leave blipkit/weights/default alone (check $RUN/stage1_heads/final-fp16 first)
#   ARGS="...": extra options for every stage, e.g. ARGS=--precision=fp32 on a CPU without bf16
set -euo pipefail
RUN=${1:-runs/default}
BASE=${BASE:-}
TUNE=${TUNE:-1}
SHIP=${SHIP:-1}
read -r -a extra <<< "${ARGS:-}"
resume_flag() { [ -f "$1/resume.json" ] && echo --resume || true; }
train() { python -m blipkit.train "$@" "${extra[@]}"; }

START=$RUN/stage2/final  # what stage 2b starts from and holds the augmented views to
if [ -n "$BASE" ] && [ "$TUNE" = 0 ]; then
    START=$BASE
elif [ -n "$BASE" ]; then
    [ -d "$RUN/stage2/final" ] || train stage2 --config configs/default_stage2_tune.json \
        --out "$RUN/stage2" --init_from="$BASE" $(resume_flag "$RUN/stage2")
else
    [ -d "$RUN/stage1/final" ] || train stage1 --config configs/default_stage1.json \
        --out "$RUN/stage1" $(resume_flag "$RUN/stage1")
    [ -d "$RUN/stage2/final" ] || train stage2 --config configs/default_stage2.json \
        --out "$RUN/stage2" --init_from="$RUN/stage1/final" $(resume_flag "$RUN/stage2")
fi
held() {  # held OUT CONFIG FROM [OPTION...]: a stage-2 run from FROM, its keep loss held to FROM
    local out=$1 config=$2 from=$3
    shift 3
    [ -d "$RUN/$out/final" ] || train stage2 --config "$config" --out "$RUN/$out" --init_from="$from" \
        --teacher="$from" "$@" $(resume_flag "$RUN/$out")
}
held stage2_views configs/default_stage2_views.json "$START"
# 2c twice, each round held to the one before; then 3 twice, the second round shorter and slower
held stage2_prompts configs/default_stage2_prompts.json "$RUN/stage2_views/final"
held stage2_prompts2 configs/default_stage2_prompts.json "$RUN/stage2_prompts/final"
held stage2_joint configs/default_stage2_joint.json "$RUN/stage2_prompts2/final"
held stage2_joint2 configs/default_stage2_joint.json "$RUN/stage2_joint/final" \
    --max_steps=120 --lr=0.0001 --warmup_steps=5
[ -d "$RUN/stage1_heads/final-fp16" ] || train stage1 \
    --config configs/default_stage1_heads.json --out "$RUN/stage1_heads" --init_from="$RUN/stage2_joint2/final" \
    $(resume_flag "$RUN/stage1_heads")

[ "$SHIP" = 1 ] || { echo "trained: $RUN/stage1_heads/final-fp16 (not shipped, SHIP=$SHIP)"; exit 0; }
mkdir -p blipkit/weights/default
cp "$RUN/stage1_heads/final-fp16/config.json" "$RUN/stage1_heads/final-fp16/bridge.safetensors" \
    blipkit/weights/default/
blipkit eval vqa-model --model blipkit/weights/default --dataset easy-vqa --limit 1000 --out "$RUN/vqa.json"
echo "shipped: blipkit/weights/default ($(du -h blipkit/weights/default/bridge.safetensors | cut -f1))"
