"""GPTQ speed on SmolLM2-135M's architecture: the whole block-by-block pipeline (capture, Hessians,
GPTQ of all 210 linears, propagation), timed.

    python3 benchmarks/gptq_speed.py --device cuda --calib 128 --seq-len 512 --scheme w3g64
    python3 benchmarks/gptq_speed.py --device cpu --calib 128 --seq-len 512 --scheme w3g64

The weights are random (speed does not depend on their values; the 93 MB real model cannot travel to
the GPU machine) and so are the calibration token ids: this measures time, not quality.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).parent / "configs" / "smollm2-135m.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--scheme", default="w3g64")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--loop", default="auto", choices=["auto", "plain"],
                    help="GPTQ column loop: auto (fused where the format allows) or plain (the per-column "
                         "quantizer calls, the baseline)")
    ap.add_argument("--calibration", default="auto", choices=["auto", "sequential", "parallel"])
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.ptq import gptq as gptq_module
    from lowbit.ptq.pipeline import quantize_model
    from lowbit.quant.plan import Plan

    gptq_module.DEFAULT_LOOP = args.loop
    torch.manual_seed(0)
    cfg = LlamaConfig(**json.loads(CONFIG.read_text()))
    model = LlamaForCausalLM(cfg).to(args.device).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.calib, args.seq_len), device=args.device)
    batches = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, args.calib, args.batch_size)]
    if args.device == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    res = quantize_model(model, Plan.from_scheme(args.scheme), batches, "gptq", progress=False,
                         calibration=args.calibration)
    if args.device == "cuda":
        torch.cuda.synchronize()
    total = time.time() - t
    gptq_only = sum(l.seconds for l in res.layers)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"{name}: GPTQ {args.scheme} ({args.loop} loop, {res.calibration} calibration) of SmolLM2-135M architecture, {args.calib}x{args.seq_len} calibration tokens: "
          f"{total:.1f} s total ({gptq_only:.1f} s in the per-layer GPTQ loops, {len(res.layers)} layers)")


if __name__ == "__main__":
    main()
