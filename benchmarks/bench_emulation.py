"""Emulation throughput: lowbit's fast kernels against a plain copy and the peers, same run.

    python3 benchmarks/bench_emulation.py                 # CPU, 4M fp32 elements (PYTHONPATH=src if
    python3 benchmarks/bench_emulation.py --device cuda   # GPU, 2^28 fp32 elements   not installed)

Every row quantizes the same fp32 tensor (torchao's rows take it as bf16, the input its MX/NVFP4
conversion is written for) and reports elements per second, the fraction of the plain copy
``x * 1.0`` (the memory-bandwidth bound: one read, one write), and ratios against torch's native
float8 round trip and against each peer doing the same operation. Peers that do not install are
skipped with a printed note. Timing, after warm-up calls (which include compilation): GPU, CUDA events around
batches of 5 back-to-back calls (steady state: the host's launch work overlaps the device's), median
of the batches; CPU, perf_counter around each call, best of the repeats (a shared machine's other
processes preempt ours for whole scheduler quanta).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import lowbit  # noqa: E402

ELEMENT = [("e4m3", "e4m3fn", 4, 3), ("e5m2", "e5m2", 5, 2), ("e2m1", "e2m1fn", 2, 1), ("e3m2", "e3m2fn", 3, 2)]
MODES = [("nearest_even", "nearest", 1), ("stochastic", "stochastic", 5)]
BLOCKS = [("mxfp8", "mxfp8_e4m3"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")]
# packed path: encode (x -> codes + scale codes) and decode (codes -> values), nearest_even
PACKED = [("e4m3", "e4m3fn"), ("e2m1", "e2m1fn"), ("int8", "int8"), ("nf4", "nf4"), ("mxfp8", "mxfp8_e4m3"),
          ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")]
CODEBOOKS = [("nf4", "nf4")]


class Timer:
    def __init__(self, device: str, repeat: int, warmup: int = 2, batch: int = 5):
        self.device, self.repeat, self.warmup, self.batch = device, repeat, warmup, batch

    def __call__(self, fn, repeat=None) -> float:
        """Median seconds per call."""
        repeat = repeat or self.repeat
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            # steady state: `batch` calls back to back between two events, so the host's launch
            # work overlaps the device's (as in a training loop); the same for every row
            torch.cuda.synchronize()
            for _ in range(repeat):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(self.batch):
                    fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3 / self.batch)
        else:
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            # CPU: best of the repeats. On a shared 2-core machine other processes preempt ours in
            # scheduler quanta of several ms, which a median would report as our time
            return min(times)
        return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=None, help="elements (default 2^22 CPU, 2^28 GPU)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--no-peers", action="store_true", help="skip qtorch, pychop and torchao")
    ap.add_argument("--no-eager", action="store_true", help="CPU: skip the eager (uncompiled) lowbit rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU; default: torch's)")
    ap.add_argument("--formats", default=None,
                    help="comma-separated subset of e4m3,e5m2,e2m1,e3m2,int8,nf4,mxfp8,mxfp4,nvfp4 (default all)")
    ap.add_argument("--no-packed", action="store_true", help="skip the encode/decode rows")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.formats:
        keep = set(args.formats.split(","))
        ELEMENT[:] = [e for e in ELEMENT if e[0] in keep]
        BLOCKS[:] = [b for b in BLOCKS if b[0] in keep]
        PACKED[:] = [p for p in PACKED if p[0] in keep]
        CODEBOOKS[:] = [c for c in CODEBOOKS if c[0] in keep]
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu")
        return 2
    n = args.n or (2**28 if dev == "cuda" else 2**22)
    repeat = args.repeat or (10 if dev == "cuda" else 15)
    slow_repeat = 3 if dev == "cpu" else 5
    timer = Timer(dev, repeat)
    torch.manual_seed(0)
    x = (torch.randn(n, device=dev) * 3).contiguous()
    xb16 = x.to(torch.bfloat16)
    out = torch.empty_like(x)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows: list = []
    notes: list = []

    def add(name, group, fn, repeat=None, op=None):
        try:
            t = timer(fn, repeat)
        except Exception as e:  # a peer that breaks on this machine: say so, keep going
            notes.append(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            return
        rows.append({"name": name, "group": group, "op": op, "seconds": t, "elem_per_s": n / t})
        print(f"  {name:<40s} {n / t / 1e6:12.1f} Melem/s", flush=True)

    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or 'cpu'}"
          f" | torch {torch.__version__} | threads {torch.get_num_threads()} | n = {n} fp32", flush=True)

    # --- baselines ---------------------------------------------------------------------------------
    add("copy x*1.0", "bound", lambda: torch.mul(x, 1.0, out=out))
    add("torch e4m3fn round trip", "torch", lambda: x.to(torch.float8_e4m3fn).float(), op="e4m3/nearest_even")
    try:
        cast_c = torch.compile(lambda t: t.to(torch.float8_e4m3fn).float())
        cast_c(x)
        add("torch.compile e4m3fn round trip", "torch", lambda: cast_c(x), op="e4m3/nearest_even")
    except Exception as e:
        notes.append(f"torch.compile'd cast: not available ({type(e).__name__})")

    # --- lowbit ------------------------------------------------------------------------------------
    def lb(fmt, mode, **kw):
        g = gen if mode == "stochastic" else None
        return lambda: lowbit.quantize(x, fmt, mode, generator=g, **kw)

    t0 = time.time()
    for short, fmt, _, _ in ELEMENT:
        for mode, _, _ in MODES:
            add(f"lowbit {short} {mode}", "lowbit", lb(fmt, mode), op=f"{short}/{mode}")
    for short, fmt in BLOCKS:
        for mode in ("nearest_even", "stochastic"):
            add(f"lowbit {short} {mode}", "lowbit", lb(fmt, mode), op=f"{short}/{mode}")
    for short, fmt in CODEBOOKS:   # deterministic modes only on the fast paths
        add(f"lowbit {short} nearest_even", "lowbit", lb(fmt, "nearest_even"), op=f"{short}/nearest_even")
    if any(b[0] == "nvfp4" for b in BLOCKS):
        # delayed scaling: the per-tensor amax given (one pass over x instead of two)
        amax_t = torch.where(torch.isfinite(x), x.abs(), 0).amax().float()
        amax = float(amax_t)
        add("lowbit nvfp4 nearest_even, tensor_amax=float (one pass)", "lowbit-variant",
            lambda: lowbit.quantize(x, "nvfp4", tensor_amax=amax), op="nvfp4/nearest_even")
        add("lowbit nvfp4 nearest_even, tensor_amax=tensor (one pass + a read of it)", "lowbit-variant",
            lambda: lowbit.quantize(x, "nvfp4", tensor_amax=amax_t), op="nvfp4/nearest_even")
    if dev == "cuda":
        from lowbit.kernels import triton_quant
        rounds = triton_quant.N_ROUNDS
        triton_quant.N_ROUNDS = 10
        add("lowbit e4m3 stochastic (Philox 10 rounds)", "lowbit-variant", lb("e4m3fn", "stochastic"),
            op="e4m3/stochastic")
        triton_quant.N_ROUNDS = rounds
    if not args.no_packed:
        # encode writes 1-byte codes (+ a scale code per block): it moves 5 B per element where the
        # copy moves 8, decode reads 1 B and writes 4
        for short, fmt in PACKED:
            add(f"lowbit encode {short} nearest_even", "lowbit-encode", lambda fmt=fmt: lowbit.encode(x, fmt),
                op=f"{short}/encode")
            if short == "e4m3":
                add(f"lowbit encode {short} stochastic", "lowbit-encode",
                    lambda fmt=fmt: lowbit.encode(x, fmt, "stochastic", generator=gen), op=f"{short}/encode")
            enc = lowbit.encode(x, fmt)
            add(f"lowbit decode {short}", "lowbit-decode", lambda enc=enc: lowbit.decode(enc), op=f"{short}/decode")
            del enc
    if dev == "cpu":
        notes.append(f"lowbit CPU rows include torch.compile warm-up outside the timing "
                     f"(first calls took {time.time() - t0:.0f} s in all, cached on disk afterwards)")
        if not args.no_eager:
            os.environ["LOWBIT_CPU_COMPILE"] = "0"
            for short, fmt, _, _ in ELEMENT[:1]:  # the first element format only
                for mode, _, _ in MODES:
                    add(f"lowbit {short} {mode} (eager, no compile)", "lowbit-eager", lb(fmt, mode),
                        repeat=3, op=f"{short}/{mode}")
            if any(b[0] == "mxfp4" for b in BLOCKS):
                add("lowbit mxfp4 nearest_even (eager, no compile)", "lowbit-eager",
                    lb("mxfp4", "nearest_even"), repeat=3, op="mxfp4/nearest_even")
            os.environ.pop("LOWBIT_CPU_COMPILE")

    # --- peers ---------------------------------------------------------------------------------------
    if not args.no_peers:
        try:
            from qtorch.quant import float_quantize
            for short, _, e, m in ELEMENT:
                for mode, qmode, _ in MODES:
                    add(f"qtorch {short} {mode}", "qtorch",
                        (lambda e=e, m=m, qmode=qmode: float_quantize(x, exp=e, man=m, rounding=qmode)),
                        op=f"{short}/{mode}")
        except Exception as e:
            notes.append(f"qtorch: not available ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pychop
                pychop.backend("torch")
            for short, _, e, m in ELEMENT:
                for mode, _, rmode in MODES:
                    ch = pychop.Chop(exp_bits=e, sig_bits=m, rmode=rmode)
                    add(f"pychop {short} {mode}", "pychop", (lambda ch=ch: ch(x)), repeat=slow_repeat,
                        op=f"{short}/{mode}")
        except Exception as e:
            notes.append(f"pychop: not available ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchao.prototype.mx_formats.mx_tensor import MXTensor
                from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
            x2 = xb16.view(-1, 4096)
            add("torchao mxfp8 to_mx (bf16 in)", "torchao",
                lambda: MXTensor.to_mx(x2, torch.float8_e4m3fn, 32), repeat=slow_repeat, op="mxfp8/nearest_even")
            add("torchao mxfp4 to_mx (bf16 in)", "torchao",
                lambda: MXTensor.to_mx(x2, torch.float4_e2m1fn_x2, 32), repeat=slow_repeat, op="mxfp4/nearest_even")
            add("torchao nvfp4 to_nvfp4 (bf16 in)", "torchao",
                lambda: NVFP4Tensor.to_nvfp4(x2, per_tensor_scale=per_tensor_amax_to_scale(x2.abs().amax().float())),
                repeat=slow_repeat, op="nvfp4/nearest_even")
        except Exception as e:
            notes.append(f"torchao: not available ({type(e).__name__}: {str(e).splitlines()[0][:100]})")

    # --- table ---------------------------------------------------------------------------------------
    by = {r["name"]: r for r in rows}
    copy = by.get("copy x*1.0")
    cast = by.get("torch e4m3fn round trip")
    peers = {}
    for r in rows:
        if r["group"] in ("qtorch", "pychop", "torchao") and r["op"]:
            peers.setdefault(r["op"], {})[r["group"]] = r
    unit, scale = ("Gelem/s", 1e9) if dev == "cuda" else ("Melem/s", 1e6)
    print()
    print(f"## Emulation throughput, {'GPU ' + torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'},"
          f" {n} fp32 elements ({'2^%d' % round(math.log2(n)) if n & (n - 1) == 0 else n}), torch {torch.__version__}")
    print()
    print(f"| what | {unit} | x copy | x torch cast | x qtorch | x pychop | x torchao |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rate = r["elem_per_s"]
        cells = [f"{rate / scale:,.1f}", f"{rate / copy['elem_per_s']:.2f}" if copy else "",
                 f"{rate / cast['elem_per_s']:.2f}" if cast else ""]
        for peer in ("qtorch", "pychop", "torchao"):
            p = peers.get(r["op"], {}).get(peer) if r["group"].startswith("lowbit") else None
            cells.append(f"{rate / p['elem_per_s']:.1f}" if p else "")
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    if notes:
        print()
        for note in notes:
            print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "n": n, "torch": torch.__version__, "rows": rows, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
