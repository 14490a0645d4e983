#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the device tool (about 5 minutes on an H100/H200):
# CUDA tests, bench at batch 128 and 512, the speedrun over 5 seeds, and the results table on CUDA.
# Run from the repo root with the MNIST IDX files in .data/mnist (or DLBASE_DATA set); outputs go to $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DLBASE_DATA=${DLBASE_DATA:-$PWD/.data/mnist}
OUT=${OUT:-/tmp/dlbase-device}
mkdir -p "$OUT"
log="$OUT/log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
  echo "== CUDA tests"
  timeout 200 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider -s 2>&1 | grep -vE "^\s*\[|^epoch" | tail -40
  echo "== bench 128"
  timeout 150 python3 scripts/bench.py --batch-size 128 --warmup 1 --epochs 2 --json "$OUT/bench128.json" 2>&1 | grep -v Warning
  echo "== bench 512"
  timeout 100 python3 scripts/bench.py --batch-size 512 --warmup 1 --epochs 2 --json "$OUT/bench512.json" 2>&1 | grep -v Warning
  echo "== speedrun"
  timeout 150 python3 scripts/speedrun.py --seeds 5 --json "$OUT/speedrun.json" 2>&1
  echo "== speedrun, 5 epochs"
  timeout 120 python3 scripts/speedrun.py --seeds 5 --set train.epochs=5 --json "$OUT/speedrun5.json" 2>&1 | tail -1
  echo "== results"
  timeout 150 python3 scripts/results.py --set device=cuda --out "$OUT/RESULTS_cuda.md" --json "$OUT/results_cuda.json" 2>&1 | grep "^=="
  date -u
} 2>&1 | tee "$log"
