"""SmolLM2-135M: lowbit GPTQ int4:g32 -> GGUF Q4_0, read back by transformers and (when
llama-cpp-python is installed) run by llama.cpp itself, beside llama.cpp's own Q4_0 of the same
float model.

    PYTHONPATH=src python3 benchmarks/export_gguf.py [--method gptq|rtn] [--calib 32] [--out DIR]

Rows, all on the same held-out tokens (lowbit's evaluation split, 8,192 tokens in windows of 512,
the windows ``lowbit eval`` uses):

1. lowbit's quantized model (``lowbit.load``) -- the reference;
2. the exported Q4_0 GGUF read by transformers (``gguf_file=``): its weights are compared with
   lowbit's bit for bit, and its perplexity printed beside lowbit's;
3. the same GGUF run by llama.cpp (llama-cpp-python), perplexity and tokens/s of the evaluation;
4. the peer: the float model written as an F32 GGUF and quantized to Q4_0 by llama.cpp's own
   ``llama_model_quantize``, run the same way.

Rows 3 and 4 need llama-cpp-python. Its ``pip install`` compiles llama.cpp; a llama.cpp built apart
(``cmake -B build -DBUILD_SHARED_LIBS=ON && cmake --build build --target llama``) serves as well: put
the package's Python sources on PYTHONPATH and point ``LLAMA_CPP_LIB_PATH`` at the directory holding
libllama.so. ``--llama-convert PATH/convert_hf_to_gguf.py`` makes the peer's F32 GGUF with llama.cpp's
own converter (from the float model saved in Hugging Face format) instead of lowbit's exporter.
Without llama_cpp the llama.cpp rows print as not run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def lowbit_perplexity(model, tokens, context):
    from lowbit.evaluate.perplexity import perplexity_stats

    return perplexity_stats(model, tokens, context=context)["perplexity"]


def llama_cpp_perplexity(gguf_path: Path, tokens: torch.Tensor, context: int, threads: int):
    """Perplexity of llama.cpp on lowbit's windows (token ids fed directly, no re-tokenization) and
    the evaluation's tokens per second."""
    import numpy as np
    from llama_cpp import Llama

    from lowbit.evaluate.perplexity import windows

    llm = Llama(model_path=str(gguf_path), n_ctx=context, n_batch=context, logits_all=True, n_threads=threads,
                verbose=False)
    total, n, t0, evaluated = 0.0, 0, time.perf_counter(), 0
    ids = tokens.tolist()
    for b, e, first in windows(len(ids), context):
        llm.reset()
        llm.eval(ids[b:e])
        evaluated += e - b
        logits = np.asarray(llm.scores[: e - b], dtype=np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
        for pos in range(first, e):  # logits at pos-1 predict token pos
            total -= logp[pos - 1 - b, ids[pos]]
            n += 1
    seconds = time.perf_counter() - t0
    return math.exp(total / n), evaluated / seconds


def llama_cpp_q4_0(f32_gguf: Path, out: Path) -> None:
    """llama.cpp's own Q4_0 quantization of an F32 GGUF (its ``llama_model_quantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    rc = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def gguf_types(path: Path) -> dict:
    """Tensor type -> count in a GGUF file (what each side stores: llama.cpp's Q4_0 recipe keeps
    some tensors wider)."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    ap.add_argument("--calib", type=int, default=32, help="GPTQ calibration sequences of 512 tokens")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/lowbit_export_gguf", help="work directory (checkpoints, GGUF files)")
    ap.add_argument("--llama-convert", help="llama.cpp's convert_hf_to_gguf.py: the peer's F32 GGUF from its own "
                    "converter (default: lowbit's exporter writes it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lowbit
    from lowbit.data.corpus import evaluation_tokens
    from lowbit.export.checkpoint import save_quantized
    from lowbit.export.gguf_export import GGUFOptions, export_gguf
    from lowbit.jobs import EvalSettings, run_quantize
    from lowbit.models.loader import load_model

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    settings = EvalSettings(eval_tokens=args.eval_tokens, context=args.context)
    rows, notes = [], []
    ckpt = work / f"smollm2_int4g32_{args.method}"
    if not (ckpt / "lowbit.json").is_file():  # reuse a finished quantization on a rerun
        print(f"quantizing SmolLM2 int4:g32 with {args.method} ...", flush=True)
        run_quantize(None, "w4g32", args.method, str(ckpt), calib=args.calib, seq_len=512, settings=settings,
                     quiet=True, device="cpu")
    ck = lowbit.load(ckpt)
    tokens = evaluation_tokens(ck.tokenizer, args.eval_tokens)
    t = time.perf_counter()
    ppl_lowbit = lowbit_perplexity(ck.model, tokens, args.context)
    rows.append(("lowbit (its own checkpoint)", ppl_lowbit, tokens.numel() / (time.perf_counter() - t)))

    t = time.perf_counter()
    rep = export_gguf(ckpt, work / "lowbit_q4_0.gguf")
    export_s = time.perf_counter() - t
    info = rep.to_dict()
    print(f"exported {info['path']}: {info['bytes'] / 1e6:.1f} MB, types {info['types']}, lossless {info['lossless']} "
          f"({export_s:.1f} s, every tensor decoded again by gguf's reader)", flush=True)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(work, gguf_file="lowbit_q4_0.gguf", dtype=torch.float32).eval()
    mine, theirs = ck.model.state_dict(), hf.state_dict()
    differ = [n for n, p in mine.items() if n in theirs and not torch.equal(theirs[n], p)]
    missing = [n for n in mine if n not in theirs]
    t = time.perf_counter()
    ppl_hf = lowbit_perplexity(hf, tokens, args.context)
    rows.append(("GGUF Q4_0 read by transformers", ppl_hf, tokens.numel() / (time.perf_counter() - t)))
    print(f"transformers' reading of the GGUF: {len(mine) - len(differ) - len(missing)} of {len(mine)} tensors "
          f"equal to lowbit's bit for bit ({len(differ)} differ, {len(missing)} missing)", flush=True)
    del hf

    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError as e:
        have_llama = False
        notes.append(f"llama.cpp rows not run: llama-cpp-python is not importable ({e})")
    if have_llama:
        ppl, tps = llama_cpp_perplexity(work / "lowbit_q4_0.gguf", tokens, args.context, args.threads)
        rows.append(("GGUF Q4_0 (lowbit GPTQ) run by llama.cpp" if args.method == "gptq"
                     else "GGUF Q4_0 (lowbit RTN) run by llama.cpp", ppl, tps))
        # the same codes with the embedding in Q8_0, the type llama.cpp's Q4_0 recipe gives it: equal
        # tensor types on both sides, so the comparison below is at equal size
        export_gguf(ckpt, work / "lowbit_q4_0_q8emb.gguf", GGUFOptions(embedding_type="q8_0", allow_requantize=True))
        ppl, tps = llama_cpp_perplexity(work / "lowbit_q4_0_q8emb.gguf", tokens, args.context, args.threads)
        rows.append(("the same, embedding re-quantized to Q8_0 (llama.cpp's types), run by llama.cpp", ppl, tps))
        base = load_model(None)  # the float model, as an F32 GGUF, quantized by llama.cpp itself
        if args.llama_convert:
            hf_dir = work / "float_hf"
            base.model.save_pretrained(hf_dir)
            base.tokenizer.save_pretrained(hf_dir)
            subprocess.run([sys.executable, args.llama_convert, str(hf_dir), "--outfile", str(work / "float_f32.gguf"),
                            "--outtype", "f32"], check=True, stdout=subprocess.DEVNULL)
            converter = "llama.cpp's convert_hf_to_gguf.py"
        else:
            fdir = work / "float"
            save_quantized(base.model, {}, fdir, kind="causal_lm", tokenizer=base.tokenizer, float_storage="fp32",
                           extra={"model": base.name})
            export_gguf(fdir, work / "float_f32.gguf", GGUFOptions(embedding_type="f32", float_type="f32"))
            converter = "lowbit's exporter"
        notes.append(f"the peer's F32 GGUF was written by {converter}")
        llama_cpp_q4_0(work / "float_f32.gguf", work / "llama_q4_0.gguf")
        ppl, tps = llama_cpp_perplexity(work / "llama_q4_0.gguf", tokens, args.context, args.threads)
        rows.append(("llama.cpp's own Q4_0 (llama_model_quantize) run by llama.cpp", ppl, tps))
        ppl, tps = llama_cpp_perplexity(work / "float_f32.gguf", tokens, args.context, args.threads)
        rows.append(("float model (F32 GGUF) run by llama.cpp", ppl, tps))

    print(f"\nSmolLM2-135M-Instruct, {tokens.numel()} held-out tokens, windows of {args.context}; "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'':64s} {'perplexity':>10s} {'vs lowbit':>9s} {'tokens/s':>9s}")
    for name, ppl, tps in rows:
        print(f"{name:64s} {ppl:10.3f} {ppl / ppl_lowbit - 1:+9.3%} {tps:9.0f}")
    sizes = {f.name: f.stat().st_size for f in sorted(work.glob("*.gguf"))}
    for name, size in sizes.items():
        print(f"{name}: {size / 1e6:.1f} MB, tensor types {gguf_types(work / name)}")
    for n in notes:
        print("note:", n)
    (work / "export_gguf.json").write_text(json.dumps(
        {"rows": [{"name": n, "perplexity": p, "tokens_per_second": s} for n, p, s in rows], "notes": notes,
         "export": info, "export_seconds": export_s, "bit_exact": not differ and not missing,
         "gguf_bytes": sizes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
