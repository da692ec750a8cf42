#!/usr/bin/env bash
# The built-in model's one GPU training run (docs/builtin-model.md), on the GPU machine, from the repo
# root. Needs the CUDA build of builtin-model (BIN, default .gpu/builtin-model, or .xz of it), the
# prepared data (DATA, default .gpu/data: train.zip from scripts/builtin/prepare-data) and MiniLM
# (ENCODER, default .gpu/minilm, its model.safetensors possibly xz-compressed). A 30-step run first
# measures the seconds per step; the real run then takes as many steps as fit in BUDGET_S seconds (default 420) with a fixed seed, so that its cosine
# schedule ends where the run does. Then scores the model (builtin-model score) on the machine's CPU
# cores. Writes results.tar (run.json, logs, samples, score) and the weights in 15 MB parts (files coming
# back from the machine are limited in size and number) to $OUT.
set -euo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
BIN=${BIN:-.gpu/builtin-model}; DATA=${DATA:-.gpu/data}; ENCODER=${ENCODER:-.gpu/minilm}
BUDGET_S=${BUDGET_S:-420}; SEED=${SEED:-0}
# A further run from a model's weights (INIT: a model folder, e.g. engine/assets/builtin-emoji) and the
# trainer's batch, learning rate and warm-up (builtin-model train's defaults when unset).
extra=()
[ -n "${INIT:-}" ] && extra+=(--init "$INIT")
[ -n "${BATCH:-}" ] && extra+=(--batch "$BATCH")
[ -n "${LR:-}" ] && extra+=(--lr "$LR")
[ -n "${WARMUP:-}" ] && extra+=(--warmup "$WARMUP")
[ -x "$BIN" ] || { xz -dkf "$BIN.xz" && chmod +x "$BIN"; }
[ -f "$ENCODER/model.safetensors" ] || xz -dkf "$ENCODER/model.safetensors.xz"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
common=(--data "$DATA" --text-encoder "$ENCODER" --device cuda --seed "$SEED" "${extra[@]}")
"$BIN" train "${common[@]}" --out /tmp/calibrate --steps 30 --sample-every 0 2>&1 | tee "$OUT/calibrate.log"
per_step=$(python3 -c "import json; print(json.load(open('/tmp/calibrate/run.json'))['seconds']['per_step'])")
steps=$(python3 -c "print(max(100, int($BUDGET_S / $per_step) // 50 * 50))")
echo "calibration: $per_step s/step -> $steps steps" | tee -a "$OUT/calibrate.log"
"$BIN" train "${common[@]}" --out /tmp/run --steps "$steps" --time-limit-s $((BUDGET_S + 90)) 2>&1 | tee "$OUT/train.log"
cp /tmp/run/run.json "$OUT/"
# The score (docs/builtin-model.md) on this machine's CPU cores, when the held-out data came along (EVAL:
# index.json and images/ of data/builtin-emoji).
EVAL=${EVAL:-.gpu/eval}
if [ -f "$EVAL/index.json" ]; then
  "$BIN" score --model /tmp/run/model --data "$EVAL" --text-encoder "$ENCODER" --out "$OUT/score" \
    --train-captions "${TRAIN_CAPTIONS:-50}" 2>&1 | tee "$OUT/score.log" || echo "score failed (the weights still come back)"
fi
# At most 8 files come back: the weights in two parts, everything else in one tar.
(cd /tmp/run && cp -r samples model/model_index.json model/transformer/config.json model/scheduler "$OUT/")
split -b 15M -d /tmp/run/model/transformer/diffusion_pytorch_model.safetensors /tmp/weights.part
(cd "$OUT" && tar cf /tmp/results.tar ./* && rm -rf ./* && mv /tmp/results.tar /tmp/weights.part* .)
ls -la "$OUT"
