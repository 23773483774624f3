#!/usr/bin/env bash
# The GPU check of issue 13 in one script, under 10 minutes on one CUDA GPU:
#   ViT-B MAE pretraining from the real chip store (bf16 autocast) against a plain
#   nn.TransformerEncoderLayer reference in the same run, the embedding throughput benchmark,
#   and the label-efficiency run with the ViT-B encoder. JSON under $OUT (else benchmarks/results/gpu/).
#   benchmarks/gpu/run.sh            # on a CUDA machine (add --compile for torch.compile)
#   benchmarks/gpu/run.sh --smoke    # CPU, tiny sizes, ~1 minute (tests/test_benchmarks_smoke.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [[ " $* " != *" --smoke "* ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --smoke on CPU')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
if [[ " $* " == *" --smoke "* ]]; then
  exec "$PY" benchmarks/gpu/gpu_bench.py "$@"   # CPU: its time depends on the machine's load, no limit here
fi
exec timeout "${GPU_BENCH_TIMEOUT:-570}" "$PY" benchmarks/gpu/gpu_bench.py "$@"
