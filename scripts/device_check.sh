#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the device tool (about 6 minutes on an H100/H200):
# the CUDA tests, the speedrun over 5 seeds (and the CNN's), bench at batch 128 and 512, its CNN rows, lr-find and
# optimizers on the device, a whole-command profile, and
# (--results) the results table on CUDA. Stops at the first failing step with one line naming it
# (KEEP_GOING=1 runs every step and exits non-zero at the end if any failed).
# Run from the repo root with the MNIST IDX files in .data/mnist (or DLBASE_DATA set); outputs go to $OUT.
#   bash scripts/device_check.sh              # on a GPU machine
#   DEVICE_CHECK_TINY=1 bash scripts/device_check.sh   # the same steps on the CPU on a few samples (tests)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DLBASE_DATA=${DLBASE_DATA:-$PWD/.data/mnist}
# byte-code caches somewhere writable: a read-only site-packages would otherwise be compiled on every start
# (4 s of each command on the device machine), which no installed copy of dlbase and torch pays; the tiny mode
# runs where the tests run and keeps that machine's own caches (a fresh prefix there is compiled on every start
# when PYTHONDONTWRITEBYTECODE is set)
[ "${DEVICE_CHECK_TINY:-0}" = 1 ] || export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/dlbase-pycache}
OUT=${OUT:-/tmp/dlbase-device}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
failed=()

step() {  # step NAME SECONDS COMMAND...: run one step with a time limit; stop (or note) on failure
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    local why="exit $rc"; [ "$rc" -eq 124 ] && why="timed out after ${limit}s"
    echo "device_check: FAILED at '$name' ($why)" | tee -a "$LOG"
    failed+=("$name")
    [ "${KEEP_GOING:-0}" = 1 ] || exit 1
  fi
}

: > "$LOG"
date -u | tee -a "$LOG"
if [ "${DEVICE_CHECK_TINY:-0}" = 1 ]; then  # CPU, a few samples: proves every step still runs
  DEV=(--device cpu); SETS=(--set device=cpu --set data.subset=400 --set data.val_size=100 --set train.epochs=1
                           --set data.download=false)
  BENCH=(--samples 300 --warmup 0 --epochs 1 --ways dataloader_w0 dlbase_eager); SEEDS=1; BATCHES=(128)
else
  DEV=(); SETS=(); BENCH=(--warmup 1 --epochs 2); SEEDS=5; BATCHES=(128 512)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee -a "$LOG"
step "CUDA tests" 300 python3 -m pytest -q -m cuda tests/ -p no:cacheprovider -rfE
step "speedrun" 200 python3 scripts/speedrun.py --seeds "$SEEDS" "${SETS[@]}" --json "$OUT/speedrun.json"
# the CNN to 99% (issue 23's GPU target: 99.0% mean over 5 seeds in at most 0.25 s of training steps); the CPU
# recipe run on the device as it is, until a GPU recipe is measured
CNN_DEV=(--set device=auto); [ "${DEVICE_CHECK_TINY:-0}" = 1 ] && CNN_DEV=()
step "cnn speedrun" 300 python3 scripts/speedrun.py --config configs/mnist_cnn_cpu_speedrun.yaml --target 0.99 \
  --seeds "$SEEDS" "${SETS[@]}" "${CNN_DEV[@]}" --json "$OUT/speedrun_cnn.json"
# the best recipe (elastic distortions) over 5 seeds, against Simard et al.'s 99.6% (issue 23; about 30 s a seed
# on the CPU's 15 s an epoch, unmeasured on the device)
step "cnn best" 400 python3 scripts/speedrun.py --config configs/mnist_cnn_best.yaml --target 0.996 \
  --seeds "$SEEDS" "${SETS[@]}" "${CNN_DEV[@]}" --json "$OUT/speedrun_cnn_best.json"
for b in "${BATCHES[@]}"; do
  step "bench $b" 150 python3 scripts/bench.py "${DEV[@]}" --batch-size $b "${BENCH[@]}" --json "$OUT/bench$b.json"
done
# pytorch/examples' CNN (their Net, torchvision, DataLoader) against configs/mnist_cnn.yaml, at their batch of 64
step "bench cnn" 300 python3 scripts/bench.py "${DEV[@]}" --model cnn "${BENCH[@]}" --json "$OUT/bench_cnn.json"
if [ "${DEVICE_CHECK_TINY:-0}" = 1 ]; then POP=(--device cpu --members 2 --epochs 1 --subset 400 --hidden 16)
else POP=(--members 64 --epochs 3); fi
step "population bench" 300 python3 scripts/population_bench.py "${POP[@]}" --out "$OUT/pop" --json "$OUT/population.json"
rm -rf "$OUT/pop"
# the range test on the device (one replayed CUDA graph, the lr refilled each step): its suggestion against the CPU's 1.1e-3
step "lr-find" 120 python3 -m dlbase lr-find --config configs/mnist_mlp.yaml "${SETS[@]}" --out "$OUT/lr_find"
step "optimizers" 60 python3 -m dlbase optimizers --function rosenbrock "${DEV[@]}" --out "$OUT/optimizers"
step "import profile" 60 bash -c 'python3 -X importtime -m dlbase --help 2> "$0/importtime.txt" >/dev/null' "$OUT"
step "command profile" 120 python3 -m cProfile -o "$OUT/train.prof" -m dlbase train --config configs/mnist_speedrun.yaml \
  "${SETS[@]}" --set checkpoint.dir="$OUT/ckpt" --set name=profile
python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(45)" "$OUT/train.prof" \
  > "$OUT/train_profile.txt" 2>&1 || true
rm -rf "$OUT/ckpt"
if [ "${1:-}" = "--results" ]; then
  step "results" 300 python3 scripts/results.py "${SETS[@]}" --out "$OUT/RESULTS_device.md" --json "$OUT/results_device.json"
fi
date -u | tee -a "$LOG"
if [ ${#failed[@]} -gt 0 ]; then
  echo "device_check: ${#failed[@]} step(s) FAILED: ${failed[*]}" | tee -a "$LOG"
  exit 1
fi
echo "device_check: all steps passed" | tee -a "$LOG"
