#!/usr/bin/env bash
# The README's CPU example of `lowbit scaling`: two processes (one thread each) share the grid
# with --only i/2; a rerun skips finished runs (and resumes a half-done one). Then the report.
set -euo pipefail
OUT=${1:-benchmarks/results/scaling/cpu}
COMMON=(--sizes 32,64,96 --batch-size 8 --seq-len 64 --vocab 512 --eval-tokens 16384 --device cpu --out "$OUT")
share() {
  lowbit scaling run "${COMMON[@]}" --tokens 32k,96k,256k --precisions w4a4,bf16,w16a4 --groups 16,64 --only "$1/2"
  lowbit scaling run "${COMMON[@]}" --tokens 32k,96k --precisions w4a16,w4a4-fc2a8 --groups 64 --only "$1/2"
  # a second seed at two points: the run-to-run spread that delta_p is measured against
  lowbit scaling run "${COMMON[@]}" --sizes 64 --tokens 96k,256k --precisions bf16,w4a4 --groups 64 --seeds 1 \
    --only "$1/2"
}
export OMP_NUM_THREADS=1
share 0 & P0=$!
share 1 & P1=$!
wait $P0 $P1
lowbit scaling report "$OUT"
