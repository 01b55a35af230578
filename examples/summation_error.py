"""Rounding-error growth of summation in fp16, bf16 and fp8, against the classical and probabilistic
bounds, with every addition rounded by lowbit.arith.

    python3 examples/summation_error.py                      # the table in docs/emulation.md
    python3 examples/summation_error.py --max-log2n 14 --trials 50 --out /tmp/sum

Data: x_i uniform in [0, 1) times a power of two c, rounded to the format (so the x_i are exact
format values and sum|x_i| = s). c = 1, except where the exact sum at the largest n would pass half
the format's largest value (fp8 e4m3: max 448), where c is the largest power of two below that.
The exact sum s is math.fsum of the rounded data. Reported: |s_hat - s| / sum|x_i| for n = 2^4 ..
2^max-log2n, median and maximum over the trials; each trial sums the first n terms of one vector.

  recursive  s_1 = x_1, s_i = fl(s_{i-1} + x_i) in the format  (arith.cumsum: all n in one pass);
             worst-case bound gamma_{n-1}, gamma_k = k u / (1 - k u), infinite once k u >= 1.
  pairwise   a balanced tree, each addition rounded to the format; bound gamma_{ceil(log2 n)}.
  blocked    blocks of b terms summed recursively in the format, the block sums added in fp32
             (every addition rounded to fp32) and the total rounded once to the format, as a unit with
             a narrow adder and a wide accumulator does; bound
             u + (1 + u) (gamma_{b-1} + (1 + gamma_{b-1}) gamma32_{n/b-1}), gamma32 with u_32 = 2^-24.
The rule of thumb sqrt(n) u (Higham & Mary, SIAM J. Sci. Comput. 2019: with independent rounding
errors of mean zero the error is below a small multiple of sqrt(n) u with high probability) is drawn
dashed. A last panel shows stagnation: the recursive sum of n ones stops at 2^p (p: significand bits,
implicit bit included), since 2^p + 1 is a tie that rounds to the even 2^p.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np

import lowbit
from lowbit import arith

FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
METHODS = ("recursive", "pairwise", "blocked")


def unit_roundoff(fmt: str) -> float:
    """u = 2^-p for a float format with p significand bits (round to nearest)."""
    return 2.0 ** -(lowbit.format(fmt).man + 1)


def gamma(k, u: float):
    """gamma_k = k u / (1 - k u), inf where k u >= 1 (the bound says nothing there)."""
    ku = np.asarray(k, dtype=np.float64) * u
    with np.errstate(divide="ignore"):
        return np.where(ku < 1, ku / (1 - ku), np.inf)


def data_scale(fmt: str, n_max: int) -> float:
    """Power of two c <= 1 with n_max * c <= max(fmt) / 2: no partial sum can overflow."""
    return min(1.0, 2.0 ** math.floor(math.log2(lowbit.format(fmt).max / 2 / n_max)))


def recursive_sums(x: np.ndarray, fmt: str) -> np.ndarray:
    """Recursive sums of every prefix along the last axis: out[..., n-1] = fl(...fl(x_1 + x_2)... + x_n)."""
    return arith.cumsum(x, fmt, axis=-1)


def pairwise_sum(x: np.ndarray, fmt: str) -> np.ndarray:
    """Pairwise (cascade) sum along the last axis, every addition rounded to fmt; an odd element out
    is carried up to the next level."""
    v = x
    while v.shape[-1] > 1:
        m = v.shape[-1] // 2 * 2
        paired = arith.add(v[..., 0:m:2], v[..., 1:m:2], fmt)
        v = np.concatenate([paired, v[..., m:]], axis=-1) if m < v.shape[-1] else paired
    return v[..., 0]


def blocked_sum(x: np.ndarray, fmt: str, block: int, accum: str = "fp32") -> np.ndarray:
    """Blocks of ``block`` terms summed recursively in fmt, block sums accumulated recursively in
    ``accum``, the total rounded to fmt. The last axis must be a multiple of block (or shorter)."""
    n = x.shape[-1]
    b = min(block, n)
    if n % b:
        raise ValueError(f"blocked_sum: length {n} is not a multiple of the block size {b}")
    parts = arith.sum(x.reshape(x.shape[:-1] + (n // b, b)), fmt, axis=-1)
    return lowbit.quantize(arith.sum(parts, accum, axis=-1), fmt)


def relative_errors(x: np.ndarray, fmt: str, ns, block: int, rec=None) -> dict:
    """{method: array (len(ns), trials)} of |s_hat - s| / sum|x_i| over the first n terms of each row
    (rec: the rows' recursive_sums, if already computed)."""
    rec = recursive_sums(x, fmt) if rec is None else rec
    out = {m: np.empty((len(ns), x.shape[0])) for m in METHODS}
    for i, n in enumerate(ns):
        xs = x[:, :n]
        exact = np.array([math.fsum(row) for row in xs])
        absum = np.array([math.fsum(np.abs(row)) for row in xs])
        for m, s_hat in (("recursive", rec[:, n - 1]), ("pairwise", pairwise_sum(xs, fmt)),
                         ("blocked", blocked_sum(xs, fmt, block))):
            out[m][i] = np.abs(s_hat - exact) / absum
    return out


def bounds(fmt: str, ns, block: int) -> dict:
    u, u32 = unit_roundoff(fmt), unit_roundoff("fp32")
    ns = np.asarray(ns, dtype=np.float64)
    b = np.minimum(block, ns)
    g_in, g_out = gamma(b - 1, u), gamma(ns / b - 1, u32)
    return {"recursive": gamma(ns - 1, u), "pairwise": gamma(np.ceil(np.log2(ns)), u),
            "blocked": np.where(np.isfinite(g_in), u + (1 + u) * (g_in + (1 + g_in) * g_out), np.inf),
            "sqrt(n) u": np.sqrt(ns) * u}


def stagnation_value(fmt: str) -> float:
    """Where the recursive sum of ones stops: 2^p, p the significand bits (2^p + 1 ties to 2^p)."""
    return 2.0 ** (lowbit.format(fmt).man + 1)


def table(fmt: str, ns, errs: dict, bnd: dict) -> str:
    head = ("| n | recursive median | max | pairwise median | max | blocked median | max "
            "| gamma_{n-1} | gamma_{log2 n} | blocked bound | sqrt(n) u |")
    lines = [f"{fmt} (u = 2^{int(math.log2(unit_roundoff(fmt)))}):", "", head, "|---:" * 11 + "|"]
    for i, n in enumerate(ns):
        cells = []
        for m in METHODS:
            cells += [f"{np.median(errs[m][i]):.1e}", f"{np.max(errs[m][i]):.1e}"]
        cells += [f"{bnd[k][i]:.1e}" for k in ("recursive", "pairwise", "blocked", "sqrt(n) u")]
        lines.append(f"| 2^{int(math.log2(n))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, ns, results: dict, stag: dict, block: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"recursive": "tab:blue", "pairwise": "tab:orange", "blocked": "tab:green"}
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.5))
    for ax, (fmt, (errs, bnd, scale)) in zip(axes.flat, results.items()):
        for m in METHODS:
            ax.loglog(ns, np.median(errs[m], axis=1), "o-", color=colors[m], label=f"{m} (median)")
            ax.loglog(ns, np.max(errs[m], axis=1), "x", color=colors[m], alpha=0.6)
            finite = np.isfinite(bnd[m])
            ax.loglog(np.asarray(ns)[finite], bnd[m][finite], "-", lw=0.8, color=colors[m],
                      label=f"{m} bound")
        ax.loglog(ns, bnd["sqrt(n) u"], "k--", lw=1, label="sqrt(n) u")
        ax.set_ylim(1e-5, 2)
        scaled = f", data x 2^{int(math.log2(scale))}" if scale != 1 else ""
        ax.set_title(f"{fmt}, u = 2^{int(math.log2(unit_roundoff(fmt)))}{scaled}")
        ax.set_xlabel("n")
        ax.set_ylabel("|s_hat - s| / sum |x_i|")
        ax.grid(True, which="major", alpha=0.3)
    ax = axes.flat[len(results)]
    for fmt, sums in stag.items():
        k = np.arange(1, len(sums) + 1)
        ax.loglog(k, sums, label=f"{fmt}: stops at {sums[-1]:g}")
    ax.loglog(k, k, "k:", lw=1, label="exact n")
    ax.set_title("recursive sum of n ones (stagnation)")
    ax.set_xlabel("n")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    spare = axes.flat[len(results) + 1:]
    for extra in spare:
        extra.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    (spare[0] if len(spare) else axes.flat[0]).legend(handles, labels, fontsize=9, loc="center")
    fig.suptitle(f"Summation error, uniform [0,1) data, blocked: b = {block} with an fp32 accumulator "
                 "(o median, x max over trials; thin lines: worst-case bounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def check_float_format(ap: argparse.ArgumentParser, fmt: str) -> None:
    """Exit 2 with one line unless fmt names a floating-point element format."""
    try:
        f = lowbit.format(fmt)
    except ValueError as e:
        ap.error(f"--formats: {e}")
    if not hasattr(f, "man"):
        ap.error(f"--formats: {fmt!r} is not a floating-point element format (e.g. fp16, bf16, fp8_e4m3)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), help="float formats (default: %(default)s)")
    ap.add_argument("--max-log2n", type=int, default=12,
                    help="largest n = 2^k (default 12; the time grows as 2^k)")
    ap.add_argument("--trials", type=int, default=20, help="random vectors per format (default 20)")
    ap.add_argument("--block", type=int, default=32, help="block size of the blocked sum (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/numerics"),
                    help="folder for summation_error.png and summation_error.md (default: %(default)s)")
    ap.add_argument("--no-plot", action="store_true", help="print the tables only")
    args = ap.parse_args(argv)
    if not 4 <= args.max_log2n <= 20 or args.trials < 1 or args.block < 1:
        ap.error("need 4 <= --max-log2n <= 20, --trials >= 1, --block >= 1")
    for fmt in args.formats:
        check_float_format(ap, fmt)
    t0 = time.time()
    ns = [2 ** k for k in range(4, args.max_log2n + 1)]
    header = (f"lowbit {lowbit.__version__}, numpy {np.__version__}, python {platform.python_version()}; "
              f"{args.trials} trials, seed {args.seed}, block {args.block}")
    print(header, flush=True)
    results, stag, texts = {}, {}, [header, ""]
    for fmt in args.formats:
        scale = data_scale(fmt, ns[-1])
        rng = np.random.default_rng(args.seed)
        x = lowbit.quantize(rng.random((args.trials, ns[-1])) * scale, fmt)
        # one recursive pass over the trials and a row of ones (the stagnation curve)
        rec = recursive_sums(np.concatenate([x, np.ones((1, ns[-1]))]), fmt)
        stag[fmt] = rec[-1]
        errs = relative_errors(x, fmt, ns, args.block, rec[:-1])
        bnd = bounds(fmt, ns, args.block)
        results[fmt] = (errs, bnd, scale)
        txt = table(fmt, ns, errs, bnd) + (f"\n(data scaled by {scale:g})" if scale != 1 else "")
        texts += [txt, ""]
        print(f"\n{txt}\n({time.time() - t0:.0f} s)", flush=True)
    line = f"recursive sum of n <= {ns[-1]} ones stops at: " + ", ".join(
        f"{fmt} {s[-1]:g} (first reached at n = {int(np.argmax(s == s[-1])) + 1}; 2^p = "
        f"{stagnation_value(fmt):g})" for fmt, s in stag.items())
    print("\n" + line)
    texts.append(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summation_error.md").write_text("\n".join(texts) + "\n")
    written = [args.out / "summation_error.md"]
    if not args.no_plot:
        try:
            plot(args.out / "summation_error.png", ns, results, stag, args.block)
            written.append(args.out / "summation_error.png")
        except ImportError:
            print("matplotlib is not installed (pip install 'lowbit[examples]'): no plot")
    print(f"wrote {', '.join(map(str, written))}; {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
