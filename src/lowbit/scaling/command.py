"""``lowbit scaling run|fit|report|predict``: the argument parsers and commands (lowbit/cli.py only
registers them)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List


def _ints(text: str, name: str) -> List[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        for suffix, m in (("k", 1024), ("m", 1024 ** 2)):
            if part.endswith(suffix):
                part, mult = part[:-1], m
        try:
            out.append(int(float(part) * mult))
        except ValueError:
            raise ValueError(f"--{name}: expected comma-separated integers (64k and 2m accepted), got {text!r}") from None
    return out


def cmd_run(args) -> int:
    from .sweep import SweepSettings, parse_only, run_sweep, sweep_grid

    settings = SweepSettings(batch_size=args.batch_size, seq_len=args.seq_len, vocab=args.vocab,
                             eval_tokens=args.eval_tokens, act_granularity=args.act_granularity,
                             save_every=args.save_every, device=args.device)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    runs = sweep_grid(_ints(args.sizes, "sizes"), _ints(args.tokens, "tokens"),
                      _ints(args.groups, "groups") if args.groups else [], precisions,
                      _ints(args.seeds, "seeds"), args.act_granularity)
    if args.list:
        for i, r in enumerate(runs):
            print(i, r.key)
        return 0
    if not args.out:
        raise ValueError("give --out DIR: the directory whose runs.jsonl collects the sweep")
    log = (lambda s: None) if args.quiet else print
    try:
        run_sweep(args.out, runs, settings, tokenizer_file=args.tokenizer, only=parse_only(args.only), log=log,
                  progress=args.progress)
    except KeyboardInterrupt:
        print(f"lowbit scaling run: interrupted; finished runs are in {args.out}/runs.jsonl and the run in progress "
              f"saved its state in {args.out}/.state: the same command continues", file=sys.stderr)
        return 130
    return 0


def _count(text: str, name: str) -> int:
    """One token count, with the suffixes ``run --tokens`` accepts (96k, 2m)."""
    values = _ints(text, name)
    if len(values) != 1 or values[0] < 0:
        raise ValueError(f"--{name}: expected one integer >= 0 (96k and 2m accepted), got {text!r}")
    return values[0]


def cmd_fit(args) -> int:
    from .analysis import fit_selected
    from .fit import summary_lines
    from .sweep import read_runs, select_runs

    min_tokens, ratio = _count(args.min_tokens, "min-tokens"), args.min_tokens_per_param
    every = read_runs(args.dir)
    runs = select_runs(every, min_tokens, ratio, args.n_count)
    if not every:
        raise ValueError(f"{args.dir}: no runs (*.jsonl) to fit; run `lowbit scaling run --out {args.dir}` first")
    if not runs:
        raise ValueError(f"{args.dir}: --min-tokens {args.min_tokens} --min-tokens-per-param {ratio:g} leave none "
                         f"of its {len(every)} runs")
    result = fit_selected(runs, len(every), args.n_count, args.bootstrap, min_tokens, ratio, args.seed)
    out = Path(args.out or args.dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.json"
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if min_tokens or ratio:
        print(f"fitted {len(runs)} of {len(every)} runs (D >= {min_tokens:,}, D / N >= {ratio:g})")
    print("\n".join(summary_lines(result)))
    print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from .analysis import write_report
    from .trends import trend_lines

    paths, report = write_report(args.dir, n_count=args.n_count, bootstrap=args.bootstrap,
                                 min_tokens=_count(args.min_tokens, "min-tokens"),
                                 min_tokens_per_param=args.min_tokens_per_param, out=args.out)
    print("\n".join(trend_lines(report["trend_check"])))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_predict(args) -> int:
    from .fit import predict_lines

    path = Path(args.dir) / "fit.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; run `lowbit scaling fit {args.dir}` first")
    fit = json.loads(path.read_text(encoding="utf-8"))
    print("\n".join(predict_lines(fit, args.params, int(args.tokens), args.group, args.precision, args.max_penalty)))
    return 0


def add_scaling_parser(sub) -> None:
    """Register ``scaling`` and its subcommands on the main parser's subparsers."""
    p = sub.add_parser("scaling", help="QAT scaling laws: sweep small Llama models trained from scratch, fit "
                                       "L(N, D) + delta_p(N, D, G), report")
    s = p.add_subparsers(dest="scaling_command", required=True)

    r = s.add_parser("run", help="train the sweep's runs that OUT does not hold yet (one JSON line each)")
    r.add_argument("--sizes", required=True, help="model widths d (multiples of 32), e.g. 32,64,96; the depth, "
                                                  "heads and MLP follow from d (docs/scaling.md)")
    r.add_argument("--tokens", required=True, help="training tokens D per run, e.g. 32k,96k,256k")
    r.add_argument("--groups", default="", help="group sizes G of the quantized weights, e.g. 16,64")
    r.add_argument("--precisions", default="w4a4,w4a16,w16a4,bf16",
                   help="comma-separated: bf16, w4a16, w16a4, w4a4, w4a4-fc2a8, w16a4-fc2a8")
    r.add_argument("--seeds", default="0")
    r.add_argument("--act-granularity", default="token", choices=("token", "group"),
                   help="int4 inputs: one scale per token (lowbit's w4a4) or per group of G features")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the corpus (ignored with "
                                                           "--tokenizer or a tokenizer.json already in OUT)")
    r.add_argument("--tokenizer", help="a tokenizer.json to use (e.g. OUT/tokenizer.json of another sweep)")
    r.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens for the final loss")
    r.add_argument("--save-every", type=int, default=200, help="steps between saved training states")
    r.add_argument("--only", help="i/K: run only every K-th run from the i-th (a job array's share)")
    r.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda, cuda:N")
    r.add_argument("--list", action="store_true", help="print the runs of the grid with their index and stop")
    r.add_argument("--progress", action="store_true", help="a progress bar per run")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--out", help="the sweep's directory (runs.jsonl, tokenizer.json); required unless --list")
    r.set_defaults(func=cmd_run)

    for name, fn, hlp in (("fit", cmd_fit, "fit the law to DIR's runs, with bootstrap intervals and held-out checks"),
                          ("report", cmd_report, "fit (when needed), then the analyses, plots, report.json and "
                                                 "report.html")):
        f = s.add_parser(name, help=hlp)
        f.add_argument("dir")
        f.add_argument("--n-count", default="no_emb", choices=("no_emb", "total"),
                       help="N in the law: parameters without the embedding (default) or all of them")
        f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
        f.add_argument("--min-tokens", default="0",
                       help="leave out runs trained on fewer tokens, e.g. 2m or 96k (the first steps' plateau "
                            "is no law)")
        f.add_argument("--min-tokens-per-param", type=float, default=0.0, metavar="R",
                       help="leave out runs with fewer than R training tokens per parameter (D / N, N as "
                            "--n-count says): the law describes models trained on many tokens each")
        f.add_argument("--out", help="where to write (default: DIR)")
        if name == "fit":
            f.add_argument("--seed", type=int, default=0)
        f.set_defaults(func=fn)

    q = s.add_parser("predict", help="predicted loss and quantization penalty from DIR/fit.json")
    q.add_argument("dir")
    q.add_argument("--params", type=float, required=True, help="N, counted as the fit counted it")
    q.add_argument("--tokens", type=float, required=True, help="training tokens D")
    q.add_argument("--group", type=int, default=None, help="group size G (default: every G of the sweep)")
    q.add_argument("--precision", default="w4a4")
    q.add_argument("--max-penalty", type=float, default=None,
                   help="largest acceptable delta_p: prints the largest group size that stays under it")
    q.set_defaults(func=cmd_predict)

