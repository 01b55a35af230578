"""The CPU packed path before and after the fast encode/decode, same process and tensor:

    OMP_NUM_THREADS=1 python3 benchmarks/bench_packed_cpu.py

before: element encode = the fast quantize, then float64 code arithmetic (Format.encode_values);
block encode = the float64 reference; decode = float64 Format.decode_codes (+ reference block
values); nf4 quantize/encode = the float64 reference. now: lowbit.encode / lowbit.decode / quantize
(compiled bit arithmetic, compiled table look-up, compiled codebook loop).
Prints a markdown table (Melem/s, best of the repeats, one thread, 2^22 fp32 elements).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import lowbit  # noqa: E402


def best(fn, n: int, repeat: int = 5) -> float:
    """Melem/s of the fastest of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times) / 1e6


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(2**22) * 3
    f = lowbit.format("e4m3fn")
    e = lowbit.encode(x, f)
    xb, xn = x.view(-1, 32), x.view(-1, 16)
    eb, en = lowbit.encode(xb, "mxfp4"), lowbit.encode(xn, "nvfp4")
    rows = [
        ("encode e4m3", lambda: f.encode_values(lowbit.quantize(x, f).double()).to(torch.uint8),
         lambda: lowbit.encode(x, f)),
        ("decode e4m3", lambda: f.decode_codes(e.codes.to(torch.int64)).float(), lambda: lowbit.decode(e)),
        ("encode mxfp4", lambda: lowbit.encode(xb, "mxfp4", backend="reference"), lambda: lowbit.encode(xb, "mxfp4")),
        ("decode mxfp4", lambda: lowbit.decode(eb, backend="reference"), lambda: lowbit.decode(eb)),
        ("encode nvfp4", lambda: lowbit.encode(xn, "nvfp4", backend="reference"), lambda: lowbit.encode(xn, "nvfp4")),
        ("decode nvfp4", lambda: lowbit.decode(en, backend="reference"), lambda: lowbit.decode(en)),
        ("quantize nf4", lambda: lowbit.quantize(x, "nf4", backend="reference"), lambda: lowbit.quantize(x, "nf4")),
        ("encode nf4", lambda: lowbit.encode(x, "nf4", backend="reference"), lambda: lowbit.encode(x, "nf4")),
    ]
    print("| op | before (float64 codes) Melem/s | now Melem/s | speed-up |")
    print("|---|---:|---:|---:|")
    for name, old, new in rows:
        o, nw = best(old, x.numel(), 2), best(new, x.numel())
        print(f"| {name} | {o:.1f} | {nw:.1f} | {nw / o:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
