"""The CPU packed path before and after the fast encode/decode, same process and tensor:

    OMP_NUM_THREADS=1 python3 benchmarks/bench_packed_cpu.py

before: element encode = the fast quantize, then float64 code arithmetic (Format.encode_values);
block encode = the float64 reference; decode = float64 Format.decode_codes (+ reference block
values). now: lowbit.encode / lowbit.decode (compiled bit arithmetic, compiled table look-up).
Prints a markdown table (Melem/s, best of the repeats, one thread, 2^22 fp32 elements).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import lowbit  # noqa: E402
torch.set_num_threads(1)
x=torch.randn(2**22)*3
def best(fn, r=5):
    fn(); ts=[]
    for _ in range(r):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return x.numel()/min(ts)/1e6
f=lowbit.format('e4m3fn')
e=lowbit.encode(x,f)
rows=[('encode e4m3', lambda: f.encode_values(lowbit.quantize(x,f).double()).to(torch.uint8), lambda: lowbit.encode(x,f)),
      ('decode e4m3', lambda: f.decode_codes(e.codes.to(torch.int64)).float(), lambda: lowbit.decode(e))]
xb=x.view(-1,32); eb=lowbit.encode(xb,'mxfp4')
rows.append(('encode mxfp4', lambda: lowbit.encode(xb,'mxfp4',backend='reference'), lambda: lowbit.encode(xb,'mxfp4')))
rows.append(('decode mxfp4', lambda: lowbit.decode(eb,backend='reference'), lambda: lowbit.decode(eb)))
xn=x.view(-1,16); en=lowbit.encode(xn,'nvfp4')
rows.append(('encode nvfp4', lambda: lowbit.encode(xn,'nvfp4',backend='reference'), lambda: lowbit.encode(xn,'nvfp4')))
rows.append(('decode nvfp4', lambda: lowbit.decode(en,backend='reference'), lambda: lowbit.decode(en)))
print('| op | before (float64 codes) Melem/s | now Melem/s | speed-up |')
print('|---|---:|---:|---:|')
for name, old, new in rows:
    o=best(old,2); n=best(new)
    print(f'| {name} | {o:.1f} | {n:.1f} | {n/o:.0f}x |', flush=True)
