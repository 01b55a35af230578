"""Block Hadamard rotation throughput against a plain copy of the same tensor, measured in one run.

    python3 benchmarks/bench_hadamard.py --device cuda      # 2^28 fp32 elements per shape
    python3 benchmarks/bench_hadamard.py --device cpu --elements 4194304

Each row times ``lowbit.transforms.hadamard.rotate`` (random signs + block Walsh-Hadamard over the
last dim) on a (rows, n) fp32 tensor and ``x * 1.0`` on the same tensor; the ratio is copy time /
rotation time (1.0 = as fast as a copy; the issue's goal is >= 0.5, i.e. within 2x). On CUDA with
Triton, ``rotate`` runs the fused kernel (kernels/triton_hadamard.py); the "torch" columns time the
Kronecker-matmul route (``method="kron"``) on the same tensor. ``--variants`` adds the kernel's other
settings: its tensor-core ``dot`` method (precisions, tiles) and other tile sizes of the butterfly.

Full-width sizes that are not powers of two (``H_m ⊗ H_p``, Paley ``m``) run one fused kernel
(``triton_hadamard.paley_fwht``; "rotate route" names the default ``mix`` it picks for the shape); their
"two-pass" column times the route used before it (the block kernel for ``H_p``, then a torch batched
matmul for ``H_m``). ``--paley-variants`` prints a second table with that kernel's other settings (how
``H_m`` mixes the runs, group size, tile, warps).
"""
from __future__ import annotations

import argparse
import time

import torch

from lowbit.transforms import hadamard
from lowbit.transforms.hadamard import block_fwht, random_signs, rotate

SHAPES = [(576, 64), (1536, 512), (4096, 16), (4096, 64), (4096, 512), (4096, 1024), (4096, 4096), (128, 128),
          # full-width rotations of sizes that are not powers of two (Paley factor as a dense matmul)
          (384, 384), (576, 576), (1536, 1536), (2304, 2304), (5120, 5120), (14336, 14336)]
# (label, keyword arguments of triton_hadamard.paley_fwht; "tile" = padded elements per program)
PALEY_VARIANTS = [("adds", {"mix": "adds"}), ("adds group 2", {"mix": "adds", "group": 2}),
                  ("tree", {"mix": "tree"}), ("tree 8 warps", {"mix": "tree", "num_warps": 8}),
                  ("left", {"mix": "left"}), ("batched", {"mix": "batched"}),
                  ("right tile 8192", {"mix": "right", "tile": 8192}), ("fma 4 warps", {"mix": "fma", "num_warps": 4})]
# (precision, method, elements per program or None for the default) of the kernel's other settings
VARIANTS = [("split", "dot", None), ("split", "dot", 4096), ("ieee", "dot", None), ("split", "butterfly", 2048),
            ("split", "butterfly", 4096), ("split", "butterfly", 16384)]


def _time(fn, device: str, reps: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--elements", type=int, default=2 ** 28)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", action="store_true", help="also time the kernel's other precisions/methods")
    ap.add_argument("--paley-variants", action="store_true",
                    help="only the sizes that are not powers of two, with the fused kernel's other settings")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    x0 = torch.zeros(1, 64, device=args.device)
    route = "triton kernel" if hadamard._use_triton(x0, 64, "auto") else "torch kron"
    print(f"{name}; fp32, about {args.elements:,} elements per row of the table; torch {torch.__version__}; "
          f"rotate runs: {route}")
    if args.paley_variants:
        return _paley_variants(args)
    head = ("| n | block | copy Gelem/s | torch rotate Gelem/s | torch / copy | two-pass / copy | rotate route "
            "| rotate Gelem/s | rotate / copy |")
    rule = "|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    variants = VARIANTS if args.variants and route == "triton kernel" else []
    for prec, meth, tile in variants:
        head += f" {meth}{f' {prec}' if meth == 'dot' else ''}{'' if tile is None else f' tile {tile}'} / copy |"
        rule += "---:|"
    print(head)
    print(rule)
    for n, b in SHAPES:
        rows = max(1, args.elements // n)
        x = torch.randn(rows, n, device=args.device)
        s = random_signs(n, 0, device=args.device)
        el = rows * n
        t_copy = _time(lambda: x * 1.0, args.device, args.reps)
        t_torch = _time(lambda: block_fwht(x, b, method="kron", signs=s), args.device, args.reps)
        t_rot = _time(lambda: rotate(x, b, s), args.device, args.reps)
        two = ""   # the route before the fused Paley kernel, for sizes that are not powers of two
        via = "block kernel" if route == "triton kernel" else "torch"
        if not hadamard.is_power_of_two(b):
            t_two = _time(lambda: hadamard._paley_two_pass(x, b, "auto", s, False, False), args.device, args.reps)
            two = f"{t_copy / t_two:.2f}"
            if route == "triton kernel":
                from lowbit.kernels import triton_hadamard as th
                from lowbit.transforms import paley
                via = f"paley {th.paley_route(*paley.split_order(b))}"
        line = (f"| {n} | {b} | {el / t_copy / 1e9:.1f} | {el / t_torch / 1e9:.1f} | {t_copy / t_torch:.2f} "
                f"| {two} | {via} | {el / t_rot / 1e9:.1f} | {t_copy / t_rot:.2f} |")
        for prec, meth, tile in variants:
            from lowbit.kernels import triton_hadamard as th
            tile_rows = None if tile is None else max(1, tile // b)
            try:
                t = _time(lambda: th.block_fwht(x, b, s, precision=prec, method=meth, rows=tile_rows), args.device,
                          args.reps)
                line += f" {t_copy / t:.2f} |"
            except Exception as e:  # a variant that does not compile for this block is reported, not fatal
                line += f" failed ({type(e).__name__}) |"
        print(line, flush=True)
        del x


def _paley_variants(args) -> None:
    """The fused Paley kernel's settings on the sizes that are not powers of two (ratios to a copy)."""
    from lowbit.kernels import triton_hadamard as th
    from lowbit.transforms import paley
    cols = " | ".join(f"{v} / copy" for v, _ in PALEY_VARIANTS)
    print(f"| n | m x p | copy Gelem/s | rotate's mix | rotate / copy | {cols} |")
    print("|---:|---:|---:|---|---:|" + "---:|" * len(PALEY_VARIANTS))
    for n, b in SHAPES:
        if hadamard.is_power_of_two(b):
            continue
        m, p = paley.split_order(b)
        x = torch.randn(max(1, args.elements // n), n, device=args.device)
        s = random_signs(n, 0, device=args.device)
        hop = th.paley_operand(paley.hadamard_of_order(m), False, x.device)
        t_copy = _time(lambda: x * 1.0, args.device, args.reps)
        t_rot = _time(lambda: rotate(x, b, s), args.device, args.reps)
        line = f"| {n} | {m} x {p} | {x.numel() / t_copy / 1e9:.1f} | {th.paley_route(m, p)} | {t_copy / t_rot:.2f} |"
        for _, kw in PALEY_VARIANTS:
            kw = dict(kw)
            tile = kw.pop("tile", None)
            if tile is not None:   # blocks per program: padded elements per block as the route holds them
                per_block = sum(th.paley_fma_runs(m)) * p if kw.get("mix") == "fma" else th.paley_pad(m) * p
                kw["rows"] = 1 << (max(1, tile // per_block).bit_length() - 1)
            try:
                t = _time(lambda: th.paley_fwht(x, hop, m, p, s, **kw), args.device, args.reps)
                line += f" {t_copy / t:.2f} |"
            except Exception as e:  # a setting that does not compile for this size is reported, not fatal
                line += f" failed ({type(e).__name__}) |"
        print(line, flush=True)
        del x


if __name__ == "__main__":
    main()
