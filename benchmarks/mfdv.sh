#!/usr/bin/env bash
# MFDV-SNN (seed 004) on the embedded CNN: docs/trained-defenses.md. Trains mnist-cnn-mfdv at lambda1
# 1e-3 (about 1% clean drop with one noisy pass), 3e-3 (about 2%) and 0 (the paper's ablation), then
# attacks it with one noisy pass per query and with the paper's mean of 15 passes (MFDV:mc=15), next to
# FND on mnist-cnn calibrated to the same one-pass drops, and prints the report.
set -euo pipefail
OUT=${1:-runs/mfdv}
N=${N:-500}
N_AA=${N_AA:-100}  # AutoAttack-rand (APGD-CE + APGD-DLR, EOT 20): on fewer images, one-pass MFDV and FND only
N_SMALL=${N_SMALL:-100}  # the 15-pass rule's EOT and Square, and EOT-PGD-80 on the ~2% rows
COMMON="--budget 1000 --out $OUT"
sinai train mnist-cnn --mfdv
sinai train mnist-cnn --mfdv --lambda1 0.003
sinai train mnist-cnn --mfdv --lambda1 0
# FND's stds: `sinai calibrate --model mnist-cnn --defense FND --drop 0.009,0.021` (500 images, M = 3)
# gave 0.9375 (0.93% drop) and 1.406 (2.13%): MFDV's one-pass drops at lambda1 1e-3 and 3e-3.
run() {  # images model defense attacks...: each attack (aa = AutoAttack-rand on N_AA images)
  local n=$1 model=$2 def=$3
  shift 3
  for attack in "$@"; do
    case $attack in
      eot80) args=(--attack eotpgd --attack-args eot_iter=80) ;;
      eot6) args=(--attack eotpgd --attack-args eot_iter=6) ;;  # x 15 passes of mc=15: 90 per gradient
      transfer) args=(--attack transfer --attack-args source=base,attack=pgd) ;;
      aa) args=(--attack autoattack --attack-args version=rand) ;;
      *) args=(--attack "$attack") ;;
    esac
    local images=$n
    [ "$attack" = aa ] && images=$N_AA
    sinai eval $COMMON --images $images --model "$model" --defense "$def" "${args[@]}"
  done
}
# In order of what the comparison needs first. EOT-PGD-80 costs ~2 s per image on one shared core (1600
# forward-backward passes of 500 images); the paper's rule, the mean of 15 noisy passes per query, costs
# 15x per forward: EOT-PGD over 6 samples of it (90 noisy passes per gradient) and Square on N_SMALL.
run $N mnist-cnn none pgd fgsm transfer square
run $N mnist-cnn-mfdv MFDV pgd fgsm transfer eot80 square
run $N mnist-cnn FND:std=0.9375 pgd fgsm transfer square
run $N mnist-cnn-mfdv MFDV:mc=15 pgd fgsm transfer
run $N_SMALL mnist-cnn-mfdv MFDV:mc=15 eot6 square
run $N mnist-cnn-mfdv:lambda1=0.003 MFDV pgd fgsm transfer square
run $N mnist-cnn FND:std=1.406 pgd fgsm transfer square
run $N mnist-cnn-mfdv:lambda1=0 MFDV pgd fgsm square
run $N mnist-cnn-mfdv MFDV aa
run $N mnist-cnn FND:std=0.9375 aa
run $N mnist-cnn-mfdv:lambda1=0.003 MFDV:mc=15 pgd
run $N_SMALL mnist-cnn-mfdv:lambda1=0.003 MFDV:mc=15 eot6 square
run $N mnist-cnn FND:std=0.9375 eot80
run $N_SMALL mnist-cnn-mfdv:lambda1=0.003 MFDV eot80
run $N_SMALL mnist-cnn FND:std=1.406 eot80
sinai report $OUT
