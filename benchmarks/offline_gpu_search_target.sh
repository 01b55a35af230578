#!/bin/bash
# The 1% perplexity target on SmolLM2 with the Fisher estimator (RTN and GPTQ), reusing the sensitivity
# cache and measured points of benchmarks/offline_gpu_search_all.sh (committed under CACHE). After
# `bash benchmarks/offline_gpu_setup.sh BUNDLE/part0` on the GPU machine:
#   bash benchmarks/offline_gpu_search_target.sh BUNDLE/part1 OUTDIR
set -o pipefail
part=$1; out=${2:-/tmp/out}; mkdir -p "$out"
C=${CACHE:-benchmarks/results/search_smollm2_gpu_h200/measured_pairs}
bash benchmarks/offline_gpu_setup.sh "$part" > "$out/setup.log" 2>&1 || { tail -30 "$out/setup.log"; exit 1; }
eval "$(python3 benchmarks/offline_bundle.py env)"
export PYTHONUNBUFFERED=1
cli=/tmp/lowbit_cli.py
printf 'import sys\nfrom lowbit.cli import main\nsys.exit(main())\n' > $cli
S="--calib 8 --seq-len 512 --hutchinson-samples 16 --sensitivity-cache $C/sensitivity.json"
for m in rtn gptq; do
  R=$out/fisher_$m; mkdir -p $R; cp $C/points.jsonl $R/
  ( set -x
    OMP_NUM_THREADS=4 python3 benchmarks/on_device.py --device cuda $cli search smollm2 --max-loss 1% --metric ppl \
      --budget-max 8.2 --method $m --estimator fisher --no-pairs --rank-configs 0 $S --out $R --quiet --json \
      > $R/search.out 2> $R/search.err
    OMP_NUM_THREADS=4 python3 -m lowbit.cli quantize smollm2 --plan $R/plan.json --method $m --calib 8 --seq-len 512 \
      --eval-tokens 4096 --device cuda --json --quiet > $R/requantize.json 2> $R/requantize.err
  ) 2> $R/commands.log &
done
wait
ls -la $out/fisher_*
