#!/usr/bin/env bash
# Every downstream result on top of a finished demo, gathered into one MLflow results report:
# segmentation (ViT head vs U-Net) on the demo's store and encoder, the modality ablation and
# region generalization (synthetic regions A / B_same / B_shifted: a known shift),
# LLP on the real Kansas case when the real data is there; then `sarflow downstream report`.
# Usage: scripts/results.sh [DEMO_OUTPUT] [REAL_DATA]   (after `make demo`)
set -euo pipefail
OUT=${1:-demo-output}
REAL=${2:-${SARFLOW_REAL_DATA:-../shared/data/real}}
BIN=${SARFLOW_BIN:-.venv/bin}
[ -f "$OUT/summary.json" ] || { echo "error: $OUT/summary.json: no finished demo here (run make demo first)" >&2; exit 2; }
read_summary() { "$BIN/python" -c "import json, sys; s = json.load(open('$OUT/summary.json')); print(eval(sys.argv[1]))" "$1"; }
URI=$(read_summary 's["mlflow"]["tracking_uri"]')
STORE=$(read_summary 's["store"]')
ENCODER=$(read_summary 's["mlflow"]["encoder"]')

rm -rf "$OUT/results"  # this script's own products, made afresh (the MLflow runs accumulate)
"$BIN/sarflow" segment train "$STORE" --encoder "$ENCODER" --tracking-uri "$URI"
"$BIN/sarflow" downstream ablation --synth "$OUT/results/ablation" --tracking-uri "$URI" --out-dir "$OUT/results/ablation"
"$BIN/sarflow" downstream region --synth "$OUT/results/regions" --tracking-uri "$URI" --out-dir "$OUT/results/regions"
if [ -d "$REAL/sen1floods11" ]; then
  "$BIN/sarflow" llp real-case "$REAL" --tracking-uri "$URI" --out "$OUT/results/llp-real"
else
  echo "note: $REAL has no sen1floods11/: the real LLP case is left out of the report"
fi
"$BIN/sarflow" downstream report --tracking-uri "$URI" --out-dir "$OUT/results"
