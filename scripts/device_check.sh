#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the device tool (about 4 minutes on an H100/H200):
# CUDA tests, bench at batch 128 and 512, the speedrun over 5 seeds, and (--results) the results table on CUDA.
# Run from the repo root with the MNIST IDX files in .data/mnist (or DLBASE_DATA set); outputs go to $OUT.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DLBASE_DATA=${DLBASE_DATA:-$PWD/.data/mnist}
OUT=${OUT:-/tmp/dlbase-device}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
  echo "== CUDA tests"
  timeout 120 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider -rA 2>&1 | grep -E "passed|failed|PASSED|FAILED|Error|peak" | tail -40
  echo "== speedrun"
  timeout 100 python3 scripts/speedrun.py --seeds 5 --json "$OUT/speedrun.json" 2>&1
  for b in 128 512; do
    echo "== bench $b"
    timeout 80 python3 scripts/bench.py --batch-size $b --warmup 1 --epochs 1 --json "$OUT/bench$b.json" 2>&1 | grep -E "^\||s/epoch|FAILED|NVIDIA"
  done
  if [ "${1:-}" = "--results" ]; then
    echo "== results"
    timeout 150 python3 scripts/results.py --set device=cuda --out "$OUT/RESULTS_cuda.md" --json "$OUT/results_cuda.json" 2>&1 | grep "^=="
  fi
  date -u
} 2>&1 | tee "$OUT/log.txt"
