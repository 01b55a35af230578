#!/bin/bash
# On the offline GPU machine, after `bash benchmarks/offline_gpu_setup.sh BUNDLE/part0` (see that script):
#   bash benchmarks/offline_gpu_search_all.sh BUNDLE/part1 OUTDIR
# installs the last part, then runs side by side on the one GPU
#  * issue 6: `lowbit search smollm2 --max-loss 1%` with measured sensitivities + pair terms, then
#    benchmarks/search_quality.py on its directory (equal-bits table, Spearman, accuracy target);
#  * issue 5's "all" rows: GPTQ + rotation (block and hadamard) + smoothing (auto) + 1% int8 retention
#    (optimised ratios) for every outlier scheme, same calibration/eval as the outliers table.
# Logs and results go to OUTDIR (SEARCH_ARGS / SCHEMES override the defaults below).
set -o pipefail
part=$1; out=${2:-/tmp/out}; mkdir -p "$out"
bash benchmarks/offline_gpu_setup.sh "$part" > "$out/setup.log" 2>&1 || { tail -30 "$out/setup.log"; exit 1; }
tail -4 "$out/setup.log"
eval "$(python3 benchmarks/offline_bundle.py env)"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__)" | tee -a "$out/gpu.txt"
git rev-parse HEAD >> "$out/gpu.txt" 2>/dev/null
python3 -m pytest -q -p no:cacheprovider tests/test_search_cuda.py > "$out/test_search_cuda.log" 2>&1 &

# `lowbit search` has no --device: run the CLI through the device wrapper
cli=/tmp/lowbit_cli.py
printf 'import sys\nfrom lowbit.cli import main\nsys.exit(main())\n' > $cli
S=${SEARCH_ARGS:---calib 8 --seq-len 512 --hutchinson-samples 16}
R=$out/search_smollm2
(
  set -x
  OMP_NUM_THREADS=2 python3 benchmarks/on_device.py --device cuda $cli search smollm2 --max-loss 1% --metric ppl \
    --budget-max 8.2 --estimators hutchinson,fisher --rank-configs 16 $S --out $R --quiet --json > "$out/search.json.log" 2> "$out/search.err"
  OMP_NUM_THREADS=2 python3 benchmarks/on_device.py --device cuda benchmarks/search_quality.py smollm2 --out $R $S \
    --measure-uniform > "$out/search_quality.txt" 2> "$out/search_quality.err"
  OMP_NUM_THREADS=2 python3 -m lowbit.cli quantize smollm2 --plan $R/plan.json --method rtn --eval-tokens 4096 \
    --device cuda --json --quiet > "$out/plan_requantize.json" 2> "$out/plan_requantize.err"
) 2> "$out/search_commands.log" &

for rot in block hadamard; do
  for s in ${SCHEMES:-w3g64 fp4g32 mxfp4 nvfp4 w4a4 w4a8}; do
    OMP_NUM_THREADS=1 python3 -m lowbit.cli quantize smollm2 --scheme $s --method gptq --rotate $rot --smooth auto \
      --retain 1% --retain-format int8 --retain-alloc optimized --calib 16 --seq-len 512 --eval-tokens 4096 \
      --device cuda --json --quiet > "$out/all_${rot}_$s.json" 2> "$out/all_${rot}_$s.err" &
  done
done
wait
tail -2 "$out/test_search_cuda.log"
ls -la "$out" "$R"
