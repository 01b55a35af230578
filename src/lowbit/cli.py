"""The ``lowbit`` command line."""
from __future__ import annotations

import argparse
import sys

from .formats import BlockFormat, FormatError, format, known_names


def _fmt_num(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def cmd_formats(args) -> int:
    if not args.name:
        cols = ["name", "bits", "max", "min_normal", "min_subnormal", "epsilon", "inf", "nan"]
        rows = []
        for n in known_names():
            f = format(n)
            d = f.describe()
            if isinstance(f, BlockFormat):
                e = f.element.describe()
                d = {**e, "name": n, "bits": f.bits, "max": f.max}
            rows.append([_fmt_num(d.get(c, "")) for c in cols])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        print("\nAlso accepted: any eXmY[fn|fnuz|fnu|f][_bBIAS][_ftz], intN/uintN/intNn, fixedW.F, "
              "p3109_kKpP, codebook(...), bfpN_bK, block(ELEMENT,SCALE,SIZE[,tensor]).")
        return 0
    f = format(args.name)
    for k, v in f.describe().items():
        print(f"{k:>14}: {_fmt_num(v)}")
    elem = f.element if isinstance(f, BlockFormat) else f
    try:
        vals = elem.values()
    except FormatError as e:
        print(f"{'values':>14}: ({e})")
        return 0
    shown = vals.tolist()
    label = "element values" if isinstance(f, BlockFormat) else "values"
    if len(shown) > 64 and not args.all:
        head = ", ".join(_fmt_num(v) for v in shown[:16])
        tail = ", ".join(_fmt_num(v) for v in shown[-16:])
        print(f"{label:>14}: {len(shown)} finite values: {head}, ..., {tail}  (--all lists every one)")
    else:
        print(f"{label:>14}: " + ", ".join(_fmt_num(v) for v in shown))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Low-precision formats, emulation and quantization")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formats", help="list the known number formats, or detail one")
    f.add_argument("name", nargs="?", help="a format name, e.g. e4m3, mxfp4, int4, nf4")
    f.add_argument("--all", action="store_true", help="list every value, however many")
    f.set_defaults(func=cmd_formats)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FormatError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
