"""lowbit.arith against Pychop in one run: every elementary function and reduction, and fault injection.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/numerics_vs_pychop.py            # CPU, 4M elements
    python benchmarks/numerics_vs_pychop.py --faults-only --device cuda                 # GPU fault injection

Pychop is pychop.np.float_point.Chop_ (the MATLAB chop port, its fastest NumPy path) with
``gc.collect`` switched off: it calls it in every rounding, which costs ~0.1 s per call in a process
that has imported torch; switching it off only makes Pychop faster. Same inputs (already in the
format), same format and rounding mode; the first lowbit call of each function, which compiles its
fused kernel, is timed apart. Reductions: lowbit with accum_every=None (float64 then one rounding, as
Pychop) against Pychop; lowbit's sequential (every addition rounded, along axis 0 of a 2048-row
matrix) and pairwise orders are listed for their cost, Pychop has no equivalent. Fault injection:
flipping bits of the codes at several bit error rates against a copy of the codes (on CUDA: the Triton
kernel of kernels/triton_faults, which copies and flips in one pass; best of --repeat, at least 3); each row also gives
the flips made (bits changed), their expected number and the chunks of units the kernel walks.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import lowbit
from lowbit import arith
from lowbit.arith.chop import RMODES

DOMAINS = {"arcsin": (-1, 1), "arccos": (-1, 1), "arctanh": (-0.99, 0.99), "arccosh": (1, 30),
           "log": (0.01, 100), "log2": (0.01, 100), "log10": (0.01, 100), "log1p": (-0.99, 30),
           "exp": (-10, 10), "expm1": (-10, 10), "sinh": (-10, 10), "cosh": (-10, 10)}
PREC = {"fp16": "h", "bf16": "b", "e4m3": "q43", "e5m2": "q52", "e8m23": "s"}


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _row(name, ours, theirs, note=""):
    ratio = f"{theirs / ours:8.1f}x" if theirs else "       -"
    th = f"{theirs:9.3f}" if theirs else "        -"
    print(f"{name:<24}{ours:9.3f}{th}{ratio}  {note}", flush=True)


def run_functions(n: int, fmt: str, mode: int, repeat: int, only=None):
    import gc

    import pychop.np.float_point as pfp
    gc_collect = gc.collect
    gc.collect = lambda *a: 0  # Pychop's per-call gc.collect (see the module doc)
    try:
        pc = pfp.Chop_(PREC[fmt], rmode=mode, subnormal=True)
        rounding = RMODES[mode]
        rng = np.random.default_rng(0)
        print(f"\n{n:,} elements, {fmt}, rmode {mode} ({rounding}), {torch.get_num_threads()} threads")
        print(f"{'function':<24}{'lowbit s':>9}{'Pychop s':>9}{'ratio':>9}  (first lowbit call, compiling)")
        ratios = []
        names = arith.elementary.UNARY + arith.elementary.EXACT_UNARY + arith.elementary.BINARY
        for name in names:
            if only and name not in only:
                continue
            lo, hi = DOMAINS.get(name, (-10, 10))
            x = lowbit.quantize(rng.uniform(lo, hi, n), fmt)
            args = (x,)
            if name in arith.elementary.BINARY:
                y = lowbit.quantize(rng.uniform(0.25, 4, n) if name != "power" else rng.uniform(-2, 2, n), fmt)
                args = (np.abs(x) + 0.5, y) if name == "power" else (x, y)
                args = tuple(lowbit.quantize(a, fmt) for a in args)
            fn = getattr(arith, name)
            t0 = time.perf_counter()
            ours_val = fn(*args, fmt, rounding)
            first = time.perf_counter() - t0
            ours = _best(lambda: fn(*args, fmt, rounding), repeat)
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                theirs_val = getattr(pc, name)(*[a.copy() for a in args])
                theirs = _best(lambda: getattr(pc, name)(*[a.copy() for a in args]), repeat)
            same = np.mean((ours_val == theirs_val) | (np.isnan(ours_val) & np.isnan(theirs_val)))
            ratios.append(theirs / ours)
            _row(name, ours, theirs, f"({first:.1f} s)  identical: {100 * same:.4f}%")
        x = lowbit.quantize(rng.uniform(0.5, 1.5, n), fmt)
        for name in ("cumsum", "cumprod", "prod", "mean", "var", "std"):
            if only and name not in only:
                continue
            fn = getattr(arith, name)
            fn(x, fmt, accum_every=None, rounding=rounding)
            ours = _best(lambda: fn(x, fmt, accum_every=None, rounding=rounding), repeat)
            theirs = _best(lambda: getattr(pc, name)(x.copy()), repeat)
            ratios.append(theirs / ours)
            _row(name + " (one rounding)", ours, theirs)
        if only:
            print(f"ratio over Pychop: min {min(ratios):.1f}x, median {float(np.median(ratios)):.1f}x")
            return
        xm = x[: (n // 2048) * 2048].reshape(2048, -1)
        for name in ("cumsum", "prod", "mean", "var"):
            fn = getattr(arith, name)
            _row(name + " sequential", _best(lambda: fn(xm, fmt, axis=0, rounding=rounding), 1), None,
                 f"every operation rounded, {xm.shape[0]} steps of {xm.shape[1]}")
        for name in ("prod", "mean", "var", "std"):
            fn = getattr(arith, name)
            _row(name + " pairwise", _best(lambda: fn(x, fmt, order="pairwise", rounding=rounding), 1), None,
                 "every operation rounded")
        print(f"ratio over Pychop: min {min(ratios):.1f}x, median {float(np.median(ratios)):.1f}x")
    finally:
        gc.collect = gc_collect


def run_public_api(n: int, fmt: str, repeat: int):
    """pychop.exp(x, pychop.Chop(...)): Pychop's documented front door (LightChop + math_func)."""
    import pychop
    f = lowbit.format(fmt)
    ch = pychop.Chop(f.exp, f.man, rmode=1)
    x = lowbit.quantize(np.random.default_rng(0).uniform(-10, 10, n), fmt)
    arith.exp(x, fmt)
    ours = _best(lambda: arith.exp(x, fmt), repeat)
    theirs = _best(lambda: pychop.exp(x, ch), 1)
    _row("exp (pychop.exp + Chop)", ours, theirs, "Pychop's public API")


def run_faults(n: int, device: str, repeat: int):
    """arith.flip_bits (on CUDA: a copy plus the Triton kernel for 0 < p <= 1/16) against codes.clone()."""
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nfault injection on {n:,} codes ({where}): time against a copy of the codes")
    print(f"{'format / rate':<32}{'inject s':>10}{'copy s':>10}{'copy/inject':>12}{'flips':>12}{'expected':>12}"
          f"{'chunks':>10}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = [("e4m3fn", torch.uint8, p, "bit") for p in (1e-9, 1e-7, 1e-5, 1e-3)]
    rows += [("e4m3fn", torch.uint8, 1e-3, "element")]
    rows += [("bf16", torch.int32, p, "bit") for p in (1e-9, 1e-7, 1e-5, 1e-3)]
    codes = None
    for fmt, dtype, p, per in rows:
        f = lowbit.format(fmt)
        if codes is None or codes.dtype != dtype:
            codes = None    # free the previous codes first (2^28 int32 codes are 1 GiB)
            codes = torch.randint(0, 2**f.bits, (n,), device=device, dtype=torch.int64).to(dtype)
        mask = arith.field_mask(f, ("sign", "exponent", "mantissa"))
        diff = arith.flip_bits(codes, p, mask, per=per, seed=0) ^ codes
        pos = [b for b in range(mask.bit_length()) if mask >> b & 1]
        flips = sum(int(((diff >> b) & 1).sum()) for b in pos)
        del diff
        units = n * len(pos) if per == "bit" else n
        chunks = _fused_chunks(codes, p, units)
        sync()

        def inject():
            arith.flip_bits(codes, p, mask, per=per, seed=0)
            sync()

        def copy():
            codes.clone()
            sync()
        ti, tc = _best(inject, repeat), _best(copy, repeat)
        label = f"{fmt} p={p:g}" + (" per element" if per == "element" else "")
        print(f"{label:<32}{ti:10.5f}{tc:10.5f}{tc / ti:12.2f}{flips:12,}{p * units:12,.0f}{chunks:>10}", flush=True)


def _fused_chunks(codes, p: float, units: int) -> str:
    """Chunks of units the CUDA kernel walks (one lane each), or '-' where the sparse path runs."""
    if not codes.is_cuda:
        return "-"
    from lowbit.kernels import triton_faults
    if not triton_faults.claims(codes, p):
        return "-"
    return f"{-(-units // triton_faults.chunk_units(p)):,}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4_000_000, help="elements (default 4M)")
    ap.add_argument("--format", default="fp16", choices=sorted(PREC))
    ap.add_argument("--rmode", type=int, default=1, choices=[1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--faults-only", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated functions/reductions to time (no "
                    "sequential/pairwise rows, no fault injection): for iterating on a few")
    ap.add_argument("--public-api-only", action="store_true", help="only exp through pychop.exp(x, pychop.Chop)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fault-n", type=int, default=None, help="codes for fault injection (default: --n; "
                    "2**28 on cuda)")
    ap.add_argument("--fault-tunings", default=None,
                    help="space-separated MEAN_FLIPS,MAX_CHUNK,BLOCK,WARPS,TILE[,ONE_PASS] settings of kernels/triton_faults, each "
                    "timed in turn (a sweep for the defaults; the flips follow the law whatever the setting; ONE_PASS 0: torch "
                    "copies and the kernel only flips)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(a.threads)
    if a.public_api_only:
        return run_public_api(a.n, a.format, a.repeat)
    only = set(a.only.split(",")) if a.only else None
    if not a.faults_only:
        run_functions(a.n, a.format, a.rmode, a.repeat, only)
        if only:
            return
    n = a.fault_n or (2**28 if a.device == "cuda" else a.n)
    for tuning in (a.fault_tunings.split() if a.fault_tunings else [None]):
        if tuning:
            _set_fault_tuning(tuning)
        run_faults(n, a.device, max(a.repeat, 3))


def _set_fault_tuning(text: str) -> None:
    from lowbit.kernels import triton_faults as tf

    values = [int(v) for v in text.split(",")]
    tf.MEAN_FLIPS, tf.MAX_CHUNK, tf.BLOCK, tf.WARPS, tf.TILE = values[:5]
    tf.ONE_PASS = bool(values[5]) if len(values) > 5 else True
    print(f"\nkernels/triton_faults: MEAN_FLIPS={tf.MEAN_FLIPS} MAX_CHUNK={tf.MAX_CHUNK} BLOCK={tf.BLOCK} "
          f"WARPS={tf.WARPS} TILE={tf.TILE} ONE_PASS={tf.ONE_PASS}")


if __name__ == "__main__":
    main()
