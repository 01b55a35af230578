#!/bin/bash
# The SmolLM2 quality tables (PTQ {RTN, GPTQ} x schemes; outlier transforms; high-impact retention) in
# one go on one GPU, each table cut into shards that run side by side, then merged.
#   usage: bash benchmarks/offline_gpu_tables.sh DEST [DEVICE]      (DEVICE default cuda)
# Needs lowbit importable and the model loadable, e.g. after benchmarks/offline_gpu_setup.sh:
#   eval "$(python3 benchmarks/offline_bundle.py env)"
# Writes DEST/ptq.log, DEST/outliers.log, DEST/retention.log (tables at the end of each) and
# DEST/raw.tar.gz (every shard's JSON rows and log). Settings as in README/docs:
#   ptq:       --calib 32 --seq-len 512 --eval-tokens 8192, all nine schemes, $PTQ_METHODS (rtn,gptq)
#   outliers:  --calib 16 --seq-len 512 --eval-tokens 4096, rows gptq,hadamard,block,smooth,
#              hadamard+smooth,block+smooth x int3 g64, int2 g64, fp4 g32, mxfp4, nvfp4, w4a4, w4a8
#   retention: --calib 16 --seq-len 512 --eval-tokens 4096, 1% int8 (obs), rows gptq,fixed,optimized
#              and fp16 at equal bits, at int3 g64 and int2 g64
set -o pipefail
DEST=${1:?usage: offline_gpu_tables.sh DEST [DEVICE]}; DEV=${2:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$DEST/raw"; RAW=$DEST/raw
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
R="python3 benchmarks/on_device.py --device $DEV"
LIMIT=${LIMIT:-540}
OUTL="--model smollm2 --calib 16 --seq-len 512 --eval-tokens 4096"
ROWS=gptq,hadamard,block,smooth,hadamard+smooth,block+smooth
t0=$(date +%s)
pids=()
PTQ_SCRIPT=${PTQ_SCRIPT:-benchmarks/ptq_quality.py}; PTQ_METHODS=${PTQ_METHODS:-rtn,gptq}
for s in w4g64,w3g64,w2g64 w4g128,fp4g32,mxfp4 nvfp4,w4a8,w8a8fp8; do
  timeout $LIMIT $R $PTQ_SCRIPT --model smollm2 --schemes $s --methods $PTQ_METHODS --calib 32 --seq-len 512 \
    --eval-tokens 8192 --json $RAW/ptq_${s//,/_}.json > $RAW/ptq_${s//,/_}.log 2>&1 & pids+=($!)
done
for s in w3g64 w2g64 fp4g32 mxfp4 nvfp4 w4a4 w4a8; do
  timeout $LIMIT $R benchmarks/outliers_quality.py $OUTL --schemes $s --rows $ROWS \
    --json $RAW/outliers_$s.json > $RAW/outliers_$s.log 2>&1 & pids+=($!)
done
for s in w3g64 w2g64; do
  timeout $LIMIT $R benchmarks/retention_quality.py $OUTL --schemes $s --rows gptq,fixed --compare-fp16 '' \
    --json $RAW/retention_${s}_fixed.json > $RAW/retention_${s}_fixed.log 2>&1 & pids+=($!)
  timeout $LIMIT $R benchmarks/retention_quality.py $OUTL --schemes $s --rows optimized --compare-fp16 '' \
    --json $RAW/retention_${s}_opt.json > $RAW/retention_${s}_opt.log 2>&1 & pids+=($!)
  timeout $LIMIT $R benchmarks/retention_quality.py $OUTL --schemes $s --rows '' --compare-fp16 $s \
    --json $RAW/retention_${s}_fp16.json > $RAW/retention_${s}_fp16.log 2>&1 & pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait $p || fail=$((fail + 1)); done
echo "all shards done in $(( $(date +%s) - t0 )) s on $DEV ($fail failed)"
# ptq: one table from the shards (same layout as ptq_quality.py prints)
python3 - "$RAW" > $DEST/ptq.log 2>&1 <<'PY'
import glob, json, os, sys
rows, args = [], None
for p in sorted(glob.glob(os.path.join(sys.argv[1], "ptq_*.json"))):
    d = json.load(open(p)); rows += d["rows"]; args = args or d["args"]
for r in rows:
    print(json.dumps(r))
order = ["w4g64", "w3g64", "w2g64", "w4g128", "fp4g32", "mxfp4", "nvfp4", "w4a8", "w8a8fp8"]
methods = args["methods"].split(",")
print(f"\n{rows[0]['model']}: baseline perplexity {rows[0]['baseline']:.3f}; calibration "
      f"{args['calib']}x{args['seq_len']}; eval {args['eval_tokens']} tokens")
print("| scheme | bits/weight | " + " | ".join(f"{m} perplexity" for m in methods) + " |")
print("|---|---:|" + "---:|" * len(methods))
for s in order:
    r = {x["method"]: x for x in rows if x["scheme"] == s}
    if r:
        bits = next(iter(r.values()))["bits_per_weight"]
        print(f"| {s} | {bits:.3f} | " + " | ".join(f"{r[m]['metric']:.4f}" if m in r else "not run" for m in methods) + " |")
print("\nquantize seconds")
print("| scheme | " + " | ".join(methods) + " |")
print("|---|" + "---:|" * len(methods))
for s in order:
    r = {x["method"]: x for x in rows if x["scheme"] == s}
    if r:
        print(f"| {s} | " + " | ".join(f"{r[m]['quantize_seconds']:.1f}" if m in r else "" for m in methods) + " |")
PY
# outliers: one table (int2 g64 is not among outliers_quality's named columns, so merge here)
python3 - "$RAW" "$ROWS" > $DEST/outliers.log 2>&1 <<'PY'
import json, os, sys
sys.path.insert(0, "benchmarks")
from outliers_quality import print_tables
raw, wanted = sys.argv[1], sys.argv[2].split(",")
schemes = ["w3g64", "w2g64", "fp4g32", "mxfp4", "nvfp4", "w4a4", "w4a8"]
rows, args = [], None
for s in schemes:
    p = os.path.join(raw, f"outliers_{s}.json")
    if os.path.isfile(p):
        d = json.load(open(p)); rows += d["rows"]; args = args or d["args"]
for r in rows:
    print(json.dumps(r))
got = [s for s in schemes if any(r["scheme"] == s for r in rows)]
print_tables(rows, got, [w for w in wanted if any(r["row"] == w for r in rows)], args)
PY
python3 benchmarks/retention_quality.py --merge $(ls $RAW/retention_*.json 2>/dev/null) > $DEST/retention.log 2>&1
tar czf $DEST/raw.tar.gz -C $DEST raw
for f in ptq outliers retention; do echo "== $f"; tail -n 30 $DEST/$f.log; done
