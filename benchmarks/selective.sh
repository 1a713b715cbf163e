#!/usr/bin/env bash
# SINAI-selective (seed 001) on the embedded CNN: docs/trained-defenses.md. Trains mnist-cnn-selective
# from mnist-cnn-at once (cached), then attacks its AT base, its exact network and the defense at
# r = 0.5, 0.8, 0.9, 0.99 and N:M 4:8, naive and with BPDA, and prints the report (table6, whitebox).
# AutoAttack (~8 min per 500 images on one core) runs on the AT base and r = 0.9 (naive and BPDA) only.
set -euo pipefail
OUT=${1:-runs/selective}
N=${N:-500}
EPS=${EPS:-0.2}
COMMON="--images $N --budget 1000 --eps $EPS --out $OUT"
sinai train mnist-cnn --selective
run() {  # model defense [aa]: the attacks of seed 001 Table 1 and the query/transfer attacks
  local model=$1 def=$2 aa=${3:-}
  sinai eval $COMMON --model "$model" --defense "$def" --attack pgd
  sinai eval $COMMON --model "$model" --defense "$def" --attack fgsm
  sinai eval $COMMON --model "$model" --defense "$def" --attack mifgsm
  sinai eval $COMMON --model "$model" --defense "$def" --attack square
  sinai eval $COMMON --model "$model" --defense "$def" --attack transfer \
    --attack-args source=mnist-cnn-at,attack=pgd
  if [ "$def" != none ]; then
    sinai eval $COMMON --model "$model" --defense "$def" --attack pgd --bpda
  fi
  if [ -n "$aa" ]; then
    sinai eval $COMMON --model "$model" --defense "$def" --attack autoattack
    if [ "$def" != none ]; then
      sinai eval $COMMON --model "$model" --defense "$def" --attack autoattack --bpda
    fi
  fi
}
run mnist-cnn-at none aa
run mnist-cnn-selective none
for R in 0.5 0.8 0.99; do
  run mnist-cnn-selective "SINAI-selective:ratio=$R"
done
run mnist-cnn-selective "SINAI-selective:ratio=0.9" aa
run mnist-cnn-selective "SINAI-selective:n=4,m=8"
sinai report $OUT
