#!/usr/bin/env bash
# A one-GPU `lowbit scaling` sweep inside the law's regime: many tokens per parameter. The first
# GPU sweep (scaling_gpu_sweep.sh) trained 107k..25.7M-parameter models on 1M..8M tokens, D/N from
# 0.04 to 78, and its fit failed: most runs were far from the regime the law describes. Here:
# widths 32, 64, 96, 128 (33k, 107k, 222k, 427k parameters without the embedding) x D = 1.2M, 2.4M,
# 4.8M, 9.6M tokens (D/N from 2.9 at d128/1.2M to 300 at d32/9.6M) x 2 seeds; w4a4 and w4a16 at G = 32, 64,
# 128, bf16, w16a4 and w4a4-fc2a8 at G = 128: 4 x 4 x 2 x 9 = 288 runs. 8 processes share the GPU,
# 6 on the main grid and 2 on the decomposition/FC2 grid (--only i/K); they stop at TIME_LIMIT s.
#
# The training part of the corpus is ~2.4M tokens of this BPE, so D stops at 4 passes over it:
# Muennighoff et al. (2023, data-constrained scaling) found up to ~4 epochs worth nearly as much as
# unique tokens; beyond that the law (which has no repetition term) is not expected to hold.
# Cost, estimated from benchmarks/results/scaling/gpu_h100/runs.jsonl (H100, 8 processes sharing
# it, batch 32 x 256): d64 and d128 train at ~300k (bf16), 250k (w16a4), 232k (w4a16), 208k
# (w4a4), 210k (w4a4-fc2a8) tokens/s per process, the two widths within 7% of each other at 2.9x
# the FLOPs: launch-bound, so d32 and d96 are taken at the same rates. Per token of D, one
# (width, D, seed) cell costs 30.7 us of process time on the main grid (1 bf16 + 3 w4a16 + 3 w4a4
# runs) and 8.8 us on the other (w16a4 + w4a4-fc2a8). The grid's tokens: (2+4+8+16)Mi x 4 widths x
# 2 seeds = 252M, so the 6 main processes need 252M x 30.7 us / 6 = 1,290 s at batch 32 (the 2 others
# 1,100 s): ~21 min for D up to 16M. With D = 1.2M..9.6M (144M tokens, 0.57 of that) about
# 12 min at batch 32 (the default), plus start-up and tokenizing. Not measured yet.
# Why batch 32: the GPU sweep's runs left the first loss plateau (~5.3 nats) only after ~100
# steps whatever their length; the 1.2M-token runs have 146 steps. Fit without them
# (`--min-tokens 2m`) if they still sit near the plateau.
# In the GPU sweep the gap between the last training loss and the validation loss (other
# packages) of bf16 runs is 0.27-0.35 nats within the first pass (2M) and 0.67 (d64) to 0.95 (d512)
# at 8M: repetition may count, and the law has no term for it (compare `train_loss_end` with `loss`).
#
# Runs go cheapest first and each finished run is one line of OUT/runs.jsonl, so whatever finished
# is a fit-able sweep; rerunning this script continues it (a run cut off mid-way resumes from its
# last saved state). Then, here or on any machine:
#   lowbit scaling report OUT --min-tokens-per-param 20
# Overrides (a tiny CPU dry run: DEVICE=cpu SIZES=32 TOKENS=4k,8k SEEDS=0 BATCH=2 SEQ_LEN=32
# EVAL_TOKENS=256 THREADS=1; 18 runs): SIZES TOKENS SEEDS BATCH SEQ_LEN EVAL_TOKENS DEVICE TIME_LIMIT
# THREADS (per process, default 2); LIST=1 prints the run count of each grid and stops. Set LOWBIT_TRAIN_CORPUS (the frozen training corpus) where the
# stdlib differs from the machine the tokenizer was trained on.
set -uo pipefail
OUT=${1:-${OUT:-.}/scaling_gpu_law}
TIME_LIMIT=${TIME_LIMIT:-1500}
DEVICE=${DEVICE:-cuda}
TOK=benchmarks/results/scaling/tokenizer-2048.json
COMMON=(--sizes "${SIZES:-32,64,96,128}" --tokens "${TOKENS:-1200k,2400k,4800k,9600k}" --seeds "${SEEDS:-0,1}"
        --batch-size "${BATCH:-32}" --seq-len "${SEQ_LEN:-256}" --eval-tokens "${EVAL_TOKENS:-65536}"
        --device "$DEVICE" --out "$OUT" --tokenizer "$TOK")
GRID1=(--precisions bf16,w4a4,w4a16 --groups 32,64,128)
GRID2=(--precisions w16a4,w4a4-fc2a8 --groups 128)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
lowbit() { python3 -m lowbit.cli "$@"; }
count() { lowbit scaling run "${COMMON[@]}" "$@" --list | wc -l; }
if [ -n "${LIST:-}" ]; then
  main=$(count "${GRID1[@]}") parts=$(count "${GRID2[@]}")
  echo "runs: $main (main grid) + $parts (w16a4, w4a4-fc2a8) = $((main + parts))"
  exit 0
fi
[ -n "${LOWBIT_TRAIN_CORPUS:-}" ] || echo "note: LOWBIT_TRAIN_CORPUS is not set: the corpus is built from this Python's stdlib"
mkdir -p "$OUT"
deadline=$((SECONDS + TIME_LIMIT))
# tokenize the corpus once (cached on disk) before the shares start
OMP_NUM_THREADS=8 python3 -c "import sys; from lowbit.scaling.tokenizer import load_tokenizer; \
from lowbit.data.train_corpus import training_tokens; training_tokens(load_tokenizer(sys.argv[1]))" "$TOK"
share() {  # LOG GRID... ONLY
  OMP_NUM_THREADS=${THREADS:-2} PYTHONUNBUFFERED=1 timeout $((deadline - SECONDS)) \
    python3 -m lowbit.cli scaling run "${COMMON[@]}" "${@:2}" > "$OUT/$1.log" 2>&1
}
for i in 0 1 2 3 4 5; do share "main$i" "${GRID1[@]}" --only "$i/6" & done
for i in 0 1; do share "parts$i" "${GRID2[@]}" --only "$i/2" & done
wait
total=$(( $(count "${GRID1[@]}") + $(count "${GRID2[@]}") ))
echo "finished runs: $(cat "$OUT"/*.jsonl 2>/dev/null | wc -l) of $total in $SECONDS s"
grep -h "val loss" "$OUT"/main*.log "$OUT"/parts*.log | tail -n 80
