#!/usr/bin/env bash
# MFDV-SNN (seed 004) on the embedded CNN: docs/trained-defenses.md. Trains mnist-cnn-mfdv at lambda1
# 1e-3 (about 1% clean drop with one noisy pass), 3e-3 (about 2%) and 0 (the paper's ablation), then
# attacks it with one noisy pass per query and with the paper's mean of 15 passes (MFDV:mc=15), next to
# FND on mnist-cnn calibrated to the same one-pass drops, and prints the report.
set -euo pipefail
OUT=${1:-runs/mfdv}
N=${N:-500}
N_AA=${N_AA:-200}  # AutoAttack-rand (APGD-CE + APGD-DLR, EOT 20): on fewer images, one-pass MFDV and FND only
COMMON="--budget 1000 --out $OUT"
sinai train mnist-cnn --mfdv
sinai train mnist-cnn --mfdv --lambda1 0.003
sinai train mnist-cnn --mfdv --lambda1 0
# FND's stds: `sinai calibrate --model mnist-cnn --defense FND --drop 0.009,0.021` (500 images, M = 3)
# gave 0.9375 (0.93% drop) and 1.406 (2.13%): MFDV's one-pass drops at lambda1 1e-3 and 3e-3.
run() {  # model defense [aa]
  local model=$1 def=$2 aa=${3:-}
  sinai eval $COMMON --images $N --model "$model" --defense "$def" --attack pgd
  sinai eval $COMMON --images $N --model "$model" --defense "$def" --attack fgsm
  sinai eval $COMMON --images $N --model "$model" --defense "$def" --attack transfer \
    --attack-args source=base,attack=pgd
  if [ "$def" != none ]; then
    sinai eval $COMMON --images $N --model "$model" --defense "$def" --attack eotpgd \
      --attack-args eot_iter=80
  fi
  sinai eval $COMMON --images $N --model "$model" --defense "$def" --attack square
  if [ -n "$aa" ]; then
    sinai eval $COMMON --images $N_AA --model "$model" --defense "$def" --attack autoattack \
      --attack-args version=rand
  fi
}
run mnist-cnn none
run mnist-cnn-mfdv MFDV aa
run mnist-cnn FND:std=0.9375 aa
run mnist-cnn-mfdv MFDV:mc=15
run mnist-cnn-mfdv:lambda1=0.003 MFDV
run mnist-cnn FND:std=1.406
run mnist-cnn-mfdv:lambda1=0.003 MFDV:mc=15
run mnist-cnn-mfdv:lambda1=0 MFDV
sinai report $OUT
