#!/usr/bin/env bash
# Regenerate sample_checkpoints/model_490.h5 ... model_499.h5: the case study (500 epochs, Adam,
# legacy .h5) with a fixed seed, so the files are the same on every run of this script.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f sample_checkpoints/model_*.h5
.venv/bin/wavg train-save --seed 7 --epochs 500 --keep 10 --format h5 --out-dir sample_checkpoints
