#!/usr/bin/env bash
# The GPU run of `sinai bench` (defense overhead and attack engine) for a machine with CUDA: the
# embedded models, resnet18 / vit_tiny and the papers' full-size ViT-B/16 and ResNet-50 (random
# weights, batch 16), the defenses in float32, bf16 autocast and channels-last. One JSON file per setting in $OUT
# (default runs/gpu); the tables go to stdout. About 5-8 minutes on one H200.
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
MODELS=mnist-cnn@256,mnist-vit@256,torchvision:resnet18@16,timm:vit_tiny_patch16_224@16
MODELS=$MODELS,timm:vit_base_patch16_224@16,timm:resnet50@16
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
for setting in "" "--bf16" "--channels-last" "--bf16 --channels-last"; do
  tag=$(echo "${setting:-fp32}" | tr -d ' -')
  echo "== bench defenses $setting"
  # shellcheck disable=SC2086
  sinai bench defenses --device cuda --models "$MODELS" $setting --json-out "$OUT/defenses-$tag.json"
done
echo "== bench attacks"
sinai bench attacks --device cuda --large --json-out "$OUT/attacks.json"
