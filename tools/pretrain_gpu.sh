#!/usr/bin/env bash
# Stage 0 on one GPU: pretrain the tiny CLIP and VAE side by side, then the UNet on them (and its
# token grounding continuations, configs/pretrain/unet_tiny_grounded*.yaml), with the
# configs under configs/pretrain/gpu/ (each run fits itself into its PRETRAIN.MAX_WALL_SECONDS).
# The shipped CLIP and VAE were first trained so on a lent GPU, the shipped UNet with the CPU
# configs (configs/pretrain/unet_tiny*.yaml; MODEL_ZOO.md); `make pretrain` does the same on
# whatever machine it runs on.
#
#   bash tools/pretrain_gpu.sh [LOG_DIR]
#
# Environment: PY (python, default python3), MODELS (export root, default models/), RUNS (the
# training folders, default output/pretrain_gpu/),
# GATES=1 to measure the gates after each export (default: skipped, measured later with
# `pretrain_net.py --eval-only`), EXTRA_OPTS (config opts added to every run, e.g. for a smoke test).
set -uo pipefail
LOG=${1:-output/pretrain_gpu}
PY=${PY:-python3}
MODELS=${MODELS:-models}
EXTRA_OPTS=${EXTRA_OPTS:-}
CFG=configs/pretrain/gpu
RUNS=${RUNS:-output/pretrain_gpu}  # training folders (checkpoints, metrics), one per run
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
t0=$(date +%s)
stamp() { echo "[pretrain_gpu $(($(date +%s) - t0)) s] $*"; }
GATE_FLAG=--skip-gates
[ "${GATES:-0}" = 1 ] && GATE_FLAG=
# shellcheck disable=SC2206
# one latent cache and one segment cache for the UNet and its continuations, inside this run's folder
COMMON=(PRETRAIN.UNET.CLIP "$MODELS/synthpsg-tiny-clip" PRETRAIN.UNET.VAE "$MODELS/synthpsg-tiny-sd"
  PRETRAIN.UNET.LATENT_CACHE "$RUNS/unet_latents.npy"
  PRETRAIN.UNET.SEGMENT_CACHE "$RUNS/unet_segments.npy" $EXTRA_OPTS)

run() {  # run TASK EXPORT_DIR: train, export, log to $LOG/TASK.log
  $PY projects/SPADE/pretrain_net.py --config-file "$CFG/$1_tiny.yaml" --resume $GATE_FLAG \
    PRETRAIN.EXPORT_DIR "$2" OUTPUT_DIR "$RUNS/$1" "${COMMON[@]}" >"$LOG/$1.log" 2>&1
}

stamp "building the caption corpus"
$PY - "$CFG/clip_tiny.yaml" "${COMMON[@]}" <<'EOF' || { stamp "corpus build failed"; exit 1; }
import argparse, sys
from spade.pretrain import setup_pretrain_cfg
from spade.pretrain.tasks import corpus_of
args = argparse.Namespace(config_file=sys.argv[1], opts=sys.argv[2:])
print(corpus_of(setup_pretrain_cfg(args, do_default_setup=False)).root, "ready")
EOF

stamp "CLIP and VAE"
run clip "$MODELS/synthpsg-tiny-clip" &
clip=$!
run vae "$MODELS/synthpsg-tiny-sd" &
vae=$!
wait $clip; rc_clip=$?
if [ $rc_clip -eq 0 ]; then  # the region fine-tune (text tower frozen) of the CLIP just trained
  stamp "CLIP region fine-tune"
  $PY projects/SPADE/pretrain_net.py --config-file configs/pretrain/clip_tiny_region.yaml --resume \
    $GATE_FLAG MODEL.WEIGHTS "$RUNS/clip/model_final.safetensors" \
    OUTPUT_DIR "$RUNS/clip_region" PRETRAIN.NUM_WORKERS 12 \
    PRETRAIN.EXPORT_DIR "$MODELS/synthpsg-tiny-clip" "${COMMON[@]}" >"$LOG/clip_region.log" 2>&1
  rc_clip=$?
fi
wait $vae; rc_vae=$?
if [ $rc_vae -eq 0 ]; then  # the decoder-only fine-tune (encoder frozen) of the VAE just trained
  stamp "VAE decoder fine-tune"
  $PY projects/SPADE/pretrain_net.py --config-file configs/pretrain/vae_tiny_decoder.yaml --resume \
    $GATE_FLAG MODEL.WEIGHTS "$RUNS/vae/model_final.safetensors" OUTPUT_DIR "$RUNS/vae_decoder" \
    SOLVER.IMS_PER_BATCH 128 PRETRAIN.EXPORT_DIR "$MODELS/synthpsg-tiny-sd" "${COMMON[@]}" \
    >"$LOG/vae_decoder.log" 2>&1
  rc_vae=$?
fi
stamp "CLIP rc=$rc_clip, VAE rc=$rc_vae"
tail -n 3 "$LOG/clip.log" "$LOG/vae.log"
[ $rc_clip -eq 0 ] && [ $rc_vae -eq 0 ] || exit 1

continue_unet() {  # continue_unet NAME FROM SECONDS: configs/pretrain/unet_tiny_NAME.yaml from run FROM
  $PY projects/SPADE/pretrain_net.py --config-file "configs/pretrain/unet_tiny_$1.yaml" \
    --resume $GATE_FLAG MODEL.WEIGHTS "$RUNS/$2/model_final.safetensors" \
    OUTPUT_DIR "$RUNS/unet_$1" SOLVER.IMS_PER_BATCH 128 PRETRAIN.MAX_WALL_SECONDS "$3" \
    PRETRAIN.EXPORT_DIR "$MODELS/synthpsg-tiny-sd" "${COMMON[@]}" >"$LOG/unet_$1.log" 2>&1
}

stamp "UNet"
run unet "$MODELS/synthpsg-tiny-sd"; rc_unet=$?
# the token grounding continuations of the UNet just trained, the condensed chain as `make
# pretrain` runs it on the CPU (the token loss; then 4x its weight at half the LR, half of the
# captions in the stage-1 teacher form and the pixel loss at 10x over noun phrases, all at once)
for step in "grounded_condensed unet 120.0" "grounded_condensed2 unet_grounded_condensed 160.0"; do
  [ $rc_unet -eq 0 ] || break
  set -- $step  # NAME FROM SECONDS
  stamp "UNet token grounding (unet_tiny_$1.yaml)"; continue_unet "$@"; rc_unet=$?
done
stamp "UNet rc=$rc_unet"
logs=("$LOG/unet.log")  # and the grounding runs', so a failure there shows too
for f in "$LOG"/unet_grounded*.log; do [ -f "$f" ] && logs+=("$f"); done
tail -n 3 "${logs[@]}"
exit $rc_unet
