#!/usr/bin/env bash
# `make demo`: the case study end to end, in one directory (default demo_out/).
#   1. train the tutorial's MLP for 500 epochs (seed 3, so the numbers repeat), keeping
#      model_490.h5 ... model_499.h5;
#   2. average them with each scheme (equal, linear, exp with alpha 2);
#   3. evaluate single checkpoints, averages and the ensemble for n = 1..10, with a plot.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-demo_out}"
wavg=.venv/bin/wavg

mkdir -p "$out"
echo "== training (500 epochs, keeping the last 10)" >&2
"$wavg" train-save --seed 3 --out-dir "$out/ckpt"

for scheme in equal linear "exp --alpha 2"; do
    name="${scheme%% *}"
    echo "== wavg combine --scheme $scheme" >&2
    # shellcheck disable=SC2086  # "exp --alpha 2" is meant to split into three words
    "$wavg" combine --scheme $scheme "$out"/ckpt/model_49*.h5 -o "$out/avg_$name.h5"
done

echo "== evaluating on the 1000 test samples" >&2
"$wavg" evaluate "$out"/ckpt/model_49*.h5 --plot "$out/evaluate.png"
echo "averages: $out/avg_{equal,linear,exp}.h5; plot: $out/evaluate.png" >&2
