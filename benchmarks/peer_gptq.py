"""lowbit GPTQ side by side with a peer (llm-compressor's GPTQModifier) on SmolLM2-135M, CPU.

    python -m venv --system-site-packages VENV && VENV/bin/pip install llmcompressor torch==2.13.0
    PYTHONPATH=src VENV/bin/python benchmarks/peer_gptq.py --calib 32 --schemes w4g64,w3g64
    PYTHONPATH=src VENV/bin/python benchmarks/peer_gptq.py --calib 128 --schemes w3g64 --repeats 2
    python3 benchmarks/peer_gptq.py --table r16.json r32.json      # reprint saved rows

(llmcompressor 0.14 pins transformers <= 5.17, hence its own environment; both tools run in it.)
``--tools lowbit-peergrid`` adds lowbit with llm-compressor's symmetric grid and ``lowbit-mse``
lowbit with MSE-searched scales (experiments, not the comparison itself).
Same for both tools:

* model: SmolLM2-135M-Instruct, dense float32, read from one plain HF checkpoint directory written
  once from the packaged GGUF file (``save_pretrained_copy``);
* calibration: the very same token-id matrix (``lowbit.data.corpus.calibration_batches``, seed 0),
  handed to lowbit as batches and to llm-compressor as a pre-tokenised ``datasets.Dataset``
  (no shuffling, no padding, batches of ``--batch-size`` sequences for both);
* scheme: symmetric int4/int3, groups of 64 along the input features, every decoder linear;
  lm_head and embeddings stay in float; damping 0.01 of the mean Hessian diagonal; block 128;
  act-order on (lowbit ``act_order=True``, llm-compressor ``actorder="static"``: both sort columns
  by decreasing Hessian diagonal and keep groups on the original column order, scales fitted on
  the original weights), or off for both with ``--no-act-order``;
* evaluation: the quantized weights of each tool are copied into a fresh dense model and scored by
  ``lowbit.evaluate.perplexity`` on the same held-out tokens (EvalSettings defaults: 8192 tokens,
  non-overlapping windows of 512); before that, each tool's weights are checked to lie on an integer
  grid of groups of 64 (distinct values per row and group <= 2^bits, and for llm-compressor
  ``weight / weight_scale`` integral within the int range).

Each run is a fresh subprocess (same interpreter, same thread count), the tools alternate
(lowbit, peer, peer, lowbit, ... with ``--repeats``), the quantization call alone is timed, and the
1-minute load average is recorded around every run because the machine may be shared.
Prints a markdown table: tool, scheme, calib, perplexity, seconds, ratio (seconds / lowbit's).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BITS = {"w4g64": 4, "w3g64": 3}
GROUP = 64
TOOLS = ("lowbit", "llmcompressor")
#: optional extra row: lowbit's pipeline and GPTQ with llm-compressor's symmetric int grid (below)
#: and lowbit with its own MSE-searched group scales (``int3:g64:mse``): same grid, other scales
VARIANTS = ("lowbit-peergrid", "lowbit-mse")


def peer_grid_quantizer():
    """lowbit's WeightQuantizer with the symmetric scale llm-compressor (and the reference GPTQ code)
    use: absmax / ((qmax - qmin) / 2), i.e. absmax / 7.5 at int4 and / 3.5 at int3, so all 2^bits
    levels are used and the largest positive weight of a group is clipped to qmax * scale. lowbit's
    own rule is absmax / qmax (7 and 3): no clipping, one level (qmin) left for GPTQ's updates."""
    from lowbit.quant.weight import GroupParams, WeightQuantizer

    class PeerGridQuantizer(WeightQuantizer):
        def _scale_for(self, lo, hi):
            if not self.spec.symmetric or not hasattr(self.grid, "qmin"):
                return super()._scale_for(lo, hi)
            s = (hi / ((self.grid.qmax - self.grid.qmin) / 2)).to(self.scale_dtype).float()
            s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
            return GroupParams(s, None)

    return PeerGridQuantizer


# --- shared inputs -------------------------------------------------------------------------------

def _hf_copy_dir() -> Path:
    """The plain HF checkpoint of SmolLM2 both tools read (one per transformers version)."""
    import transformers

    from lowbit.data.corpus import cache_dir

    return Path(cache_dir()) / "peer" / f"smollm2-hf-{transformers.__version__}"


def ensure_hf_copy() -> Path:
    d = _hf_copy_dir()
    if (d / "config.json").is_file():
        return d
    from lowbit.models.loader import load_model, save_pretrained_copy

    print(f"writing a plain HF copy of SmolLM2 to {d} ...", flush=True)
    # cache=False: never touch lowbit's shared dense-copy cache from this interpreter
    loaded = load_model("smollm2", cache=False)
    tmp = d.with_name(d.name + f".{os.getpid()}.tmp")
    save_pretrained_copy(loaded, tmp)
    os.replace(tmp, d)
    return d


def make_tokens(model_dir: Path, calib: int, seq_len: int, eval_tokens: int, out: Path) -> dict:
    from transformers import AutoTokenizer

    from lowbit.data.corpus import calibration_batches, evaluation_tokens, stdlib_corpus

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = calibration_batches(tok, calib, seq_len, seed=0)
    ev = evaluation_tokens(tok, eval_tokens)
    torch.save({"calib": ids, "eval": ev}, out)
    return {"corpus": stdlib_corpus().checksum, "calib_shape": list(ids.shape), "eval_tokens": int(ev.numel())}


def load_dense(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                local_files_only=True).eval()


def decoder_linears(model) -> dict:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


# --- checks --------------------------------------------------------------------------------------

def grid_check(weights: dict, bits: int, scales: dict | None = None) -> dict:
    """Distinct values per (row, group of 64) over all layers, and, given the scales, how far
    ``weight / scale`` is from an integer in the signed ``bits``-bit range."""
    max_distinct, groups = 0, 0
    int_err, lo, hi = 0.0, 0, 0
    for name, W in weights.items():
        W = W.float()
        rows, cols = W.shape
        if cols % GROUP:
            raise ValueError(f"{name}: {cols} columns are not a multiple of {GROUP}")
        g = W.reshape(rows * cols // GROUP, GROUP)
        s, _ = torch.sort(g, dim=1)
        distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
        max_distinct = max(max_distinct, int(distinct.max()))
        groups += g.shape[0]
        if scales is not None:
            sc = scales[name].float().reshape(rows, cols // GROUP, 1)
            y = W.reshape(rows, cols // GROUP, GROUP) / sc
            r = torch.round(y)
            int_err = max(int_err, float((y - r).abs().max()))
            lo, hi = min(lo, int(r.min())), max(hi, int(r.max()))
    out = {"groups": groups, "max_distinct_per_group": max_distinct, "limit": 2 ** bits,
           "on_grid": max_distinct <= 2 ** bits}
    if scales is not None:
        out.update({"max_abs_frac_of_w_over_scale": int_err, "int_range_used": [lo, hi],
                    "int_range_allowed": [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]})
        out["on_grid"] = out["on_grid"] and int_err < 1e-3 and lo >= -(2 ** (bits - 1)) and hi <= 2 ** (bits - 1) - 1
    return out


# --- the two tools (run inside a worker process) -------------------------------------------------

def run_lowbit(model, ids: torch.Tensor, scheme: str, act_order: bool, batch_size: int, peer_grid: bool = False,
               mse: bool = False):
    from lowbit.ptq import pipeline
    from lowbit.ptq.pipeline import quantize_model
    from lowbit.quant.plan import Plan

    if peer_grid:  # benchmark-only experiment: swap the quantizer class the pipeline builds
        pipeline.WeightQuantizer = peer_grid_quantizer()

    batches = [{"input_ids": ids[i: i + batch_size]} for i in range(0, ids.shape[0], batch_size)]
    t, c = time.perf_counter(), time.process_time()
    plan = Plan({"*": f"int{BITS[scheme]}:g{GROUP}:mse"}, name=f"{scheme}-mse") if mse else Plan.from_scheme(scheme)
    res = quantize_model(model, plan, batches, "gptq", act_order=act_order,
                         percdamp=0.01, block_size=128, progress=False)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    weights = {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}
    scales = {}
    for n, p in res.packed.items():
        sc = p.get("scales")
        if sc is not None:
            scales[n] = sc.reshape(weights[n].shape[0], -1)
    return seconds, weights, (scales if len(scales) == len(weights) else None), {
        "cpu_seconds": cpu, "damping_notes": sorted({l.note for l in res.layers if l.note})}


def run_llmcompressor(model, ids: torch.Tensor, scheme: str, act_order: bool, batch_size: int):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    bits = BITS[scheme]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "input_activations": None,
                                   "output_activations": None,
                                   "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                               "strategy": "group", "group_size": GROUP}}},
        ignore=["lm_head"], actorder="static" if act_order else None, dampening_frac=0.01, block_size=128)
    t, c = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=batch_size,
            pad_to_max_length=False)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    lin = decoder_linears(model)
    weights = {n: m.weight.detach().clone() for n, m in lin.items()}
    scales = {n: m.weight_scale.detach().clone() for n, m in lin.items()}
    return seconds, weights, scales, {"cpu_seconds": cpu, "observer": "memoryless_minmax (default)"}


def worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    from lowbit.evaluate import perplexity

    model_dir = Path(job["model_dir"])
    data = torch.load(job["tokens"])
    ids, ev = data["calib"], data["eval"]
    model = load_dense(model_dir)
    load_before = os.getloadavg()[0]
    if job["tool"] == "llmcompressor":
        run = run_llmcompressor(model, ids, job["scheme"], job["act_order"], job["batch_size"])
    else:
        run = run_lowbit(model, ids, job["scheme"], job["act_order"], job["batch_size"],
                         peer_grid=job["tool"] == "lowbit-peergrid", mse=job["tool"] == "lowbit-mse")
    seconds, weights, scales, extra = run
    load_after = os.getloadavg()[0]
    grid = grid_check(weights, BITS[job["scheme"]], scales)
    # the same evaluation for both: a fresh dense model holding the tool's quantized weights
    dense = load_dense(model_dir)
    mods = decoder_linears(dense)
    with torch.no_grad():
        for n, W in weights.items():
            mods[n].weight.copy_(W.to(mods[n].weight.dtype))
    t = time.perf_counter()
    ppl = perplexity(dense, ev, context=job["context"])
    return {**{k: job[k] for k in ("tool", "scheme", "calib", "seq_len", "act_order", "batch_size", "threads")},
            "perplexity": ppl, "seconds": seconds, "eval_seconds": time.perf_counter() - t,
            "load1_before": load_before, "load1_after": load_after, "grid": grid,
            "n_linears": len(weights), **extra}


# --- driver -------------------------------------------------------------------------------------

def _spawn(job: dict, tmp: Path) -> dict:
    jf = tmp / f"job-{job['tool']}-{job['scheme']}-{job['calib']}-{time.time_ns()}.json"
    jf.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, __file__, "--worker", str(jf)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-25:])
        return {**{k: job[k] for k in ("tool", "scheme", "calib")}, "error": tail}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _baseline(model_dir: Path, tokens: Path, context: int) -> float:
    from lowbit.evaluate import perplexity

    return perplexity(load_dense(model_dir), torch.load(tokens)["eval"], context=context)


def peer_available() -> tuple[bool, str]:
    try:
        import llmcompressor  # noqa: F401

        return True, f"llmcompressor {llmcompressor.__version__}"
    except Exception as e:  # report exactly why, the lowbit rows still run
        return False, f"llmcompressor cannot be imported: {type(e).__name__}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default="32", help="comma-separated numbers of calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--schemes", default="w4g64,w3g64", help=f"comma-separated, of {', '.join(BITS)}")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward, both tools")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every run (both tools)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per tool and setting (alternating)")
    ap.add_argument("--no-act-order", dest="act_order", action="store_false")
    ap.add_argument("--eval-tokens", type=int, default=None, help="default: lowbit.jobs.EvalSettings")
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help=f"comma-separated, run in this order (alternating with --repeats); of "
                         f"{', '.join(TOOLS + VARIANTS)}")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="only print the table of rows saved by earlier runs (--json files)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.table:
        saved = [json.loads(Path(f).read_text()) for f in args.table]
        rows = [r for d in saved for r in d["rows"]]
        _table(rows, saved[0]["baseline"], argparse.Namespace(**{**saved[0]["args"], "seq_len": rows[0]["seq_len"]}))
        return

    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))), flush=True)
        return

    from lowbit.jobs import EvalSettings

    settings = EvalSettings()
    eval_tokens = args.eval_tokens or settings.eval_tokens
    schemes = args.schemes.split(",")
    bad = [s for s in schemes if s not in BITS]
    if bad:
        raise SystemExit(f"unknown scheme(s) {bad}; accepted: {', '.join(BITS)}")
    ok, why = peer_available()
    print(why, flush=True)
    tools = tuple(args.tools.split(","))
    unknown = [t for t in tools if t not in TOOLS + VARIANTS]
    if unknown:
        raise SystemExit(f"unknown tool(s) {unknown}; accepted: {', '.join(TOOLS + VARIANTS)}")
    if not ok:
        tools = tuple(t for t in tools if t != "llmcompressor")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs; uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}",
          flush=True)
    model_dir = ensure_hf_copy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        baseline = None
        for calib in [int(c) for c in args.calib.split(",")]:
            tokens = tmp / f"tokens-{calib}.pt"
            info = make_tokens(model_dir, calib, args.seq_len, eval_tokens, tokens)
            if baseline is None:
                baseline = _baseline(model_dir, tokens, settings.context)
                print(f"baseline perplexity {baseline:.4f} on {info['eval_tokens']} held-out tokens "
                      f"(context {settings.context}); corpus {info['corpus']}", flush=True)
            for scheme in schemes:
                for rep in range(args.repeats):
                    order = tools if rep % 2 == 0 else tools[::-1]
                    for tool in order:
                        job = {"tool": tool, "scheme": scheme, "calib": calib, "seq_len": args.seq_len,
                               "act_order": args.act_order, "batch_size": args.batch_size,
                               "threads": args.threads, "model_dir": str(model_dir), "tokens": str(tokens),
                               "context": settings.context}
                        row = _spawn(job, tmp)
                        row["repeat"] = rep
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.json:
                            Path(args.json).write_text(json.dumps({"args": vars(args), "baseline": baseline,
                                                                   "rows": rows}, indent=1))
    _table(rows, baseline, args)


def _table(rows, baseline, args) -> None:
    print(f"\nSmolLM2-135M, baseline perplexity {baseline:.4f}; calibration N x {args.seq_len} tokens "
          f"(identical ids for both); act-order {'on' if args.act_order else 'off'}; damping 0.01; "
          f"{args.threads} thread(s); seconds = wall time of the quantization call, cpu = its process "
          f"CPU time; ratio = seconds / lowbit's mean seconds for the same setting")
    print("| tool | scheme | calib | perplexity | seconds | ratio | cpu s | cpu ratio | on int grid (max distinct/group) | load1 before/after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")

    def mean_lowbit(r, key):
        ref = [x[key] for x in rows if x.get("tool") == "lowbit" and x["scheme"] == r["scheme"]
               and x["calib"] == r["calib"] and key in x]
        return sum(ref) / len(ref) if ref else float("nan")

    for r in rows:
        if "error" in r:
            print(f"| {r['tool']} | {r['scheme']} | {r['calib']} | failed | | | | | | |")
            continue
        g = r["grid"]
        cpu = r.get("cpu_seconds", float("nan"))
        print(f"| {r['tool']} | {r['scheme']} | {r['calib']}x{r['seq_len']} | {r['perplexity']:.4f} | "
              f"{r['seconds']:.1f} | {r['seconds'] / mean_lowbit(r, 'seconds'):.2f} | {cpu:.1f} | "
              f"{cpu / mean_lowbit(r, 'cpu_seconds'):.2f} | {'yes' if g['on_grid'] else 'NO'} "
              f"({g['max_distinct_per_group']}/{g['limit']}) | {r['load1_before']:.1f}/{r['load1_after']:.1f} |")
    for r in rows:
        if "error" in r:
            print(f"\n{r['tool']} {r['scheme']} {r['calib']} failed:\n{r['error']}")


if __name__ == "__main__":
    main()
