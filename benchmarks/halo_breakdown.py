"""Where a HALO training step's time goes on the GPU, piece by piece (what halo_speed.py measures whole):

1. The three matmuls of one linear layer (forward X W^T, input gradient E_Y W, weight gradient
   E_Y^T X) at Llama-3-8B's MLP shapes: bf16 ``torch.mm`` against FP8 ``torch._scaled_mm``, INT8
   ``torch._int_mm`` alone and with lowbit's compiled dequantizing epilogue, and lowbit's Triton
   INT8 GEMM with the epilogue fused (``kernels/triton_int8_mm.py``) at each tile configuration;
   ms and TFLOP/s, speed-up over bf16.
2. The operand preparation of one step (fused Triton kernel, ``kernels/triton_operand.py``) for FP8
   HALO-1 and INT8 HALO-2 at several tile sizes and warp counts: ms and GB/s.

    python3 benchmarks/halo_breakdown.py --json halo_breakdown.json      # on the GPU, 2-3 minutes (an H200: 2.5)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from halo_speed import _run_preparations, step_preparations, time_step  # noqa: E402


def matmul_rows(args, dev) -> list:
    from lowbit.kernels import triton_int8_mm
    from lowbit.lowp.fused import int8_epilogue

    rows = []
    t = args.tokens
    for k, n in args.shapes:
        # (name, M, N, K) of C = A B^T with A (M, K), B (N, K) row-major
        for name, m_, n_, k_ in (("forward", t, n, k), ("input grad", t, k, n), ("weight grad", n, k, t)):
            a16 = torch.randn(m_, k_, device=dev, dtype=torch.bfloat16)
            b16 = torch.randn(n_, k_, device=dev, dtype=torch.bfloat16)
            a8, b8 = a16.to(torch.float8_e4m3fn), b16.to(torch.float8_e4m3fn)
            ai = torch.randint(-127, 128, (m_, k_), device=dev, dtype=torch.int8)
            bi = torch.randint(-127, 128, (n_, k_), device=dev, dtype=torch.int8)
            one = torch.tensor(1.0, device=dev)
            sa, sb = torch.rand(m_, 1, device=dev), torch.rand(1, n_, device=dev)
            cases = {
                "bf16 mm": lambda: a16 @ b16.t(),
                "fp8 _scaled_mm": lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                           out_dtype=torch.bfloat16),
                "int8 _int_mm": lambda: torch._int_mm(ai, bi.t()),
                "int8 _int_mm + epilogue": lambda: int8_epilogue(torch._int_mm(ai, bi.t()), sa, sb, torch.bfloat16),
            }
            for cfg in triton_int8_mm.CONFIGS:
                cases[f"int8 triton {cfg}"] = (lambda c=cfg: triton_int8_mm.int8_scaled_mm(ai, bi, sa, sb,
                                                                                            torch.bfloat16, config=c))
            flop = 2 * m_ * n_ * k_
            base = None
            for label, fn in cases.items():
                try:
                    ms = time_step(fn, dev, args.warmup, args.iters)
                except Exception as e:  # a tile configuration that does not fit this GPU's shared memory
                    print(f"{k}->{n} {name:<12} {label:<40} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                base = base or ms
                row = {"shape": f"{k}->{n}", "matmul": name, "kernel": label, "ms": ms,
                       "tflops": flop / ms / 1e9, "speed-up over bf16": base / ms}
                rows.append(row)
                print(f"{k}->{n:<6} {name:<12} {label:<40} {ms:7.3f} ms {row['tflops']:7.0f} TFLOP/s "
                      f"x{row['speed-up over bf16']:.2f}", flush=True)
            del a16, b16, a8, b8, ai, bi
    return rows


def prep_rows(args, dev) -> list:
    from lowbit.kernels import triton_operand
    from lowbit.lowp import parse_recipe

    rows = []
    saved = triton_operand.TILE, triton_operand.WARPS
    for k, n in args.shapes:
        x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        gy = torch.randn(args.tokens, n, device=dev, dtype=torch.bfloat16) * 1e-2
        for text in ("fp8:1", "int8:2"):
            recipe = parse_recipe(text, block=args.block)
            ops = step_preparations(recipe, x, w, gy, True)
            moved = sum(op[-1] for op in ops)
            for tile in args.tiles:
                for warps in args.warps:
                    triton_operand.TILE, triton_operand.WARPS = tile, warps
                    try:
                        ms = time_step(lambda: _run_preparations(ops), dev, args.warmup, args.iters)
                    except Exception as e:
                        print(f"{k}->{n} {text} tile {tile} warps {warps} failed: {type(e).__name__}: {str(e)[:100]}")
                        continue
                    finally:
                        triton_operand.TILE, triton_operand.WARPS = saved
                    rows.append({"shape": f"{k}->{n}", "recipe": text, "tile": tile, "warps": warps, "ms": ms,
                                 "GB/s": moved / ms / 1e6})
                    print(f"{k}->{n:<6} {text:<7} tile {tile:>6} warps {warps} {ms:7.3f} ms "
                          f"{moved / ms / 1e6:6.0f} GB/s", flush=True)
        del x, w, gy
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", type=lambda t: [tuple(int(v) for v in p.split("x")) for p in t.split(",")],
                    default=[(4096, 14336), (14336, 4096)])
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--tiles", type=lambda t: [int(v) for v in t.split(",")], default=[4096, 8192, 16384])
    ap.add_argument("--warps", type=lambda t: [int(v) for v in t.split(",")], default=[4, 8, 16])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-matmuls", action="store_true")
    ap.add_argument("--skip-prep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("halo_breakdown.py times CUDA kernels: no CUDA device here")
    dev = torch.device("cuda")
    out = {"environment": {"torch": torch.__version__, "device": torch.cuda.get_device_name()},
           "args": {k: v for k, v in vars(args).items()}}
    sections = (("matmuls", matmul_rows, args.skip_matmuls), ("preparation", prep_rows, args.skip_prep))
    for key, fn, skip in sections:
        if skip:
            continue
        out[key] = fn(args, dev)
        if args.json:   # after each section: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
