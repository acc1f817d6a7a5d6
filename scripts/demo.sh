#!/usr/bin/env bash
# README demo: synthetic data -> xmc train (MIDX sampled softmax) -> xmc eval, plus a popularity
# baseline. Usage: scripts/demo.sh VENV OUTDIR   (e.g. scripts/demo.sh .venv demo_out)
# Sizes can be overridden: LABELS=20000 POINTS=50000 TEST_POINTS=10000 FEATURES=20000 EPOCHS=5
# (sized to finish in under 5 minutes on a loaded 2-core machine; see docs/training.md)
set -euo pipefail
VENV=${1:-.venv}
OUT=${2:-demo_out}
LABELS=${LABELS:-20000}
POINTS=${POINTS:-50000}
TEST_POINTS=${TEST_POINTS:-10000}
FEATURES=${FEATURES:-20000}
EPOCHS=${EPOCHS:-5}
XMC="$VENV/bin/xmc"
PY="$VENV/bin/python"
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1/4 synthetic data: $LABELS labels, $POINTS train / $TEST_POINTS test points"
"$XMC" data synth --labels "$LABELS" --points "$POINTS" --features "$FEATURES" --seed 0 \
  --out "$OUT/train.txt" --test-out "$OUT/test.txt" --test-points "$TEST_POINTS" --no-progress

# --force: a second `make demo` replaces the first demo model (xmc train refuses a used --out)
echo "== 2/4 xmc train: sampled softmax with the MIDX sampler ($EPOCHS epochs)"
"$XMC" train --data "$OUT/train.txt" --out "$OUT/model" --loss sampled --sampler midx \
  --negatives 64 --epochs "$EPOCHS" --batch-size 256 --hidden 512 --dim 128 --dropout 0.2 \
  --lr 0.002 --bag-optimizer sparse-adam --ensemble 1 --no-progress --force

echo "== 3/4 xmc eval on the test file"
"$XMC" eval --model "$OUT/model" --data "$OUT/test.txt" --k 5

echo "== 4/4 popularity baseline (always predict the 5 most frequent training labels)"
"$PY" - "$OUT/train.txt" "$OUT/test.txt" <<'PYEOF'
import sys
import numpy as np
from xmc_toolkit.data import load
from xmc_toolkit.metrics import evaluate, inverse_propensity
train, test = load(sys.argv[1]), load(sys.argv[2])
counts = np.asarray(train.Y.sum(0)).ravel()
top = np.argsort(-counts, kind="stable")[:5]
ids = np.tile(top, (test.num_points, 1))
m = evaluate(test.Y, ids, (1, 3, 5), inverse_propensity(train.Y))
print("popularity baseline: " + "  ".join(f"{k}={100 * m[k]:.2f}" for k in ("P@1", "P@3", "P@5")))
PYEOF
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT"
