"""The ``lowbit`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from .formats import BlockFormat, FormatError, format, known_names
from .heap import reuse_freed_memory


def _fmt_num(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _exact_num(v) -> str:
    """Shortest string that reads back as the same float (format values are exact binary numbers)."""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
    return _fmt_num(v)


def _table(cols, rows) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _kind(f) -> str:
    from .formats import Codebook, FloatFormat, IntFormat

    if isinstance(f, FloatFormat):
        return "float" + ("" if f.special == "ieee" else "/" + f.special) + ("" if f.subnormals else "/ftz")
    if isinstance(f, IntFormat):
        return ("" if f.is_signed else "u") + ("fixed" if f.frac else "int") + ("/narrow" if f.narrow else "")
    if isinstance(f, Codebook):
        return "codebook"
    return type(f).__name__


def cmd_formats(args) -> int:
    if not args.name:
        cols = ["name", "canonical", "kind", "bits", "max", "min_normal", "min_subnormal", "epsilon", "inf", "nan"]
        rows, blocks = [], []
        for n in known_names():
            f = format(n)
            if isinstance(f, BlockFormat):
                blocks.append([n, str(f.element), str(f.scale), str(f.size), _fmt_num(f.tensor_scale),
                               _fmt_num(f.bits), _fmt_num(float(f.max)),
                               "2^(floor(log2 amax) - emax_elem)" if f.pow2_scale else "amax / max_elem"])
                continue
            d = f.describe()
            canon = str(f) if str(f) != n else "-"
            rows.append([n, canon, _kind(f)] + [_fmt_num(d.get(c, "")) for c in cols[3:]])
        print("Element formats\n")
        _table(cols, rows)
        print("\nBlock formats (element values times a shared scale per block; max = max_elem * max_scale)\n")
        _table(["name", "element", "scale", "block", "tensor_scale", "bits/elem", "max", "scale rule"], blocks)
        print("\nAlso accepted: any eXmY[fn|fnuz|fnu|f|fnan][_bBIAS][_ftz], intN/uintN/intNn, fixedW.F, "
              "p3109_kKpP, codebook(v1,...), bfpN_bK, block(ELEMENT,SCALE,SIZE[,tensor]). "
              "`lowbit formats NAME` details one (see docs/formats.md).")
        return 0
    f = format(args.name)
    d = f.describe()
    if str(f) != args.name.strip():
        d["name"] = f"{d['name']}  (from {args.name.strip()!r})"
    if not isinstance(f, BlockFormat):
        d = {"name": d.pop("name"), "kind": _kind(f), **d}
    from .formats import FloatFormat

    if isinstance(f, FloatFormat):
        d.update(bias=f.bias, emin=f.emin, emax=f.emax, subnormals=f.subnormals and f.special != "fnu",
                 negative_zero=f.has_negative_zero)
    for k, v in d.items():
        print(f"{k:>14}: {_exact_num(v)}")
    elem = f.element if isinstance(f, BlockFormat) else f
    try:
        vals = elem.values()
    except FormatError as e:
        print(f"{'values':>14}: ({e})")
        return 0
    shown = vals.tolist()
    label = "element values" if isinstance(f, BlockFormat) else "values"
    if len(shown) > 64 and not args.all:
        head = ", ".join(_exact_num(v) for v in shown[:16])
        tail = ", ".join(_exact_num(v) for v in shown[-16:])
        print(f"{label:>14}: {len(shown)} finite values: {head}, ..., {tail}  (--all lists every one)")
    else:
        print(f"{label:>14}: {len(shown)} finite values: " + ", ".join(_exact_num(v) for v in shown))
    return 0


def cmd_quantize(args) -> int:
    from .jobs import EvalSettings, run_quantize
    from .quant.plan import Plan
    from .report import summary_table

    plan = Plan.load(args.plan) if args.plan else None
    if args.model_factory or args.data_factory:
        return _quantize_from_factories(args, plan)
    if args.kv:  # KV-cache rules on top of the scheme or plan
        from .quant.kv import kv_scheme_rules

        plan = plan or Plan.from_scheme(args.scheme)
        plan.kv = kv_scheme_rules(args.kv)
        plan.name = f"{plan.name}+kv={args.kv}" if plan.name else None
    settings = EvalSettings(eval_tokens=args.eval_tokens or None, context=args.context, sentences=args.sentences)
    report = run_quantize(args.model, args.scheme, args.method, args.out, plan=plan, calib=args.calib,
                          seq_len=args.seq_len, settings=settings, act_order=args.act_order,
                          percdamp=args.damp, quiet=args.quiet, retain=_retain_config(args),
                          rotate=args.rotate, smooth=args.smooth, calibration=args.calibration,
                          device=args.device, offload=args.offload, smooth_tokens=args.smooth_tokens,
                          float_storage=args.float_storage)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(summary_table(report))
        if args.out:
            plot = f"{args.out}/layer_error.png " if report["layers"] else ""
            print(f"wrote {args.out}/report.json, {args.out}/report.html, {plot}and the checkpoint "
                  f"{args.out}/model.safetensors")
    return 0


def _quantize_from_factories(args, plan) -> int:
    """`lowbit quantize --model-factory M:F --data-factory M:F`: a user's own model object."""
    from .module_job import run_quantize_module
    from .report import summary_table

    if not args.model_factory:
        raise ValueError("--data-factory needs --model-factory MODULE:FUNCTION (a function returning the model)")
    if args.model:
        raise ValueError(f"give either MODEL ({args.model!r}) or --model-factory, not both")
    unsupported = [f for f, on in (("--kv", args.kv), ("--retain", args.retain), ("--rotate", args.rotate != "none"),
                                   ("--smooth", args.smooth), ("--smooth-tokens", args.smooth_tokens != "default")) if on]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} not supported with --model-factory; accepted there: --scheme, "
                         "--plan, --method, --out, --no-act-order, --damp, --json, --quiet")
    report = run_quantize_module(args.model_factory, args.data_factory, args.scheme, args.method, args.out,
                                 plan=plan, act_order=args.act_order, percdamp=args.damp, quiet=args.quiet)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(summary_table(report))
        if args.out:
            plot = f"{args.out}/layer_error.png " if report["layers"] else ""
            print(f"wrote {args.out}/report.json, {plot}and the checkpoint "
                  f"{args.out}/model.safetensors (lowbit eval {args.out} measures it again)")
    return 0


def _retain_config(args):
    """RetainConfig from --retain/--retain-format/--retain-alloc/--retain-saliency, else from the
    ``retain`` section of a --plan file (per-layer ratios from lowbit search), or None."""
    if args.retain is None:
        return _plan_retain(args.plan) if getattr(args, "plan", None) else None
    from .ptq.retention import RetainConfig, parse_ratio

    extra = {}
    if getattr(args, "retain_grid", None):
        try:
            extra["grid"] = tuple(float(x) for x in args.retain_grid.split(","))
        except ValueError:
            raise ValueError(f"--retain-grid {args.retain_grid!r} is not a comma-separated list of numbers "
                             "(multiples of --retain, e.g. 0,0.5,1,2,4)") from None
    return RetainConfig(parse_ratio(args.retain), args.retain_format, args.retain_saliency, args.retain_alloc,
                        objective=getattr(args, "retain_objective", "fisher"),
                        curves=getattr(args, "retain_curves", "rtn"), **extra)


def _plan_retain(path):
    from pathlib import Path

    from .ptq.retention import RetainConfig

    r = json.loads(Path(path).read_text()).get("retain")
    if not r:
        return None
    return RetainConfig(0.0, r["format"], r.get("saliency", "obs"), "fixed", ratios=dict(r["ratios"]))


def cmd_eval(args) -> int:
    from .jobs import EvalSettings, run_eval

    if args.adapter:
        from .adapters.cli import cmd_eval_adapters

        return cmd_eval_adapters(args)

    settings = None
    if args.eval_tokens is not None or args.context is not None:
        settings = EvalSettings(eval_tokens=args.eval_tokens or None, context=args.context or 512)
    res = run_eval(args.dir, settings, quiet=args.quiet or args.json, device=args.device)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {_fmt_num(v)}")
    return 0


def cmd_search(args) -> int:
    from .jobs import run_search

    extra = [e for e in (args.estimators or "").split(",") if e]
    report = run_search(args.model, args.out, max_loss=args.max_loss, metric=args.metric, budget=args.budget,
                        budget_max=args.budget_max, method=args.method, candidates=args.candidates,
                        estimator=args.estimator, pairs=args.pairs, cost=args.cost, calib=args.calib,
                        seq_len=args.seq_len, eval_tokens=args.eval_tokens, sentences=args.sentences,
                        hutchinson_samples=args.hutchinson_samples, extra_estimators=extra,
                        sensitivity_cache=args.sensitivity_cache, uniform=args.uniform,
                        rank_configs=args.rank_configs, tol=args.tol, portfolio=args.portfolio, quiet=args.quiet,
                        device=args.device)
    if args.json:
        print(json.dumps(report, indent=1))
    if not report["search"]["reachable"]:
        print(f"lowbit search: {report['search']['note']}", file=sys.stderr)
        return 1
    if args.out:
        print(f"wrote {args.out}/plan.json (apply with: lowbit quantize --plan {args.out}/plan.json), "
              f"search.json, points.jsonl, pareto.png, layers.png, report.html")
    return 0


def cmd_train(args) -> int:
    from .jobs import EvalSettings
    from .quant.plan import Plan
    from .train.cli_options import print_report, train_config
    from .train.job import run_train
    from .train.loop import has_saved_state
    from .train.report import summary_lines

    if args.scheme and args.plan:
        raise ValueError("give --scheme or --plan, not both")
    plan = Plan.load(args.plan) if args.plan else None
    scheme = args.scheme if args.scheme or plan is not None or args.init not in ("rtn", "gptq") else "w3g64"
    cfg = train_config(args)
    settings = EvalSettings(eval_tokens=args.eval_tokens or None, context=args.context, sentences=args.sentences)
    if args.resume and not has_saved_state(args.out):
        raise ValueError(f"--resume: no interrupted training run in --out {args.out!r} (a rerun of the same "
                         "command resumes by itself when there is one)")
    report = run_train(args.model, scheme, args.out, plan=plan, init=args.init, config=cfg,
                       batch_size=args.batch_size, seq_len=args.seq_len, teacher=args.teacher,
                       objective=args.objective, hidden_mse=args.hidden_mse, scaling=args.scaling,
                       gradient=args.gradient, act_scaling=args.act_scaling, act_clip_init=args.act_clip_init,
                       calib=args.calib, settings=settings, device=args.device,
                       quiet=args.quiet)
    print_report(report, args.json, summary_lines,
                 written=args.out and f"{args.out}/report.json, {args.out}/report.html, {args.out}/loss.png and the "
                                      f"checkpoint {args.out}/model.safetensors (lowbit eval {args.out} measures it again)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Low-precision formats, emulation and quantization")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formats", help="list the known number formats, or detail one")
    f.add_argument("name", nargs="?", help="a format name, e.g. e4m3, mxfp4, int4, nf4")
    f.add_argument("--all", action="store_true", help="list every value, however many")
    f.set_defaults(func=cmd_formats)

    q = sub.add_parser("quantize", help="quantize a model (default: SmolLM2-135M), evaluate it, write a checkpoint")
    q.add_argument("model", nargs="?", default=None,
                   help="smollm2 (default), minilm, a Hugging Face model directory or a .gguf file")
    q.add_argument("--scheme", default="w3g64",
                   help="named scheme (w4g64, w3g64, w2g64, w4g128, fp4g32, mxfp4, nvfp4, w4a8, fp8, ...) or a "
                        "quant spec like int4:g64:asym or nvfp4:mse (block scales searched for the least squared error "
                        "instead of the amax rule) or nvfp4:4over6 (each block's amax onto 6 or 4, the better), "
                        "optionally WEIGHT+ACT, e.g. nvfp4:mse+nvfp4:4over6 (default w3g64)")
    q.add_argument("--plan", help="a plan JSON (per-layer specs, e.g. from lowbit search); overrides --scheme")
    q.add_argument("--kv", help="quantize the KV cache: kv8, kv4, kv4c (KIVI: keys per channel), kvfp8, kvnvfp4, "
                               "a spec like int8:token, or KEY_SPEC/VALUE_SPEC (also as a scheme suffix: w4a8kv4)")
    q.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                   help="a user's own model object instead of MODEL: a Python function returning the nn.Module "
                        "(e.g. a CNN), as MODULE:FUNCTION or FILE.py:FUNCTION; recorded in the checkpoint")
    q.add_argument("--data-factory", metavar="MODULE:FUNCTION",
                   help="with --model-factory: a function returning {'calibration': [batches], 'evaluation': "
                        "(inputs, labels) | inputs | callable(model) -> float or dict}; the report shows float vs "
                        "quantized accuracy (with labels) and output error")
    q.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    q.add_argument("--out", help="directory for report.json, layer_error.png and the checkpoint")
    q.add_argument("--float-storage", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="dtype of the unquantized tensors (embeddings, norms) in the checkpoint: auto (16-bit; "
                        "exact where a 16-bit type holds them), fp16, bf16, or fp32 (as before)")
    q.add_argument("--calib", type=int, default=128, help="calibration sequences (default 128)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    q.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens for perplexity (default 8192; 0 = the whole evaluation split of 34k)")
    q.add_argument("--context", type=int, default=512, help="perplexity window (default 512)")
    q.add_argument("--sentences", type=int, default=256, help="held-out sentences for encoders (default 256)")
    q.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ: quantize columns left to right with each group's scale fitted to the updated "
                        "weights, instead of by decreasing Hessian diagonal with scales fitted up front")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: relative damping of the Hessian")
    q.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when torch sees one, default), cpu, cuda, cuda:N "
                        "(a --model-factory model stays where its factory puts it)")
    q.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory; only the block being quantized visits --device "
                        "(for models larger than the GPU's memory; evaluation runs on the CPU)")
    q.add_argument("--calibration", default="auto", choices=["auto", "sequential", "parallel"],
                   help="GPTQ: sequential = one pass per block over all calibration tokens, each layer "
                        "quantized from the outputs of the quantized layers before it; parallel = two "
                        "passes, one batch in memory at a time; auto (default) = sequential if it fits")
    q.add_argument("--retain", help="keep this fraction of high-impact weights (e.g. 1%% or 0.01) in a sparse "
                   "side tensor at --retain-format; counted in bits/weight")
    q.add_argument("--retain-format", default="int8",
                   help="format of retained weights: int8 (fp16 scale per row), int8:tensor, e4m3fn, fp16, ...")
    q.add_argument("--retain-alloc", default="fixed", choices=["fixed", "optimized"],
                   help="one ratio everywhere, or per-layer ratios from an integer program at the same bits")
    q.add_argument("--retain-objective", default="fisher", choices=["fisher", "block"],
                   help="optimized: each layer's error weighted by the loss's output Fisher (default), or "
                        "by its block's relative output error")
    q.add_argument("--retain-curves", default="rtn", choices=["rtn", "gptq"],
                   help="optimized: each ratio's error from RTN (default, fast) or from GPTQ with the keep mask")
    q.add_argument("--retain-grid", default=None,
                   help="optimized: ratios to choose from as multiples of --retain (default 0,0.25,0.5,1,1.5,2,3,4)")
    q.add_argument("--retain-saliency", default="obs", choices=["obs", "magnitude", "fisher", "diag"],
                   help="which weights to keep: obs (w-q(w))^2/[H^-1]_jj (default), magnitude w^2/[H^-1]_jj, "
                   "fisher w^2 E[g^2] (causal LMs)")
    q.add_argument("--rotate", default="none", choices=["none", "hadamard", "hadamard-pow2", "block", "auto"],
                   help="outlier rotation: hadamard = fused residual rotation for Llama-style decoders "
                        "(online per-linear for others), full width where a Hadamard matrix of that order "
                        "exists (e.g. 576 = 36*16), else the largest power-of-two block; hadamard-pow2 = "
                        "the same with power-of-two blocks only; block = online block Hadamard at the "
                        "format's group size (MR-GPTQ); auto = per group of linears sharing an input, none, block or "
                        "full-width online rotation, whichever gives the least output error on calibration rows "
                        "(with the smoothing alpha when --smooth auto); default none. With FP4 block formats pair a rotation with "
                        "MSE block scales (--scheme nvfp4:mse): rotated groups look Gaussian, for which the "
                        "amax scale wastes the top of the E2M1 grid")
    q.add_argument("--smooth", default=None,
                   help="SmoothQuant channel scaling: an alpha in [0, 1] or 'auto' (searched per layer group)")
    q.add_argument("--smooth-tokens", default="default",
                   help="calibration tokens the smoothing statistics are collected on (leading whole sequences): "
                        "a number, or 'all'; default 2048")
    q.add_argument("--json", action="store_true", help="print the whole report as JSON")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="load a quantized checkpoint and measure it as `quantize` did")
    e.add_argument("dir", help="a checkpoint directory (with --adapter: or a model name such as smollm2)")
    e.add_argument("--adapter", action="append", default=None,
                   help="an adapter directory of `lowbit finetune`; repeatable: one base, each adapter swapped in "
                        "and measured on its task's held-out split")
    e.add_argument("--task", default=None, help="with --adapter: docs | code | FILE instead of the adapter's own")
    e.add_argument("--eval-tokens", type=int, default=None)
    e.add_argument("--context", type=int, default=None)
    e.add_argument("--json", action="store_true", help="print the quantized fields as JSON")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--device", default="auto", help="auto (a GPU when torch sees one, default), cpu, cuda, cuda:N")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("search", help="mixed precision: the smallest per-layer plan within a loss limit (or the "
                                      "best plan at a budget)")
    s.add_argument("model", nargs="?", default=None, help="smollm2 (default), minilm, or a model directory")
    s.add_argument("--max-loss", default="1%",
                   help="limit on the measured loss: perplexity increase relative to fp32 (causal LMs), or "
                        "1 - cosine / 1 - spearman absolute (encoders); '1%%' or 0.01 (default 1%%)")
    s.add_argument("--metric", default=None, help="perplexity|ppl (causal LM), cosine|spearman (encoder)")
    s.add_argument("--budget", type=float, default=None,
                   help="instead of a loss limit: the best plan within this budget (bits/weight for --cost bits)")
    s.add_argument("--budget-max", type=float, default=None, help="upper end of the bisection (default: the largest)")
    s.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="quantization of measured models (default rtn)")
    s.add_argument("--candidates", default="default",
                   help="'default' (int2/3/4/8, fp4 g32, mxfp4, nvfp4, fp8), 'int', or specs like int4:g64,mxfp4")
    s.add_argument("--estimator", default="measured", choices=["measured", "hutchinson", "fisher"])
    s.add_argument("--no-pairs", dest="pairs", action="store_false", help="no inter-layer dependency terms")
    s.add_argument("--estimators", default="", help="extra estimators to compute too, e.g. hutchinson,fisher")
    s.add_argument("--cost", default="bits", help="bits (default), bytes, bops, or a latency-table JSON file")
    s.add_argument("--calib", type=int, default=None, help="calibration sequences/sentences for sensitivities")
    s.add_argument("--seq-len", type=int, default=None, help="tokens per calibration item")
    s.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity (default 4096)")
    s.add_argument("--sentences", type=int, default=128, help="held-out sentences for encoders (default 128)")
    s.add_argument("--hutchinson-samples", type=int, default=4)
    s.add_argument("--sensitivity-cache", default=None, help="sensitivity cache file (default OUT/sensitivity.json)")
    s.add_argument("--no-uniform", dest="uniform", action="store_false", help="skip measuring uniform configurations")
    s.add_argument("--rank-configs", type=int, default=0,
                   help="measure N random mixed configurations and report each estimator's Spearman")
    s.add_argument("--tol", type=float, default=0.0625, help="bisection stops when the bracket is this narrow")
    s.add_argument("--no-portfolio", dest="portfolio", action="store_false",
                   help="use the predicted optimum at each budget as it is, instead of scoring a few exactly "
                        "solved plans (with/without pair terms; all, integer-only, non-integer-only candidates) "
                        "on the calibration data and keeping the best")
    s.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when torch sees one, default), cpu, cuda, cuda:N")
    s.add_argument("--out", help="directory for plan.json, search.json, points.jsonl and the plots")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_search)

    from .train.cli_options import add_eval_options, add_run_options, add_training_options

    t = sub.add_parser("train", help="quantization-aware training: start from a PTQ result, distil from the fp32 "
                                     "model, write the same packed checkpoint `quantize` writes")
    t.add_argument("model", nargs="?", help="smollm2 (default), minilm, or a path; with --init DIR, the checkpoint's own")
    t.add_argument("--scheme", help="a named scheme or spec, as for quantize (default w3g64)")
    t.add_argument("--plan", help="a plan.json (per-layer specs, e.g. from lowbit search)")
    t.add_argument("--init", default="gptq", help="rtn | gptq (quantize first, kept in OUT/init) | DIR (a lowbit "
                                                  "quantize checkpoint: its specs, scales and transforms)")
    add_training_options(t, lr=1e-5, lr_help="peak learning rate of the weights",
                         scale_lr_help="peak learning rate of the scales (default 10 x --lr)")
    t.add_argument("--teacher", default="fp32", choices=("fp32", "none"))
    t.add_argument("--objective", default="kl", choices=("kl", "ce", "kl+ce"),
                   help="kl: distil next-token distributions from the teacher; ce: next-token loss")
    t.add_argument("--hidden-mse", type=float, default=0.0, help="weight of the hidden-state MSE to the teacher")
    t.add_argument("--scaling", default="learned", choices=("learned", "dynamic"),
                   help="learned: LSQ step sizes (LSQ+ offsets for asym); dynamic: the spec's rule every step")
    t.add_argument("--gradient", default="clipped", choices=("clipped", "straight"),
                   help="straight-through gradient of the weights: only inside the grid's range, or everywhere")
    t.add_argument("--act-scaling", default="learned", choices=("fixed", "learned"),
                   help="input activations: fixed: the dynamic absmax step; learned: the dynamic absmax times a "
                        "clipping ratio per layer learned with LSQ's gradient (element formats; saved in the checkpoint)")
    t.add_argument("--act-clip-init", default="mse", choices=("mse", "one"),
                   help="start of the learned clipping ratios: mse (the least squared error of the quantized inputs "
                        "over a few batches) or one (no clipping)")
    t.add_argument("--calib", type=int, default=128, help="calibration sequences of --init gptq")
    add_eval_options(t, sentences=True)
    t.add_argument("--resume", action="store_true", help="insist on continuing an interrupted run in --out (a rerun "
                                                             "resumes by itself; this fails when there is none)")
    add_run_options(t, out_help="directory for the checkpoint, report.json, report.html, loss.png")
    t.set_defaults(func=cmd_train)

    # each of these commands lives with its package and registers its own parser
    from .adapters.cli import add_finetune_parser
    from .export.command import add_parser as add_export_parser
    from .lowp.cli import add_parser as add_lptrain_parser
    from .scaling.command import add_scaling_parser

    for add in (add_finetune_parser, add_lptrain_parser, add_scaling_parser, add_export_parser):
        add(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with reuse_freed_memory():  # CPU jobs churn through large activations
            return args.func(args)
    except (FormatError, ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted; finished blocks (or layers) are kept in OUT/.progress and a rerun "
              "with the same arguments resumes there", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
