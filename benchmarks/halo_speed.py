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

3. ``--fused-compare``: the operand preparation of one training step (the six operands of the
   three matmuls: X, W; E_Y, W^T; E_Y^T, X^T, each rotated, reduced and cast to codes) through the
   fused Triton kernel (``kernels/triton_operand.py``) and through the unfused torch passes, with
   and without the rotations (the rotations' cost), for FP8 HALO-1 and INT8 HALO-2; and the layer
   rows of those two recipes again with the unfused preparation, and the INT8 rows with
   ``torch._int_mm`` and a separate dequantizing pass instead of lowbit's fused INT8 GEMM.

    python3 benchmarks/halo_speed.py --json halo_speed.json          # on the H100, about 3-4 minutes
    python3 benchmarks/halo_speed.py --skip-e2e --tokens 2048        # the layer table only
    python3 benchmarks/halo_speed.py --fused-compare --skip-e2e --no-torchao --json halo_fused.json
    TRITON_INTERPRET=1 python3 benchmarks/halo_speed.py --device cpu --backend kernel --fused-compare \
        --skip-e2e --tokens 32 --shapes 64x48 --block 16 --warmup 0 --iters 1   # the script, interpreted
"""
from __future__ import annotations

import argparse
import json
import os
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
UNFUSED_ROWS = (("lowbit fp8 HALO-1 unfused", "fp8:1", "auto"), ("lowbit int8 HALO-2 unfused", "int8:2", "auto"))
# the INT8 rows again with torch._int_mm and a separate dequantizing pass instead of the fused Triton GEMM
INT_MM_ROWS = (("lowbit int8 HALO-0 _int_mm", "int8:0", "auto"), ("lowbit int8 HALO-2 _int_mm", "int8:2", "auto"))
PREP_RECIPES = (("fp8 HALO-1", "fp8:1"), ("int8 HALO-2", "int8:2"))


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


class fused_preparation:
    """Within the block, lowp's operands go to the fused kernel on ``dev`` (``on``) or the unfused
    torch passes (not ``on``); the CPU takes the kernel under TRITON_INTERPRET=1 only."""

    def __init__(self, on: bool, dev):
        self.on, self.dev = on, dev

    def __enter__(self):
        from lowbit.lowp import operand

        self.saved = operand.FUSED_ON
        operand.FUSED_ON = (self.dev.type,) if self.on and _fused_available(self.dev) else ()

    def __exit__(self, *exc):
        from lowbit.lowp import operand

        operand.FUSED_ON = self.saved


def _fused_available(dev) -> bool:
    from lowbit.lowp.operand import fused_kernels

    return (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and fused_kernels() is not None


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

    text, backend = kind.split("|")[:2]
    return LowpLinear.from_linear(lin, parse_recipe(text, block=block, backend=backend))


def _backend(b: str, args) -> str:
    return args.backend if b == "auto" else b


def layer_table(args, dev) -> list:
    fused = _fused_available(dev)
    rows = [("bf16 nn.Linear", "bf16")] + [(name, f"{t}|{_backend(b, args)}|fused") for name, t, b in LOWBIT_ROWS]
    if args.fused_compare:
        rows += [(name, f"{t}|{_backend(b, args)}|unfused") for name, t, b in UNFUSED_ROWS]
        rows += [(name, f"{t}|{_backend(b, args)}|intmm") for name, t, b in INT_MM_ROWS]
    print(f"operand preparation: {'fused Triton kernel' if fused else 'unfused torch passes (no Triton here)'}")
    try:
        if args.no_torchao:
            raise ImportError("--no-torchao")
        import torchao  # noqa: F401

        rows += [("torchao Float8Linear tensorwise", "torchao"),
                 ("torchao Float8Linear tensorwise compiled", "torchao-compiled")]
    except ImportError as e:
        print(f"torchao rows left out ({e})")
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

            from lowbit.lowp import matmul

            saved = matmul.INT8_FUSED_ON
            try:
                if kind.endswith("|intmm"):
                    matmul.INT8_FUSED_ON = ()
                with fused_preparation(not kind.endswith("|unfused"), dev):
                    ms = time_step(step, dev, args.warmup, args.iters)
            except Exception as e:  # a peer's failure is a row, not the end of the run
                print(f"{k}->{n} {name}: failed ({type(e).__name__}: {e})")
                continue
            finally:
                matmul.INT8_FUSED_ON = saved
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
        for name, rotated, plain in (("fp8 HALO-1", "lowbit fp8 HALO-1", "lowbit fp8 HALO-0"),
                                     ("int8 HALO-2", "lowbit int8 HALO-2", "lowbit int8 HALO-0")):
            if rotated in t and plain in t:
                s[f"rotation share {name} (step vs HALO-0)"] = (t[rotated] - t[plain]) / t[rotated]
        if bf16 and "lowbit fp8 HALO-1 emulated" in t:
            s["emulated fp8 / bf16 time"] = t["lowbit fp8 HALO-1 emulated"] / bf16
        summary[shape] = s
    return summary


def step_preparations(recipe, x, w, gy, rotated: bool) -> list:
    """The operand preparations of one training step as ``LowpMatmuls`` makes them: (function,
    operand, spec, block, bytes moved by the fused kernel), transposed views as the layer passes
    them; X and E_Y (and W at HALO-0) in one pass for both of their matmuls where ``paired``."""
    from lowbit.lowp.linear import paired
    from lowbit.lowp.operand import prepare_operand, prepare_pair

    b1 = recipe.block if rotated and recipe.level >= 1 else 1
    b2 = recipe.block if rotated and recipe.level >= 2 else 1
    ops = []
    for role, t, block in (("x", x, b1), ("w", w, b1 if recipe.level >= 1 else 1), ("g", gy, b1)):
        spec, size = recipe.spec(role), t.numel()
        if paired(recipe, role):
            ops.append((prepare_pair, t, spec, block if role != "w" else 1, size * (2 * t.element_size() + 2)))
        else:
            other = b2 if role in ("x", "g") else b1
            ops.append((prepare_operand, t, spec, block, size * (2 * t.element_size() + 1)))
            ops.append((prepare_operand, t.t(), spec, other, size * (2 * t.element_size() + 1)))
    return ops


def _run_preparations(ops) -> list:
    """The operands of ``ops`` (prepare_pair gives two)."""
    out = []
    for fn, t, spec, block, _ in ops:
        if fn.__name__ == "prepare_pair":
            out += fn(t, spec, block)
        else:
            out.append(fn(t, spec, block, codes=True))
    return out


def _same_codes(ops, dev) -> bool:
    """Whether the fused kernel's codes and scales are the unfused path's, bit for bit, at this size."""
    with fused_preparation(True, dev):
        fused = _run_preparations(ops)
    with fused_preparation(False, dev):
        plain = _run_preparations(ops)
    return all(torch.equal(f.values.view(torch.uint8), p.values.view(torch.uint8)) and torch.equal(f.scale, p.scale)
               for f, p in zip(fused, plain))


def prep_table(args, dev, layers: list) -> list:
    """Operand preparation of one training step, fused vs unfused, rotated vs not (ms)."""
    from lowbit.lowp import parse_recipe

    if not _fused_available(dev):
        print("operand preparation table skipped: the fused kernel needs CUDA and Triton (or TRITON_INTERPRET=1)")
        return []
    out = []
    for k, n in args.shapes:
        shape = f"{k}->{n}"
        x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
        x[:, :4] *= 20
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        gy = torch.randn(args.tokens, n, device=dev, dtype=torch.bfloat16) * 1e-2
        step_ms = {r["name"]: r["ms"] for r in layers if r["shape"] == shape}
        for label, text in PREP_RECIPES:
            recipe = parse_recipe(text, block=args.block)
            row = {"shape": shape, "recipe": label}
            moved = sum(op[-1] for op in step_preparations(recipe, x, w, gy, True))
            row["codes identical to the unfused path"] = _same_codes(step_preparations(recipe, x, w, gy, True), dev)
            for fused in (True, False):
                for rotated in (True, False):
                    ops = step_preparations(recipe, x, w, gy, rotated)
                    with fused_preparation(fused, dev):
                        row[f"{'fused' if fused else 'unfused'} {'rotated' if rotated else 'plain'} ms"] = \
                            time_step(lambda: _run_preparations(ops), dev, args.warmup, args.iters)
            f_rot, f_plain = row["fused rotated ms"], row["fused plain ms"]
            row["fused speed-up over unfused"] = row["unfused rotated ms"] / f_rot
            row["fused GB/s (2 reads + code writes)"] = moved / (f_rot / 1e3) / 1e9
            row["fused rotation ms"] = f_rot - f_plain
            step = step_ms.get(f"lowbit {label}")
            if step:
                row["fused rotation share of the step"] = (f_rot - f_plain) / step
                row["fused preparation share of the step"] = f_rot / step
            out.append(row)
            print(f"{shape:<12} {label:<12} prep fused {f_rot:7.3f} ms (plain {f_plain:6.3f}) | unfused "
                  f"{row['unfused rotated ms']:7.3f} ms (plain {row['unfused plain ms']:6.3f}) | x"
                  f"{row['fused speed-up over unfused']:.2f} | {row['fused GB/s (2 reads + code writes)']:6.0f} GB/s"
                  + (f" | rotation {100 * row['fused rotation share of the step']:.1f}% of the step" if step else "")
                  + f" | codes {'identical' if row['codes identical to the unfused path'] else 'DIFFER'}", flush=True)
        del x, w, gy
    return out


def llama_1b(vocab: int, dev):
    """Built on ``dev`` directly (random initialisation of 1B parameters on a CPU takes tens of seconds)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(dev):
        return transformers.LlamaForCausalLM(cfg)


def _graphed(step, fwd_bwd_opt, dev):
    """``step`` warmed up on a side stream, then ``fwd_bwd_opt`` captured in one CUDA graph; its
    replay is the timed step (what CUDA graphs save is the host's launch work)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):      # Triton compiles, the allocator settles
            step()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd_bwd_opt()
    return graph.replay


def _profile(step, dev, steps: int = 3) -> dict:
    """GPU busy time per step (the sum of its kernels) against its wall time: a host-bound step has
    a GPU idle between launches."""
    from torch.profiler import ProfilerActivity, profile

    _sync(dev)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(dev)
    wall = (time.perf_counter() - t) / steps * 1e3
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in events) / steps / 1e3
    launches = sum(e.count for e in events) / steps
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:10]
    return {"wall_ms_profiled": wall, "gpu_busy_ms": busy, "kernels_per_step": launches,
            "top_kernels": [{"name": e.key[:80], "ms_per_step": e.self_device_time_total / steps / 1e3,
                             "count_per_step": e.count / steps} for e in top]}


def end_to_end(args, dev) -> list:
    from lowbit.lowp import prepare_lowp

    out = []
    graph = args.e2e_graph and dev.type == "cuda"
    for name, recipe in (("bf16", None), ("lowbit fp8 HALO-1", "fp8:1")):
        model = llama_1b(args.vocab, dev)
        n_params = sum(p.numel() for p in model.parameters())
        if recipe:
            prepare_lowp(model, recipe, block=args.block)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda", capturable=graph)
        ids = torch.randint(0, args.vocab, (args.e2e_batch, args.e2e_seq), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(0))
        model.train()

        def fwd_bwd_opt():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()

        def step():
            fwd_bwd_opt()
            opt.zero_grad(set_to_none=True)

        row = {"name": name + (" (CUDA graph)" if graph else ""), "params": n_params}
        if graph:
            try:
                step = _graphed(step, fwd_bwd_opt, dev)
            except Exception as e:  # a host sync or an uncapturable op: reported, the row is eager
                row["name"], row["graph_error"] = name, f"{type(e).__name__}: {str(e)[:200]}"
                print(f"end to end {name}: CUDA graph capture failed ({row['graph_error']}); eager", flush=True)
        ms = time_step(step, dev, args.e2e_warmup, args.e2e_iters)
        row.update(ms_per_step=ms, tokens_per_second=args.e2e_batch * args.e2e_seq / (ms / 1e3),
                   peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan"))
        print(f"end to end {row['name']:<33} {n_params / 1e9:.2f}B params  {ms:8.1f} ms/step  "
              f"{row['tokens_per_second']:10,.0f} tokens/s  peak {row['peak_gib']:.1f} GiB", flush=True)
        if args.e2e_profile:
            row["profile"] = _profile(step, dev)
            pr = row["profile"]
            print(f"  profiled: {pr['wall_ms_profiled']:.1f} ms/step wall, GPU busy {pr['gpu_busy_ms']:.1f} ms "
                  f"({pr['gpu_busy_ms'] / pr['wall_ms_profiled']:.0%}), {pr['kernels_per_step']:.0f} kernels/step")
            for k in pr["top_kernels"]:
                print(f"    {k['ms_per_step']:8.2f} ms  x{k['count_per_step']:<5.0f} {k['name']}")
        out.append(row)
        del model, opt, step
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
    return out


def _apply_tuning(args) -> None:
    """The kernel tunings given on the command line, set where the kernels read them."""
    if args.operand_tile or args.operand_warps:
        from lowbit.kernels import triton_operand

        triton_operand.TILE = args.operand_tile or triton_operand.TILE
        triton_operand.WARPS = args.operand_warps or triton_operand.WARPS
    if args.int8_config:
        from lowbit.kernels import triton_int8_mm

        triton_int8_mm.DEFAULT_CONFIG = args.int8_config


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
    ap.add_argument("--skip-layers", action="store_true", help="the end-to-end run only")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--e2e-seq", type=int, default=2048)
    ap.add_argument("--e2e-warmup", type=int, default=3)
    ap.add_argument("--e2e-iters", type=int, default=8)
    ap.add_argument("--e2e-graph", action="store_true",
                    help="both end-to-end rows as one CUDA graph per training step (no host launch cost)")
    ap.add_argument("--e2e-profile", action="store_true",
                    help="GPU busy time against wall time per end-to-end step, and the top kernels")
    ap.add_argument("--backend", default="auto", choices=("auto", "kernel"),
                    help="lowbit rows' backend (kernel: the FP8/INT8 kernels on any device that has them)")
    ap.add_argument("--fused-compare", action="store_true",
                    help="operand preparation fused vs unfused, and the target rows with the unfused preparation")
    ap.add_argument("--no-torchao", action="store_true", help="leave the torchao rows out")
    ap.add_argument("--operand-tile", type=int, help="elements per program of the operand kernel (a tuning "
                    "that halo_breakdown.py measures; default: the kernel's)")
    ap.add_argument("--operand-warps", type=int, help="warps per program of the operand kernel")
    ap.add_argument("--int8-config", type=lambda t: tuple(int(v) for v in t.split(",")),
                    help="BM,BN,BK,stages,warps of the fused INT8 GEMM (default: the kernel's)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    _apply_tuning(args)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    print(f"{env['device']}, torch {env['torch']}, {args.tokens} tokens, Hadamard block {args.block}", flush=True)
    rows = [] if args.skip_layers else layer_table(args, dev)
    summary = summarize_layers(rows)
    for shape, s in summary.items():
        print(f"\n{shape}: speed-up over bf16 nn.Linear (fwd+bwd)")
        for k, v in s.items():
            print(f"  {k:<46} {v:6.3f}")
    prep = []
    if args.fused_compare:
        print("\noperand preparation of one step (X, W, E_Y for the three matmuls), median ms:")
        prep = prep_table(args, dev, rows)
    e2e = [] if args.skip_e2e else end_to_end(args, dev)
    targets = {}
    for shape, s in summary.items():
        targets[f"{shape} fp8 HALO-1 >= 1.4x"] = s.get("lowbit fp8 HALO-1", 0) >= 1.4
        targets[f"{shape} int8 HALO-2 >= 1.5x"] = s.get("lowbit int8 HALO-2", 0) >= 1.5
        if "rotation share fp8 HALO-1 (step vs HALO-0)" in s:
            targets[f"{shape} rotations <= 15% (fp8 HALO-1)"] = s["rotation share fp8 HALO-1 (step vs HALO-0)"] <= 0.15
        if "emulated fp8 / bf16 time" in s:
            targets[f"{shape} emulated fp8 <= 2x bf16"] = s["emulated fp8 / bf16 time"] <= 2.0
        for p in prep:
            if p["shape"] == shape:
                targets[f"{shape} {p['recipe']} fused codes = unfused codes"] = p["codes identical to the unfused path"]
            if p["shape"] == shape and "fused rotation share of the step" in p:
                targets[f"{shape} {p['recipe']} fused rotations <= 15% of the step"] = \
                    p["fused rotation share of the step"] <= 0.15
        ao = s.get("torchao Float8Linear tensorwise compiled") or s.get("torchao Float8Linear tensorwise")
        if ao:
            targets[f"{shape} lowbit fp8 HALO-0 >= torchao"] = s.get("lowbit fp8 HALO-0", 0) >= ao
    if len(e2e) == 2:
        ratio = e2e[1]["tokens_per_second"] / e2e[0]["tokens_per_second"]
        print(f"\nend to end fp8 HALO-1 / bf16 tokens/s: {ratio:.3f}")
        targets["end to end fp8 HALO-1 >= 1.2x"] = ratio >= 1.2
    print("\ntargets:")
    for k, v in targets.items():
        print(f"  {'met   ' if v else 'MISSED'} {k}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args), "layers": rows,
                                               "summary": summary, "preparation": prep, "end_to_end": e2e,
                                               "targets": targets}, indent=1))


if __name__ == "__main__":
    main()
