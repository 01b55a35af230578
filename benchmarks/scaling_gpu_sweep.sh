#!/usr/bin/env bash
# The issue's one-GPU `lowbit scaling` sweep: 4 widths (107k to 25.7M parameters without the
# embedding) x 4 token budgets (1M to 8M) x 3 group sizes for w4a4 and w4a16, bf16, w16a4 and
# w4a4-fc2a8 at G=128: 144 runs. 8 processes share the GPU (these models are too small to fill it
# alone), 6 on the main grid and 2 on the decomposition/FC2 grid (--only i/K); they stop at
# TIME_LIMIT seconds.
# Runs go cheapest first and each finished run is one line of OUT/runs.jsonl, so whatever finished
# is a fit-able sweep (rerunning this script continues it). Then, here or on any machine:
#   lowbit scaling report OUT
# Set LOWBIT_TRAIN_CORPUS (the frozen training corpus) where the stdlib differs from the machine
# the tokenizer was trained on; the tokenizer file makes the ids the same everywhere.
set -uo pipefail
OUT=${1:-${OUT:-.}/scaling_gpu}
TIME_LIMIT=${TIME_LIMIT:-1500}
DEVICE=${DEVICE:-cuda}
TOK=benchmarks/results/scaling/tokenizer-2048.json
COMMON=(--sizes 64,128,256,512 --batch-size 32 --seq-len 256 --eval-tokens 65536 --device "$DEVICE" --out "$OUT"
        --tokenizer "$TOK" --tokens 1m,2m,4m,8m)
GRID1=(--precisions bf16,w4a4,w4a16 --groups 32,64,128)
GRID2=(--precisions w16a4,w4a4-fc2a8 --groups 128)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
[ -n "${LOWBIT_TRAIN_CORPUS:-}" ] || echo "note: LOWBIT_TRAIN_CORPUS is not set: the corpus is built from this Python's stdlib"
lowbit() { python3 -m lowbit.cli "$@"; }
mkdir -p "$OUT"
deadline=$((SECONDS + TIME_LIMIT))
# tokenize the corpus once (cached on disk) before the shares start
OMP_NUM_THREADS=8 python3 -c "import sys; from lowbit.scaling.tokenizer import load_tokenizer; \
from lowbit.data.train_corpus import training_tokens; training_tokens(load_tokenizer(sys.argv[1]))" "$TOK"
share() {  # LOG GRID... ONLY
  OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 timeout $((deadline - SECONDS)) \
    python3 -m lowbit.cli scaling run "${COMMON[@]}" "${@:2}" > "$OUT/$1.log" 2>&1
}
for i in 0 1 2 3 4 5; do share "main$i" "${GRID1[@]}" --only "$i/6" & done
for i in 0 1; do share "parts$i" "${GRID2[@]}" --only "$i/2" & done
wait
total=$(( $(lowbit scaling run "${COMMON[@]}" "${GRID1[@]}" --list | wc -l) + $(lowbit scaling run "${COMMON[@]}" "${GRID2[@]}" --list | wc -l) ))
echo "finished runs: $(cat "$OUT"/*.jsonl 2>/dev/null | wc -l) of $total in $SECONDS s"
grep -h "val loss" "$OUT"/main*.log "$OUT"/parts*.log | tail -n 80
