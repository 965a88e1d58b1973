#!/usr/bin/env bash
# `make demo`: what averaging is for, end to end, in one directory (default demo_out/).
#   1. train the case study's MLP on the blobs data in a setting where the last epochs
#      bounce (SGD, momentum 0.9, constant learning rate 0.03, batch size 4, 60 epochs;
#      seed 3, so the numbers repeat), keeping the last 10 epochs. `--tutorial` trains the
#      tutorial's exact setting instead (Adam, batch size 32, 500 epochs), where every column
#      is equal (see docs/case_study.md);
#   2. average them with each scheme, and pick a greedy soup on the validation split;
#   3. evaluate single checkpoints, averages, the soup and the ensemble for n = 1..10;
#   4. the same for a small Conv+BatchNorm net on scikit-learn's digits, where the averages
#      need `wavg bn-update` (the +bn columns). Skipped with `--tutorial`.
# Usage: scripts/demo.sh [--tutorial] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
setting=(--optimizer sgd --lr 0.03 --batch-size 4 --epochs 60)
tutorial=0
if [[ "${1:-}" == "--tutorial" ]]; then
    setting=()
    tutorial=1
    shift
fi
out="${1:-demo_out}"
wavg=.venv/bin/wavg

mkdir -p "$out"
rm -rf "$out/ckpt" "$out/digits"
echo "== training on blobs: ${setting[*]:-the tutorial setting} (keeping the last 10 epochs)" >&2
"$wavg" train-save --seed 3 "${setting[@]}" --out-dir "$out/ckpt"
ckpts=("$out"/ckpt/model_*.h5)

for scheme in equal linear "exp --alpha 2"; do
    name="${scheme%% *}"
    echo "== wavg combine --scheme $scheme" >&2
    # shellcheck disable=SC2086  # "exp --alpha 2" is meant to split into three words
    "$wavg" combine --scheme $scheme "${ckpts[@]}" -o "$out/avg_$name.h5" 2>/dev/null
done

echo "== wavg soup: greedy selection on the validation split (not the test points)" >&2
"$wavg" soup "${ckpts[@]}" --data blobs -o "$out/soup.h5"

echo "== evaluating on the 1000 test samples" >&2
"$wavg" evaluate "${ckpts[@]}" --plot "$out/evaluate.png"
echo "averages: $out/avg_{equal,linear,exp}.h5; soup: $out/soup.h5; plot: $out/evaluate.png" >&2
if [[ $tutorial == 1 ]]; then
    exit 0
fi

echo "== digits, Conv+BatchNorm: SGD at learning rate 0.05, 20 epochs, keeping the last 5" >&2
"$wavg" train-save --data digits --optimizer sgd --lr 0.05 --epochs 20 --keep 5 --seed 1 \
    --out-dir "$out/digits"
"$wavg" combine "$out"/digits/model_*.h5 -o "$out/digits_avg.h5" 2>/dev/null
"$wavg" bn-update "$out/digits_avg.h5" --data digits -o "$out/digits_avg_bn.h5"
"$wavg" evaluate "$out"/digits/model_*.h5 --data digits --bn-data digits --schemes equal,exp \
    --no-ensemble
