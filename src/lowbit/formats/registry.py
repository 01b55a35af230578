"""Format names: parsing, aliases, and the canonical string of every format (``str(fmt)``)."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Union

from .base import ElementFormat, FormatError
from .block import BlockFormat
from .codebook import NAMED_CODEBOOKS, Codebook
from .integer import IntFormat
from .minifloat import FloatFormat

Format = Union[ElementFormat, BlockFormat]

ELEMENT_ALIASES = {
    "fp8_e4m3": "e4m3fn",
    "fp8_e5m2": "e5m2",
    "fp6_e3m2": "e3m2fn",
    "fp6_e2m3": "e2m3fn",
    "fp4_e2m1": "e2m1fn",
    "fp4": "e2m1fn",
    "e8m0": "e8m0fnu",
    "bf16": "e8m7",
    "bfloat16": "e8m7",
    "fp16": "e5m10",
    "float16": "e5m10",
    "half": "e5m10",
    "tf32": "e8m10",
    "fp32": "e8m23",
    "float32": "e8m23",
}

BLOCK_ALIASES = {
    "mxfp8_e4m3": ("e4m3fn", "e8m0fnu", 32, False),
    "mxfp8_e5m2": ("e5m2", "e8m0fnu", 32, False),
    "mxfp6_e3m2": ("e3m2fn", "e8m0fnu", 32, False),
    "mxfp6_e2m3": ("e2m3fn", "e8m0fnu", 32, False),
    "mxfp4": ("e2m1fn", "e8m0fnu", 32, False),
    "mxint8": ("fixed8.6n", "e8m0fnu", 32, False),
    "nvfp4": ("e2m1fn", "e4m3fn", 16, True),
}
BLOCK_SHORTHANDS = {"mxfp8": "mxfp8_e4m3", "mxfp6": "mxfp6_e3m2", "mxfp4_e2m1": "mxfp4"}

_INT = re.compile(r"(u?)int(\d+)(n?)")
_FIXED = re.compile(r"(u?)fixed(\d+)\.(-?\d+)(n?)")
_FLOAT = re.compile(r"e(\d+)m(\d+)(fnuz|fnu|fnan|fn|f)?(?:_b(-?\d+))?(_ftz)?")
_P3109 = re.compile(r"p3109_k(\d+)p(\d+)(?:_b(-?\d+))?(_ftz)?")
_BFP = re.compile(r"bfp(\d+)_b(\d+)")
_BLOCK = re.compile(r"block\((.+)\)")
_CODEBOOK = re.compile(r"codebook\((.+)\)")


def _float(exp: int, man: int, suffix: str, bias, ftz) -> FloatFormat:
    bits = 1 + exp + man
    special = {
        None: "ieee",
        "": "ieee",
        "fnuz": "fnuz",
        "fnu": "fnu",
        "fnan": "fn",
        "f": "finite",
        # ml_dtypes/OCP naming: 8-bit 'fn' formats keep one nan, narrower 'fn' formats have none
        "fn": "fn" if bits >= 8 else "finite",
    }[suffix]
    return FloatFormat(exp, man, special, None if bias is None else int(bias), subnormals=not ftz)


def known_names() -> list:
    """Named formats that ``lowbit formats`` lists (patterns such as e3m4, int5 are also accepted)."""
    names = ["int2", "int3", "int4", "int4n", "int8", "uint4", "uint8", "fixed8.4",
             "e4m3", "e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz", "e3m4", "e3m2fn", "e2m3fn", "e2m1fn",
             "e8m0", "bf16", "fp16", "tf32", "p3109_k8p3", "p3109_k8p4", "nf4", "fp4_bnb"]
    return names + list(BLOCK_ALIASES) + ["bfp8_b16"]


@lru_cache(maxsize=512)
def _parse(name: str) -> Format:
    key = name.strip().lower().replace(" ", "")
    for prefix in ("float8_", "float6_", "float4_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = ELEMENT_ALIASES.get(key, key)
    key = BLOCK_SHORTHANDS.get(key, key)
    if key in NAMED_CODEBOOKS:
        return Codebook(NAMED_CODEBOOKS[key], key)
    if key in BLOCK_ALIASES:
        e, s, n, ts = BLOCK_ALIASES[key]
        return BlockFormat(_parse(e), _parse(s), n, ts)
    if m := _INT.fullmatch(key):
        return IntFormat(int(m[2]), is_signed=not m[1], narrow=bool(m[3]))
    if m := _FIXED.fullmatch(key):
        return IntFormat(int(m[2]), is_signed=not m[1], narrow=bool(m[4]), frac=int(m[3]))
    if m := _FLOAT.fullmatch(key):
        return _float(int(m[1]), int(m[2]), m[3], m[4], m[5])
    if m := _P3109.fullmatch(key):
        k, p = int(m[1]), int(m[2])
        if not (2 <= k <= 16 and 1 <= p < k):
            raise FormatError(f"P3109 needs 2 <= K <= 16 and 1 <= P < K, got K={k}, P={p}")
        bias = None if m[3] is None else int(m[3])
        return FloatFormat(k - p, p - 1, "p3109", bias, subnormals=not m[4])
    if m := _BFP.fullmatch(key):
        return BlockFormat(IntFormat(int(m[1]), narrow=True), _parse("e8m0fnu"), int(m[2]))
    if m := _BLOCK.fullmatch(key):
        parts = _split_args(m[1])
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "tensor"):
            raise FormatError(f"expected block(ELEMENT,SCALE,SIZE[,tensor]), got {name!r}")
        elem, scale = _parse(parts[0]), _parse(parts[1])
        if isinstance(elem, BlockFormat) or isinstance(scale, BlockFormat):
            raise FormatError("block formats cannot be nested")
        return BlockFormat(elem, scale, int(parts[2]), len(parts) == 4)
    if m := _CODEBOOK.fullmatch(key):
        try:
            vals = tuple(sorted({float(v) for v in m[1].split(",")}))
        except ValueError:
            raise FormatError(f"codebook values must be numbers, got {name!r}") from None
        return Codebook(vals)
    raise FormatError(
        f"unknown format {name!r}. Accepted: intN/uintN/intNn (N 1..32), fixedW.F, eXmY with optional "
        "suffix fn/fnuz/fnu/f/fnan and _bBIAS/_ftz (X 1..8, Y 0..23), p3109_kKpP, nf4, fp4_bnb, "
        "codebook(v1,v2,...), mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, mxint8, nvfp4, "
        "bfpN_bK, block(ELEMENT,SCALE,SIZE[,tensor]); aliases: " + ", ".join(sorted(ELEMENT_ALIASES))
    )


def _split_args(s: str) -> list:
    """Split on commas outside parentheses (block(codebook(...),e8m0,32))."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    parts.append(cur)
    return parts


def format(spec) -> Format:  # noqa: A001 - the public name users expect: lowbit.format("e4m3")
    """A Format from its name (``"e4m3"``, ``"mxfp4"``, ``"int4"``) or a Format passed through."""
    if isinstance(spec, (ElementFormat, BlockFormat)):
        return spec
    if not isinstance(spec, str):
        raise FormatError(f"a format is a name (str) or a lowbit Format, got {type(spec).__name__}")
    return _parse(spec)


def canonical_block_name(fmt: BlockFormat):
    for alias, (e, s, n, ts) in BLOCK_ALIASES.items():
        if (_parse(e), _parse(s), n, ts) == (fmt.element, fmt.scale, fmt.size, fmt.tensor_scale):
            return alias
    e8m0 = _parse("e8m0fnu")
    el = fmt.element
    if (isinstance(el, IntFormat) and el.narrow and el.frac == 0 and fmt.scale == e8m0
            and not fmt.tensor_scale):
        return f"bfp{el.width}_b{fmt.size}"
    return None
