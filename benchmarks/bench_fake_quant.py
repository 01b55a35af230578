"""Fused fake quantization with learned scales (LSQ / LSQ+) on CUDA: throughput against a plain copy.

    python3 benchmarks/bench_fake_quant.py                  # W of 16384 x 16384 (2^28 fp32 elements)
    python3 benchmarks/bench_fake_quant.py --json OUT.json  # also write the numbers

Rows, for each grid (int4, int4 with zero points, int3, e2m1fn, e4m3fn) and each granularity
(groups of 64 columns, one scale per row): the Triton forward and backward
(kernels/triton_fake_quant.py) and the torch reference (kernels/fake_quant_ref.py); plus the copy
``x * 1.0`` (the bound: one read and one write) and today's path ``lowbit.quantize(x, "int4",
scale=s)`` with a per-row scale.

Each row gives elements/s and bytes/s with their ratios to the copy's. The forward moves what the
copy moves (read w, write out; plus the scales); the backward moves three tensors (read grad_out,
read w, write grad_w; plus the scales and their gradients), so its elements/s can reach at most 2/3
of the copy's: its bytes/s ratio is the one that measures how close it runs to memory speed.
``bits`` checks, once per row outside the timing, that the Triton forward and grad_w give the
reference's bits (nan as nan).

Timing: CUDA events around batches of back-to-back calls after warm-up (compilation included in
the warm-up), median over the batches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import lowbit  # noqa: E402


def timed(fn, repeat: int, batch: int = 5, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / batch)
    return statistics.median(times)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a.nan_to_num(0.0).view(torch.int32), b.nan_to_num(0.0).view(torch.int32))


def grids():
    """(label, kind, params, neg_zero, asymmetric) of the benchmarked grids."""
    from lowbit.quant.exp_round import exp_params
    from lowbit.quant import weight

    table = getattr(weight, "float_table", None) or getattr(weight, "_float_table")
    out = [("int4", "int", (-8, 7), False, False), ("int4-asym", "int", (0, 15), False, True),
           ("int3", "int", (-4, 3), False, False)]
    for name in ("e2m1fn", "e4m3fn"):
        fmt = lowbit.format(name)
        params = exp_params(fmt, table(fmt))
        if params is None:
            raise RuntimeError(f"{name}: the exponent arithmetic does not reproduce its table")
        out.append((name, "exp", params, fmt.has_negative_zero, False))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--group", type=int, default=64, help="group size of the grouped rows (default 64)")
    ap.add_argument("--repeat", type=int, default=10, help="batches of 5 calls timed per row")
    ap.add_argument("--no-reference", action="store_true", help="skip the torch reference rows")
    ap.add_argument("--json", metavar="OUT", help="write the numbers to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fake_quant: needs a CUDA device (the fused kernels run on NVIDIA GPUs); nothing measured")
        return 0
    try:
        from lowbit.kernels import fake_quant_ref as ref
        from lowbit.kernels import triton_fake_quant as tfq
    except ImportError as e:
        print(f"bench_fake_quant: needs the triton package ({e}); nothing measured")
        return 0

    R, C = args.rows, args.cols
    n = R * C
    torch.manual_seed(0)
    x = torch.randn(R, C, device="cuda")
    go = torch.randn(R, C, device="cuda")
    rows = []

    def add(name: str, seconds: float, nbytes: int, bits=None) -> None:
        rows.append(dict(name=name, ms=seconds * 1e3, gelem_s=n / seconds / 1e9, gbyte_s=nbytes / seconds / 1e9,
                         bytes_per_elem=nbytes / n, bits=bits))

    add("copy x*1.0", timed(lambda: x * 1.0, args.repeat), 8 * n)
    s_row = (x.abs().amax(dim=1, keepdim=True) / 7).contiguous()
    add("lowbit.quantize int4 scale=s (per row)",
        timed(lambda: lowbit.quantize(x, "int4", scale=s_row), args.repeat), 8 * n + 4 * R)

    for label, kind, params, neg_zero, asym in grids():
        lo, hi = ref.grid_range(kind, params)
        for group, gname in ((args.group, f"g{args.group}"), (C, "per-channel")):
            G = -(-C // group)
            pad = G * group - C
            xa = x.abs() if not pad else torch.cat([x.abs(), x.new_zeros(R, pad)], dim=1)
            amax = xa.reshape(R, G, group).amax(dim=2)
            del xa
            zero = None
            if asym:
                scale = (2 * amax / hi).clamp_min(1e-8).half().float().contiguous()
                zero = torch.full_like(scale, float(round(hi / 2)))
            else:
                scale = (amax / hi).clamp_min(1e-8).half().float().contiguous()
            sbytes = 4 * R * G * (2 if asym else 1)
            fwd = lambda: tfq.fake_quant_forward(x, scale, zero, group, kind, params, neg_zero)   # noqa: E731
            bwd = lambda: tfq.fake_quant_backward(go, x, scale, zero, group, kind, params, 0.01, neg_zero)  # noqa: E731
            rfwd = lambda: ref.fake_quant_forward(x, scale, zero, group, kind, params, neg_zero)   # noqa: E731
            rbwd = lambda: ref.fake_quant_backward(go, x, scale, zero, group, kind, params, 0.01, neg_zero)  # noqa: E731
            ok_f = same_bits(fwd(), rfwd())
            ok_b = same_bits(bwd()[0], rbwd()[0])
            torch.cuda.empty_cache()
            tag = f"{label} {gname}"
            add(f"triton forward  {tag}", timed(fwd, args.repeat), 8 * n + sbytes, ok_f)
            add(f"triton backward {tag}", timed(bwd, args.repeat), 12 * n + 2 * sbytes, ok_b)
            if not args.no_reference:
                add(f"torch reference forward  {tag}", timed(rfwd, max(2, args.repeat // 3)), 8 * n + sbytes)
                add(f"torch reference backward {tag}", timed(rbwd, max(2, args.repeat // 3)), 12 * n + 2 * sbytes)
            torch.cuda.empty_cache()

    copy = rows[0]
    print(f"{torch.cuda.get_device_name()}, W {R} x {C} = {n} fp32 elements")
    print(f"{'row':52s} {'ms':>8s} {'Gelem/s':>8s} {'x copy':>7s} {'GB/s':>7s} {'x copy B/s':>10s} {'bits':>5s}")
    for r in rows:
        r["ratio_elems"] = r["gelem_s"] / copy["gelem_s"]
        r["ratio_bytes"] = r["gbyte_s"] / copy["gbyte_s"]
        bits = "" if r["bits"] is None else ("same" if r["bits"] else "DIFF")
        print(f"{r['name']:52s} {r['ms']:8.3f} {r['gelem_s']:8.1f} {r['ratio_elems']:7.2f} {r['gbyte_s']:7.0f} "
              f"{r['ratio_bytes']:10.2f} {bits:>5s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows_cols=[R, C], elements=n, results=rows), f,
                      indent=1)
        print(f"wrote {args.json}")
    return 0 if all(r["bits"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
