"""``lowbit export DIR --to gguf|compressed-tensors|dense --out PATH``: the command line of the
exporters (``export.gguf_export``, ``export.compressed_tensors_export``, ``export.dense``)."""
from __future__ import annotations

import argparse
import json

TARGETS = ("gguf", "compressed-tensors", "dense")


def add_parser(sub) -> None:
    """Register ``export`` on the ``lowbit`` subcommand parsers ``sub``."""
    from .gguf_export import TENSOR_TYPES

    x = sub.add_parser("export", help="write a lowbit checkpoint for other engines: GGUF (llama.cpp), "
                                      "compressed-tensors (vLLM, transformers) or a dense float model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("dir", help="a checkpoint directory written by lowbit quantize / train")
    x.add_argument("--to", required=True, choices=TARGETS)
    x.add_argument("--out", required=True, help="the .gguf file, or the output directory")
    x.add_argument("--allow-requantize", action="store_true",
                   help="re-quantize what the target format cannot hold exactly (the error is reported) and "
                        "drop what it cannot express (activation/KV quantization) instead of refusing")
    x.add_argument("--embedding-type", default="auto", choices=TENSOR_TYPES,
                   help="gguf: token embedding type (auto: its stored 16-bit values, exact)")
    x.add_argument("--output-type", default="auto", choices=TENSOR_TYPES,
                   help="gguf: type of an unquantized, untied output layer")
    x.add_argument("--requantize-type", default=None, choices=("q8_0", "q4_0", "q4_1"),
                   help="gguf, with --allow-requantize: the type of layers no GGUF type holds exactly "
                        "(default q4_0 for <= 4 bits, else q8_0)")
    x.add_argument("--tokenizer-pre", default=None,
                   help="gguf: llama.cpp's pre-tokenizer name (default: smollm for SmolLM models, else default)")
    x.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="dense: the weights' dtype (auto: the smallest that holds every value exactly)")
    x.add_argument("--json", action="store_true", help="print the export report as JSON")
    x.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if args.to == "gguf":
        from .gguf_export import GGUFOptions, export_gguf

        opts = GGUFOptions(embedding_type=args.embedding_type, output_type=args.output_type,
                           allow_requantize=args.allow_requantize, requantize_type=args.requantize_type,
                           tokenizer_pre=args.tokenizer_pre)
        report = export_gguf(args.dir, args.out, opts).to_dict()
    elif args.to == "compressed-tensors":
        from .compressed_tensors_export import export_compressed_tensors

        report = export_compressed_tensors(args.dir, args.out, allow_drop=args.allow_requantize)
    else:
        from .dense import export_dense

        report = export_dense(args.dir, args.out, dtype=args.dtype, allow_drop=args.allow_requantize)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    what = "lossless" if report.get("lossless") else "NOT lossless"
    print(f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, {what})")
    for key in ("types", "formats", "dtype"):
        if key in report:
            print(f"  {key}: {report[key]}")
    for t in report.get("requantized", []):
        print(f"  {t['name']} ({t['source']}): {t['gguf_type']}, relative error {t['rel_error']:.2e}: {t['note']}")
    for note in report.get("notes", []) + [f"dropped {d}" for d in report.get("dropped", [])]:
        print(f"  note: {note}")
    return 0
