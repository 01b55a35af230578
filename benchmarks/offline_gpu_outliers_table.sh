#!/bin/bash
# Issue 5's whole SmolLM2 table on one GPU: rows {GPTQ, rotations, smoothing, both, retention fixed /
# optimised, all} x the outlier schemes, each cell a GPTQ job (calibration 16 x 512, perplexity on 4,096
# held-out tokens), shards side by side, then one merged table.
#   on the offline machine, after `bash benchmarks/offline_gpu_setup.sh BUNDLE/part0`:
#     bash benchmarks/offline_gpu_outliers_table.sh BUNDLE/part1 OUTDIR
#   once set up (or on a machine that has lowbit and the model):  SETUP=none bash ... - OUTDIR
# ROWS_A / ROWS_B / ROWS_C (three shards per scheme; an empty one is skipped), SCHEMES, CALIB_SEEDS
# (calibration samples, default 0) and LIMIT (seconds per shard) override the defaults.
set -o pipefail
part=$1; out=${2:-/tmp/out}; mkdir -p "$out/raw"
cd "$(dirname "$0")/.."
if [ "${SETUP:-bundle}" != none ]; then
  bash benchmarks/offline_gpu_setup.sh "$part" > "$out/setup.log" 2>&1 || { tail -30 "$out/setup.log"; exit 1; }
  tail -4 "$out/setup.log"
fi
[ -f "${LOWBIT_OFFLINE_HOME:-/tmp/lowbit-offline}/env.sh" ] && eval "$(python3 benchmarks/offline_bundle.py env)"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__)" >> "$out/gpu.txt"
git rev-parse HEAD >> "$out/gpu.txt" 2>/dev/null
SCHEMES=${SCHEMES:-w3g64 w2g64 fp4g32 mxfp4 nvfp4 w4a4 w4a8 nvfp4:mse+nvfp4:4over6}
ROWS_A=${ROWS_A-gptq,hadamard,block,auto,smooth,hadamard+smooth,block+smooth}
ROWS_B=${ROWS_B-auto+smooth,retain-fixed,retain-opt}
ROWS_C=${ROWS_C-all:hadamard,all:block,all:auto}
LIMIT=${LIMIT:-560}
R="python3 benchmarks/on_device.py --device cuda benchmarks/outliers_quality.py --model smollm2 --calib 16 --seq-len 512 --eval-tokens 4096"
t0=$(date +%s)
pids=()
for cs in ${CALIB_SEEDS:-0}; do
  for s in $SCHEMES; do
    tag=${s//[:+]/_}_c$cs
    for half in A B C; do
      rows=ROWS_$half
      [ -n "${!rows}" ] || continue
      timeout $LIMIT $R --schemes "$s" --rows "${!rows}" --calib-seed $cs --json "$out/raw/${tag}_$half.json" \
        > "$out/raw/${tag}_$half.log" 2>&1 & pids+=($!)
    done
  done
done
fail=0
for p in "${pids[@]}"; do wait $p || fail=$((fail + 1)); done
echo "all shards done in $(( $(date +%s) - t0 )) s ($fail failed or timed out)" | tee "$out/shards.txt"
python3 benchmarks/outliers_quality.py --from-json "$out"/raw/*.json > "$out/table.md" 2>&1
tar czf "$out/raw.tar.gz" -C "$out" raw
cat "$out/table.md"
