"""Where lowbit's and llm-compressor's GPTQ differ, one layer at a time, on identical inputs.

    PYTHONPATH=src VENV/bin/python benchmarks/peer_gptq_layers.py --calib 8 --bits 3

For a few SmolLM2-135M linears, the Hessian H = 2 X^T X / n of the layer's real (float) inputs on
the same calibration ids is fed to
  * lowbit's ``gptq`` with its default symmetric grid (scale = absmax / qmax, fp16 scales),
  * lowbit's ``gptq`` with fp32 scales,
  * lowbit's ``gptq`` with llm-compressor's grid (scale = absmax / ((qmax - qmin) / 2), i.e.
    absmax / 7.5 for int4 and / 3.5 for int3, fp32 scales), through a WeightQuantizer subclass,
  * lowbit's ``gptq`` with its MSE-searched group scales (``int3:g64:mse``),
  * llm-compressor's own ``quantize_weight`` (min-max observer scales on the original weights),
all with act-order (static groups), damping 0.01, block 128, groups of 64, and round-to-nearest on
both grids for reference. Printed: the output-space error tr(D H D^T) / tr(W H W^T), D = W - Q.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peer_gptq import GROUP, ensure_hf_copy, load_dense, peer_grid_quantizer  # noqa: E402

from lowbit.quant.spec import QuantSpec  # noqa: E402
from lowbit.quant.weight import WeightQuantizer  # noqa: E402

HalfStepGrid = peer_grid_quantizer()


def rel_err(W, Q, H):
    D = W - Q
    return float(torch.einsum("ij,jk,ik->", D, H, D) / torch.einsum("ij,jk,ik->", W, H, W))


def peer_gptq(W, H, bits):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    qa = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP,
                          actorder="static")
    rows, cols = W.shape
    g = W.reshape(rows, cols // GROUP, GROUP)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), qa)
    Q, _, fallback = quantize_weight(W[None].clone(), H[None].clone(), scale[None], zp[None], None, qa,
                                     blocksize=128, percdamp=0.01)
    rtn = torch.clamp(torch.round(g / scale[..., None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale[..., None]
    return Q[0], rtn.reshape(rows, cols), bool(fallback[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--linears", default="self_attn.q_proj,self_attn.o_proj,mlp.down_proj")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from lowbit.data.corpus import calibration_batches
    from lowbit.ptq.gptq import HessianAccumulator, gptq

    model_dir = ensure_hf_copy()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = calibration_batches(tok, args.calib, args.seq_len, seed=0)
    model = load_dense(model_dir)
    names = [f"model.layers.{l}.{n}" for l in args.layers.split(",") for n in args.linears.split(",")]
    acc = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: acc[n].add(a[0])) for n in names]
    with torch.inference_mode():
        for i in range(0, ids.shape[0], 4):
            model(input_ids=ids[i: i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    spec = QuantSpec.parse(f"int{args.bits}:g{GROUP}")
    print(f"int{args.bits} g{GROUP}, act-order, damping 0.01; {args.calib}x{args.seq_len} calibration tokens; "
          "output-space relative error tr(D H D^T)/tr(W H W^T)")
    print("| layer | RTN absmax/qmax | RTN peer grid | lowbit GPTQ (fp16 scales) | lowbit GPTQ fp32 scales "
          "| lowbit GPTQ, peer grid | lowbit GPTQ, mse scales | llm-compressor GPTQ |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        W = model.get_submodule(n).weight.detach().float()
        H = acc[n].H
        r_rtn = rel_err(W, WeightQuantizer(spec).rtn(W)[0], H)
        a = rel_err(W, gptq(W, H, WeightQuantizer(spec), act_order=True).weight, H)
        b = rel_err(W, gptq(W, H, WeightQuantizer(spec, torch.float32), act_order=True).weight, H)
        c = rel_err(W, gptq(W, H, HalfStepGrid(spec, torch.float32), act_order=True).weight, H)
        mse = QuantSpec.parse(f"int{args.bits}:g{GROUP}:mse")
        e = rel_err(W, gptq(W, H, WeightQuantizer(mse), act_order=True).weight, H)
        Qp, rtn_p, fb = peer_gptq(W, H, args.bits)
        d = rel_err(W, Qp, H)
        print(f"| {n.replace('model.layers.', '')} | {r_rtn:.5f} | {rel_err(W, rtn_p, H):.5f} | {a:.5f} | {b:.5f} "
              f"| {c:.5f} | {e:.5f} | {d:.5f}{' (RTN fallback)' if fb else ''} |", flush=True)


if __name__ == "__main__":
    main()
