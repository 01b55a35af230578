"""Low-precision adapter weights: what an adapter matrix is stored as, its fake quantization during
training and its exact packed form.

``AdapterFormat.parse``: ``"32bit"``/``"fp32"`` (float, the default LoRA), ``"16bit"``/``"fp16"``
(a cast to fp16), ``"1bit"`` (the sign grid {-1, +1}), ``"2bit"``, ``"4bit"``, ``"8bit"`` (int2,
int4, int8), or any lowbit element format name (``"nf4"``, ``"e2m1"``, ``"int3"``, ...). Grid
formats have one least-squares scale per channel (:mod:`.scale_fit`): a channel is a rank
component of a LoRA adapter (a row of A, a column of B), so a rank-r adapter carries 2r scales.

The training forward is the quantized matrix itself (bit for bit what is stored) with a
straight-through gradient to the float master weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..formats import BlockFormat, format as parse_format
from ..quant.packed import pack_bits, packed_bytes, unpack_bits
from .scale_fit import nearest, optimal_scale, stored_scale

SIGN = "codebook(-1.0,1.0)"
BIT_NAMES = {"1bit": SIGN, "2bit": "int2", "4bit": "int4", "8bit": "int8"}
FLOAT_NAMES = {"32bit": torch.float32, "fp32": torch.float32, "16bit": torch.float16, "fp16": torch.float16,
               "bf16": torch.bfloat16}
SCALE_DTYPE = torch.float16


class _StraightThrough(torch.autograd.Function):
    """``q`` forward, the identity gradient to ``w`` backward."""

    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, g):
        return g, None


@dataclass(frozen=True)
class AdapterFormat:
    """How adapter matrices are stored: a float dtype, or a grid format with per-row LS scales."""

    name: str
    float_dtype: Optional[torch.dtype] = None
    grid: Optional[str] = None

    @classmethod
    def parse(cls, text: Optional[str]) -> "AdapterFormat":
        if text is None or text == "":
            return cls("32bit", torch.float32)
        if not isinstance(text, str):
            raise TypeError(f"an adapter format is a string such as '1bit', '4bit' or 'nf4', got {text!r}")
        key = text.strip().lower()
        if key in FLOAT_NAMES:
            return cls(key, FLOAT_NAMES[key])
        grid = BIT_NAMES.get(key, text.strip())
        try:
            fmt = parse_format(grid)
        except Exception as e:  # noqa: BLE001 - any unknown name is the user's input error
            raise ValueError(f"unknown adapter format {text!r} ({e}); accepted: {', '.join(FLOAT_NAMES)}, "
                             f"{', '.join(BIT_NAMES)} or a lowbit element format such as nf4, e2m1, int3") from None
        if isinstance(fmt, BlockFormat):
            raise ValueError(f"adapter format {text!r} is a block format; adapters take an element format "
                             "(int2..int8, nf4, e2m1, ...) with one least-squares scale per channel")
        if fmt.bits > 8:
            raise ValueError(f"adapter format {text!r} has {fmt.bits} bits; grids of at most 8 bits are "
                             "fitted by least squares (use 16bit/32bit for float adapters)")
        return cls(key if key in BIT_NAMES else str(fmt), None, str(fmt))

    @property
    def is_float(self) -> bool:
        return self.float_dtype is not None

    @property
    def bits(self) -> int:
        if self.is_float:
            return torch.finfo(self.float_dtype).bits
        return parse_format(self.grid).bits

    def values(self) -> torch.Tensor:
        v = parse_format(self.grid).values().double()
        return v[torch.isfinite(v)]

    # --- quantization of one matrix, channels along rows ------------------------------------
    @torch.no_grad()
    def quantize_rows(self, w: torch.Tensor):
        """(levels float64, scales in SCALE_DTYPE) of ``w`` (channels x n)."""
        if w.device.type != "cpu" or torch.get_num_threads() == 1:
            return self._quantize_rows(w)
        # many small ops: on a CPU, thread hand-offs cost far more than they save (50x measured on 2 cores)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._quantize_rows(w)
        finally:
            torch.set_num_threads(threads)

    def _quantize_rows(self, w: torch.Tensor):
        values = self.values().to(w.device)
        w64 = w.detach().double()
        s = stored_scale(w64, optimal_scale(w64, values), values, SCALE_DTYPE)
        s64 = s.double()
        safe = torch.where(s64 > 0, s64, torch.ones_like(s64))
        levels = nearest(w64 / safe[:, None], values)
        levels = torch.where(s64[:, None] > 0, levels, nearest(torch.zeros_like(w64), values))
        return levels, s

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        """The stored matrix (float32, rows = channels), straight-through to ``w``."""
        if self.float_dtype == torch.float32 and w.dtype == torch.float32:
            return w        # stored as it is: no rounding, and no autograd node in every forward
        if self.is_float:
            q = w.detach().to(self.float_dtype).float()
        else:
            levels, s = self.quantize_rows(w)
            q = levels.float() * s.float()[:, None]
        return _StraightThrough.apply(w, q)

    def pack(self, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The stored tensors of ``w`` (channels x n): ``weight`` in its float dtype, or bit-packed
        ``codes`` and per-channel ``scales``."""
        if self.is_float:
            return {"weight": w.detach().to(self.float_dtype).cpu().contiguous()}
        levels, s = self.quantize_rows(w)
        codes = parse_format(self.grid).encode_values(levels.cpu())
        return {"codes": pack_bits(codes, self.bits), "scales": s.cpu().contiguous()}

    def unpack(self, t: Dict[str, torch.Tensor], shape) -> torch.Tensor:
        """The float32 matrix the packed tensors hold (what :meth:`fake` computed)."""
        if self.is_float:
            return t["weight"].float()
        rows, n = shape
        levels = parse_format(self.grid).decode_codes(unpack_bits(t["codes"], self.bits, rows * n)).reshape(rows, n)
        return levels.float() * t["scales"].float()[:, None]

    def nbytes(self, shape) -> int:
        """Bytes :meth:`pack` stores for a (channels x n) matrix."""
        rows, n = shape
        if self.is_float:
            return rows * n * torch.finfo(self.float_dtype).bits // 8
        return packed_bytes(rows * n, self.bits) + rows * torch.finfo(SCALE_DTYPE).bits // 8
