"""FSDP2 and HQ-FSDP training speed on K GPUs of one host (lowbit.lowp.fsdp), through lowbit.train's
loop: a Llama-architecture model of about 1B parameters with random weights from a config (16
layers, hidden 2048, intermediate 8192, 32 heads / 8 KV heads, vocabulary 32000), fp32 master
weights sharded over the K processes, bf16 parameters for compute, gradients reduced in bf16.

Configurations (weight all-gather x matmuls): bf16 / FP8 E4M3 per tensor / INT8 per row all-gather,
each with bf16 matmuls and with FP8 HALO-1 matmuls (``fp8:1``; the FP8 all-gather then sends the
forward's rotated weight operand itself). Reported per configuration: tokens/s per GPU (steps after
the warm-up), step time, peak memory per GPU, and the loss of every step.

The global batch (``--global-batch`` sequences) is the same for every K: each process runs
micro-batches of ``--micro-batch`` sequences with gradient accumulation making up the rest, so the
runs for K = 1, 2, 4, 8 train on the same tokens in the same micro-batches and their loss curves
should agree (to the reduction order: bf16 gradient sums). ``--compare K1.json`` prints the
scaling efficiency (tokens/s per GPU against the 1-GPU run) and the loss curves' largest
relative difference.

    # on the GPUs (about 1-2 minutes per K on H100s):
    for K in 1 2 4 8; do NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node $K benchmarks/fsdp_speed.py \\
        --json benchmarks/results/fsdp_speed_k$K.json --compare benchmarks/results/fsdp_speed_k1.json; done
    # on the CPU (gloo), a tiny config, to check the script:
    torchrun --nproc-per-node 2 benchmarks/fsdp_speed.py --tiny --device cpu --json /tmp/fsdp_tiny.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

CONFIGS = (("bf16", "bf16"), ("fp8", "bf16"), ("int8", "bf16"), ("bf16", "fp8:1"), ("fp8", "fp8:1"), ("int8", "fp8:1"))


def build_model(args, dev):
    """The same random weights on every process (seeded; built on ``dev`` directly)."""
    import transformers

    if args.tiny:
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       tie_word_embeddings=True)
    else:
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                       max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(dev):
        return transformers.LlamaForCausalLM(cfg)


def token_data(vocab: int, seq: int, rows: int, steps: int) -> list:
    """``rows`` sequences per step of a fixed random successor chain with 10% noise (learnable, so
    the loss falls), made before the timing starts: the same on every process and for every K."""
    succ = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    batches = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        out = torch.empty(rows, seq, dtype=torch.long)
        out[:, 0] = torch.randint(0, vocab, (rows,), generator=g)
        noise = torch.rand(rows, seq, generator=g) < 0.1
        rand = torch.randint(0, vocab, (rows, seq), generator=g)
        for t in range(1, seq):
            out[:, t] = torch.where(noise[:, t], rand[:, t], succ[out[:, t - 1]])
        batches.append(out)
    return batches


def run_config(args, gather: str, matmuls: str, parallel, dev) -> dict:
    from lowbit.lowp import prepare_lowp
    from lowbit.lowp.fsdp import shard_model
    from lowbit.train.loop import TrainConfig, train
    from lowbit.train.objectives import causal_lm_objective

    world = parallel.world
    if args.global_batch % (world * args.micro_batch):
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of {world} processes x "
                         f"--micro-batch {args.micro_batch}")
    accum = args.global_batch // (world * args.micro_batch)
    model = build_model(args, dev)
    n_params = sum(p.numel() for p in model.parameters())
    if matmuls != "bf16":
        prepare_lowp(model, matmuls, block=args.block)
    shard_model(model, gather=gather, reduce_dtype=args.reduce_dtype)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    data = token_data(model.config.vocab_size, args.seq, args.global_batch, args.steps)
    per_micro = args.global_batch // accum   # rows of one micro-step over all processes

    def batches(k: int) -> dict:
        step, micro = divmod(k, accum)
        return {"input_ids": data[step][micro * per_micro: (micro + 1) * per_micro]}

    cfg = TrainConfig(steps=args.steps, lr=args.lr, grad_accum=accum, save_every=10**9, seed=0,
                      autocast="bf16" if dev.type == "cuda" else "none")
    res = train(model, batches, causal_lm_objective("ce"), {"weights": list(model.parameters())}, cfg,
                progress=False, parallel=parallel)
    timed = res.history[args.warmup_steps:]
    secs = sum(h["seconds"] for h in timed)
    tokens = sum(h["tokens"] for h in timed)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    peaks = [None] * world
    import torch.distributed as dist

    dist.all_gather_object(peaks, peak)
    row = {"gather": gather, "matmuls": matmuls, "params": n_params, "processes": world, "grad_accum": accum,
           "gathered_as": gather if world > 1 else "nothing (one process: the weights as they are)",
           "tokens_per_step": args.global_batch * args.seq, "step_ms": 1e3 * secs / max(len(timed), 1),
           "tokens_per_second_per_gpu": tokens / secs / world if secs else float("nan"),
           "peak_gib_per_gpu": peaks, "losses": [h["loss"] for h in res.history]}
    del model, res
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


SAME_RUN = ("steps", "global_batch", "micro_batch", "seq", "vocab", "lr", "block", "tiny", "reduce_dtype")


def compare(rows: list, ref_path: str, args) -> dict:
    """Scaling efficiency and loss-curve agreement of ``rows`` against the 1-GPU run's JSON."""
    ref_json = json.loads(Path(ref_path).read_text())
    differ = [k for k in SAME_RUN if ref_json["args"].get(k) != getattr(args, k)]
    if differ:
        print(f"not compared with {ref_path}: it ran with other {', '.join(differ)}")
        return {}
    ref = {(r["gather"], r["matmuls"]): r for r in ref_json["runs"]}
    out = {}
    for r in rows:
        base = ref.get((r["gather"], r["matmuls"]))
        if base is None or base["processes"] != 1:
            continue
        n = min(len(base["losses"]), len(r["losses"]))
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], base["losses"][:n]))
        out[f"{r['gather']} gather, {r['matmuls']} matmuls"] = {
            "scaling_efficiency": r["tokens_per_second_per_gpu"] / base["tokens_per_second_per_gpu"],
            "loss_max_rel_diff_vs_1gpu": diff, "steps_compared": n}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu (gloo)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 Llama (for the CPU)")
    ap.add_argument("--configs", default=",".join(f"{g}/{m}" for g, m in CONFIGS),
                    help="GATHER/MATMULS pairs, comma-separated (default: all six)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing (compilation)")
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, for every K")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per process per forward")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--block", type=int, default=256, help="Hadamard block of the HALO matmuls")
    ap.add_argument("--reduce-dtype", default="auto", help="gradient reduction dtype: auto (= bf16 on CUDA), fp32")
    ap.add_argument("--json", help="write the figures here (rank 0)")
    ap.add_argument("--compare", help="the 1-GPU run's JSON: scaling efficiency and loss agreement")
    args = ap.parse_args()
    if args.tiny:
        args.seq = min(args.seq, 64)

    from lowbit.train.distributed import init_distributed

    parallel, dev = init_distributed(args.device)
    main_rank = parallel.is_main
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "processes": parallel.world}
    if main_rank:
        print(f"{parallel.world} x {env['device']}, torch {env['torch']}; global batch {args.global_batch} x {args.seq} "
              f"tokens, micro-batch {args.micro_batch}", flush=True)
    rows = []
    for pair in args.configs.split(","):
        gather, _, matmuls = pair.partition("/")
        t0 = time.time()
        row = run_config(args, gather, matmuls or "bf16", parallel, dev)
        rows.append(row)
        if main_rank:
            print(f"gather {gather:<5} matmuls {row['matmuls']:<6} {row['params'] / 1e9:.2f}B  "
                  f"{row['step_ms']:8.1f} ms/step  {row['tokens_per_second_per_gpu']:10,.0f} tokens/s/GPU  peak "
                  f"{max(row['peak_gib_per_gpu']):.1f} GiB/GPU  loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}"
                  f"  ({time.time() - t0:.0f} s)", flush=True)
    versus = compare(rows, args.compare, args) if args.compare and Path(args.compare).is_file() and parallel.world > 1 else {}
    if main_rank:
        for name, v in versus.items():
            print(f"vs 1 GPU, {name}: scaling efficiency {v['scaling_efficiency']:.3f}, loss curve max relative "
                  f"difference {v['loss_max_rel_diff_vs_1gpu']:.2e} over {v['steps_compared']} steps")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args), "runs": rows,
                                                   "versus_1gpu": versus}, indent=1))
    parallel.barrier()
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
