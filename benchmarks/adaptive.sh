#!/usr/bin/env bash
# The adaptive evaluation of docs/adaptive-evaluation.md: every noise preset at ~1% drop on mnist-cnn.
set -euo pipefail
OUT=${1:-runs/adaptive}
COMMON="--model mnist-cnn --images 100 --budget 1000 --vote-rule fixed --out $OUT"
for DEF in none RND:std=0.0645 FND:std=0.938 "SINAI:relu.std=0.435907,relu.ratio=0.423655"; do
  sinai eval $COMMON --defense "$DEF" --attack square
  sinai eval $COMMON --defense "$DEF" --attack fgsm
  sinai eval $COMMON --defense "$DEF" --attack pgd
  sinai eval $COMMON --defense "$DEF" --attack pgd --eot 10
  sinai eval $COMMON --defense "$DEF" --attack eotpgd
  sinai eval $COMMON --defense "$DEF" --attack transfer --attack-args source=base,attack=square
  sinai eval $COMMON --defense "$DEF" --attack transfer --attack-args source=mnist-cnn-surrogate,attack=pgd
done
sinai report $OUT
