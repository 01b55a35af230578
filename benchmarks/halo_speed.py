"""HALO low-precision training speed on one GPU (lowbit.lowp), peers measured in the same run.

1. One linear layer at Llama-3-8B's MLP shapes (4096->14336 and 14336->4096), 8,192 tokens, bf16
   weights and inputs, forward + backward (both gradients): bf16 ``nn.Linear``; lowbit FP8 (E4M3
   forward, E5M2 gradients, per-tensor scales) at HALO-0/1/2; lowbit INT8 (per-row scales) at
   HALO-0/2; lowbit's emulated FP8 HALO-1 (lowbit's quantizers + float32 matmuls); torchao's
   ``Float8Linear`` (tensorwise scaling), eager and torch.compile'd, when torchao imports.
   Reported: ms per step, speed-up over bf16, the rotations' share of the low-precision step
   ((HALO-1 - HALO-0) / HALO-1, and HALO-2 vs HALO-0 for INT8) and the emulation's cost over bf16.
2. End to end: a Llama-architecture model with random weights built from a config (16 layers,
   hidden 2048, intermediate 8192, 32 heads / 8 KV heads, vocabulary 32000: about 1.0B parameters),
   AdamW on fp32 master weights under bf16 autocast, batch x sequence tokens per step: bf16 vs FP8
   HALO-1 tokens/s (every decoder linear low precision; the output head stays bf16).

    python3 benchmarks/halo_speed.py --json halo_speed.json          # on the H100, about 3-4 minutes
    python3 benchmarks/halo_speed.py --skip-e2e --tokens 2048        # the layer table only
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

SHAPES = ((4096, 14336), (14336, 4096))
LOWBIT_ROWS = (("lowbit fp8 HALO-0", "fp8:0", "auto"), ("lowbit fp8 HALO-1", "fp8:1", "auto"),
               ("lowbit fp8 HALO-2", "fp8:2", "auto"), ("lowbit int8 HALO-0", "int8:0", "auto"),
               ("lowbit int8 HALO-2", "int8:2", "auto"), ("lowbit fp8 HALO-1 emulated", "fp8:1", "emulate"))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_step(fn, dev, warmup: int, iters: int) -> float:
    """Median ms of ``fn()`` over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _layer(kind: str, k: int, n: int, dev, block: int):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False).to(dev, torch.bfloat16)
    if kind == "bf16":
        return lin
    if kind.startswith("torchao"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        model = convert_to_float8_training(nn.Sequential(lin), config=Float8LinearConfig.from_recipe_name("tensorwise"))
        return torch.compile(model) if kind.endswith("compiled") else model
    from lowbit.lowp import LowpLinear, parse_recipe

    text, backend = kind.split("|")
    return LowpLinear.from_linear(lin, parse_recipe(text, block=block, backend=backend))


def layer_table(args, dev) -> list:
    rows = [("bf16 nn.Linear", "bf16")] + [(name, f"{t}|{b}") for name, t, b in LOWBIT_ROWS]
    try:
        import torchao  # noqa: F401

        rows += [("torchao Float8Linear tensorwise", "torchao"),
                 ("torchao Float8Linear tensorwise compiled", "torchao-compiled")]
    except ImportError:
        print("torchao is not importable: its rows are left out")
    out = []
    for k, n in args.shapes:
        x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
        x[:, :4] *= 20  # a few outlier channels, as LLM activations have
        gy = torch.randn(args.tokens, n, device=dev, dtype=torch.bfloat16) * 1e-2
        for name, kind in rows:
            layer = _layer(kind, k, n, dev, args.block)
            xin = x.clone().requires_grad_()

            def step():
                layer(xin).backward(gy)
                xin.grad = None
                for p in layer.parameters():
                    p.grad = None

            try:
                ms = time_step(step, dev, args.warmup, args.iters)
            except Exception as e:  # a peer's failure is a row, not the end of the run
                print(f"{k}->{n} {name}: failed ({type(e).__name__}: {e})")
                continue
            out.append({"shape": f"{k}->{n}", "name": name, "ms": ms})
            print(f"{k}->{n:<6} {name:<42} {ms:8.3f} ms", flush=True)
            del layer
        del x, gy
    return out


def summarize_layers(rows: list) -> dict:
    summary = {}
    for shape in sorted({r["shape"] for r in rows}):
        t = {r["name"]: r["ms"] for r in rows if r["shape"] == shape}
        bf16 = t.get("bf16 nn.Linear")
        s = {name: bf16 / ms for name, ms in t.items() if bf16}
        s["rotation share fp8 HALO-1"] = (t["lowbit fp8 HALO-1"] - t["lowbit fp8 HALO-0"]) / t["lowbit fp8 HALO-1"]
        s["rotation share int8 HALO-2"] = (t["lowbit int8 HALO-2"] - t["lowbit int8 HALO-0"]) / t["lowbit int8 HALO-2"]
        s["emulated fp8 / bf16 time"] = t["lowbit fp8 HALO-1 emulated"] / bf16
        summary[shape] = s
    return summary


def llama_1b(vocab: int, dev):
    """Built on ``dev`` directly (random initialisation of 1B parameters on a CPU takes tens of seconds)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(dev):
        return transformers.LlamaForCausalLM(cfg)


def end_to_end(args, dev) -> list:
    from lowbit.lowp import prepare_lowp

    out = []
    for name, recipe in (("bf16", None), ("lowbit fp8 HALO-1", "fp8:1")):
        model = llama_1b(args.vocab, dev)
        n_params = sum(p.numel() for p in model.parameters())
        if recipe:
            prepare_lowp(model, recipe, block=args.block)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
        ids = torch.randint(0, args.vocab, (args.e2e_batch, args.e2e_seq), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(0))
        model.train()

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = time_step(step, dev, args.e2e_warmup, args.e2e_iters)
        tok_s = args.e2e_batch * args.e2e_seq / (ms / 1e3)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        out.append({"name": name, "ms_per_step": ms, "tokens_per_second": tok_s, "params": n_params, "peak_gib": peak})
        print(f"end to end {name:<20} {n_params / 1e9:.2f}B params  {ms:8.1f} ms/step  {tok_s:10,.0f} tokens/s  "
              f"peak {peak:.1f} GiB", flush=True)
        del model, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", type=lambda t: [tuple(int(v) for v in p.split("x")) for p in t.split(",")],
                    default=list(SHAPES), help="in x out features, comma-separated (default 4096x14336,14336x4096)")
    ap.add_argument("--block", type=int, default=256, help="Hadamard block size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--e2e-seq", type=int, default=2048)
    ap.add_argument("--e2e-warmup", type=int, default=3)
    ap.add_argument("--e2e-iters", type=int, default=8)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    print(f"{env['device']}, torch {env['torch']}, {args.tokens} tokens, Hadamard block {args.block}", flush=True)
    rows = layer_table(args, dev)
    summary = summarize_layers(rows)
    for shape, s in summary.items():
        print(f"\n{shape}: speed-up over bf16 nn.Linear (fwd+bwd)")
        for k, v in s.items():
            print(f"  {k:<46} {v:6.3f}")
    e2e = [] if args.skip_e2e else end_to_end(args, dev)
    targets = {}
    for shape, s in summary.items():
        targets[f"{shape} fp8 HALO-1 >= 1.4x"] = s.get("lowbit fp8 HALO-1", 0) >= 1.4
        targets[f"{shape} int8 HALO-2 >= 1.5x"] = s.get("lowbit int8 HALO-2", 0) >= 1.5
        targets[f"{shape} rotations <= 15% (fp8 HALO-1)"] = s["rotation share fp8 HALO-1"] <= 0.15
        targets[f"{shape} emulated fp8 <= 2x bf16"] = s["emulated fp8 / bf16 time"] <= 2.0
        ao = s.get("torchao Float8Linear tensorwise compiled") or s.get("torchao Float8Linear tensorwise")
        if ao:
            targets[f"{shape} lowbit fp8 HALO-0 >= torchao"] = s["lowbit fp8 HALO-0"] >= ao
    if len(e2e) == 2:
        ratio = e2e[1]["tokens_per_second"] / e2e[0]["tokens_per_second"]
        print(f"\nend to end fp8 HALO-1 / bf16 tokens/s: {ratio:.3f}")
        targets["end to end fp8 HALO-1 >= 1.2x"] = ratio >= 1.2
    print("\ntargets:")
    for k, v in targets.items():
        print(f"  {'met   ' if v else 'MISSED'} {k}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args), "layers": rows,
                                               "summary": summary, "end_to_end": e2e, "targets": targets}, indent=1))


if __name__ == "__main__":
    main()
