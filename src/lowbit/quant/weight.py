"""Fitting a weight matrix to a QuantSpec: scales per tensor / channel / group / block, and the fake
quantization they imply. Pure functions on tensors; GPTQ and RTN both call these.

A weight is (rows, cols) with groups running along cols (the input features). A group size that
does not divide cols leaves a shorter last group (576 = 4 x 128 + 64); block formats require their
block size to divide cols.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional

import torch

from ..formats import BlockFormat, FloatFormat, IntFormat, format
from .. import kernels
from ..kernels import reference
from ..kernels.scalar_div import div_scalar
from .spec import QuantSpec

MSE_GRID = 24  # candidate clipping ratios for the MSE scale search
MSE_MIN_RATIO = 0.5


@dataclass
class GroupParams:
    """Scale (and zero point) of one group of columns; tensors of shape (rows, 1)."""

    scale: torch.Tensor
    zero: Optional[torch.Tensor] = None


@lru_cache(maxsize=64)
def float_table(fmt) -> Optional[tuple]:
    """(magnitudes, midpoints) of a small signed float format whose non-negative codes 0, 1, 2, ...
    are its finite magnitudes in increasing order (then the parity of a magnitude's index is that
    of its code, which round-half-even needs), float32; None for any other grid.

    GPTQ rounds one column at a time: for such small vectors a table lookup (about ten torch ops)
    is several times faster than the general bit arithmetic (tens of ops)."""
    if not isinstance(fmt, FloatFormat) or fmt.bits > 8 or not fmt.signed or fmt.special == "fnu":
        return None
    half = fmt.decode_codes(torch.arange(2 ** (fmt.bits - 1), dtype=torch.int64))
    n = int(torch.isfinite(half).long().cumprod(0).sum())
    mags = half[:n]
    if n < 2 or mags[0] != 0 or not bool((mags[1:] > mags[:-1]).all()) or float(mags[-1]) != fmt.max:
        return None
    mids = (mags[1:] + mags[:-1]) / 2
    if not torch.equal(mids.float().double(), mids) or not torch.equal(mags.float().double(), mags):
        return None
    return mags.float(), mids.float()


_TABLES_ON: dict = {}


def round_by_table(y: torch.Tensor, table: tuple, neg_zero: bool) -> torch.Tensor:
    """Round-half-even of float32 y to a small float grid, saturating (as the reference does)."""
    key = (id(table), y.device)
    mags, mids = _TABLES_ON.get(key) or _TABLES_ON.setdefault(key, tuple(t.to(y.device) for t in table))
    a = y.abs()
    k = torch.bucketize(a, mids)                      # mids[k-1] < a <= mids[k]: a rounds to k or k+1
    tie = a == mids[k.clamp(max=mids.numel() - 1)]    # exactly between k and k+1: to the even code
    k = k + (tie & (k % 2 == 1)).long()
    m = mags[k]
    out = torch.where(torch.signbit(y), -m, m)
    if not neg_zero:
        out = out + 0.0                               # -0 becomes +0
    return torch.where(torch.isnan(y), y, out)


class WeightQuantizer:
    """Quantizes (rows, cols) weights to ``spec``; scales are rounded to ``scale_dtype`` so what is
    emulated is exactly what is stored."""

    def __init__(self, spec: QuantSpec, scale_dtype: torch.dtype = torch.float16):
        self.spec = spec
        self.fmt = format(spec.format)
        self.scale_dtype = scale_dtype
        self.tensor_scale: Optional[torch.Tensor] = None
        # block formats with an MSE scale search: optional per-column weights of the squared error
        # (shape (cols of the slab,) or like the slab); set by a caller that knows them (GPTQ's H diagonal)
        self.column_weight: Optional[torch.Tensor] = None
        if not spec.symmetric:
            assert isinstance(self.fmt, IntFormat)
            self.grid = IntFormat(self.fmt.width, is_signed=False)
        else:
            self.grid = self.fmt

    # --- layout ------------------------------------------------------------------------------
    def group_size(self, cols: int) -> int:
        if self.spec.granularity in ("group", "block"):
            return int(self.spec.group_size)
        return cols

    def check(self, shape) -> Optional[str]:
        """Why a weight of this shape cannot take the spec, or None if it can."""
        if len(shape) != 2:
            return f"expected a 2-D weight, got shape {tuple(shape)}"
        if isinstance(self.fmt, BlockFormat) and shape[1] % self.fmt.size:
            return f"{self.fmt} needs the input width ({shape[1]}) to be a multiple of {self.fmt.size}"
        return None

    def groups(self, cols: int) -> List[slice]:
        g = self.group_size(cols)
        return [slice(i, min(i + g, cols)) for i in range(0, cols, g)]

    def describe_groups(self, cols: int) -> str:
        g = self.group_size(cols)
        if self.spec.granularity == "tensor":
            return "one scale for the whole tensor"
        if g >= cols:
            return "one scale per output channel"
        n, last = divmod(cols, g)
        if last:
            return f"{n} groups of {g} and a last group of {last} along the {cols} input features"
        return f"{n} groups of {g} along the {cols} input features"

    # --- scales ------------------------------------------------------------------------------
    def prepare(self, W: torch.Tensor) -> None:
        """Whole-tensor state: the per-tensor scale of NVFP4-like formats or of 'tensor' granularity."""
        if isinstance(self.fmt, BlockFormat) and self.fmt.tensor_scale:
            self.tensor_scale = reference.tensor_scale(W.detach().double(), self.fmt)
        elif self.spec.granularity == "tensor":
            self._tensor_params = self._fit(W.detach().reshape(1, -1))

    def params(self, w: torch.Tensor) -> GroupParams:
        """Scale (and zero) for a slab of columns w: (rows, k)."""
        if isinstance(self.fmt, BlockFormat):
            from .exp_round import amax_block_scales

            scale = amax_block_scales(w.detach(), self.fmt, self.tensor_scale)  # float32, same values
            if scale is None:
                xb = w.detach().double().reshape(w.shape[0], 1, w.shape[1])
                scale = reference.block_scales(xb, self.fmt, self.tensor_scale)
            if self.spec.scale_method == "mse":  # search the scale grid near the amax rule
                from .block_mse import mse_block_scales

                scale = mse_block_scales(w.detach(), scale, self.fmt, lambda x, s: self.fake(x, GroupParams(s)),
                                         self.column_weight)
            elif self.spec.scale_method == "4over6":  # amax onto 6 or onto 4, the better per block
                from .four_over_six import four_over_six_scales

                scale = four_over_six_scales(w.detach(), self.fmt, self.tensor_scale,
                                             lambda x, s: self.fake(x, GroupParams(s)), self.column_weight, scale)
            return GroupParams(scale)
        if self.spec.granularity == "tensor":
            p = self._tensor_params
            return GroupParams(p.scale.expand(w.shape[0], 1),
                               None if p.zero is None else p.zero.expand(w.shape[0], 1))
        return self._fit(w.detach())

    def _range(self, w: torch.Tensor):
        x = w.float()
        if self.spec.scale_method == "percentile" and self.spec.percentile < 100:
            q = self.spec.percentile / 100
            if self.spec.symmetric:
                a = torch.quantile(x.abs(), q, dim=1, keepdim=True)
                return -a, a
            return (torch.quantile(x, 1 - q, dim=1, keepdim=True), torch.quantile(x, q, dim=1, keepdim=True))
        if self.spec.symmetric:
            a = x.abs().amax(dim=1, keepdim=True)
            return -a, a
        return x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)

    def _scale_for(self, lo: torch.Tensor, hi: torch.Tensor) -> GroupParams:
        if self.spec.symmetric:
            s = div_scalar(hi, self.fmt.max)  # same bits on CPU and CUDA
            zero = None
        else:
            lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
            s = div_scalar(hi - lo, self.grid.qmax)
        s = s.to(self.scale_dtype).float()
        s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
        if not self.spec.symmetric:
            zero = torch.clamp(torch.round(-lo / s), 0, self.grid.qmax)
        return GroupParams(s, zero)

    def _fit(self, w: torch.Tensor) -> GroupParams:
        lo, hi = self._range(w)
        best = self._scale_for(lo, hi)
        if self.spec.scale_method != "mse":
            return best
        best_err = self._err(w, best)
        for r in torch.linspace(1.0, MSE_MIN_RATIO, MSE_GRID)[1:].tolist():
            cand = self._scale_for(lo * r, hi * r)
            err = self._err(w, cand)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.scale = torch.where(better, cand.scale, best.scale)
            if best.zero is not None:
                best.zero = torch.where(better, cand.zero, best.zero)
        return best

    def _err(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        return (self.fake(w, p) - w.float()).pow(2).sum(dim=1, keepdim=True)

    # --- quantization ------------------------------------------------------------------------
    def levels(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """Element values on the format's grid (before the scale is applied), float64."""
        mode = self.spec.rounding
        if isinstance(self.fmt, BlockFormat):
            if self._fast_block():
                d, _ = self.column_affine(p)
                y = torch.where(d > 0, w.float() / d, torch.zeros((), device=w.device))
                q = self.round_scaled(y).double()
                return torch.where(torch.isnan(p.scale), p.scale, q)
            xb = w.double().reshape(w.shape[0], 1, w.shape[1])
            q = reference.block_elements(xb, p.scale, self.fmt, self.tensor_scale, mode, None, None)
            return q.reshape(w.shape)
        y = w.float() / p.scale
        if p.zero is not None:
            y = y + p.zero
        return self.round_scaled(y).double()

    def round_scaled(self, y: torch.Tensor) -> torch.Tensor:
        """Round float32 ``y`` (weights already divided by their scale, zero point added) to the
        element grid, saturating; float32 out."""
        mode = self.spec.rounding
        grid = self.fmt.element if isinstance(self.fmt, BlockFormat) else self.grid
        if isinstance(grid, IntFormat) and grid.frac == 0 and mode == "nearest_even":
            # same bits as the reference (torch.round is round-half-even), without its generality
            return torch.clamp(torch.round(y), grid.qmin, grid.qmax)
        table = float_table(grid) if mode == "nearest_even" else None
        if table is not None:
            from .exp_round import exp_params, round_by_exponent

            fast = exp_params(grid, table) if y.dtype == torch.float32 else None
            if fast is not None:  # same bits as the table, a few elementwise ops (quant/exp_round.py)
                return round_by_exponent(y, fast, grid.has_negative_zero)
            return round_by_table(y, table, grid.has_negative_zero)
        return kernels.quantize_element(y, grid, mode, "saturate")

    def _fast_block(self) -> bool:
        """Block formats: whether float32 arithmetic gives the reference's bits. The per-block
        division is exact in float32 (a power of two) or done in float32 by the reference itself
        (amax rule); the one gap, a quotient below float32's normal range, rounds to 0 in any
        nearest mode but not in the directed ones."""
        return self.spec.rounding.startswith("nearest")

    def column_affine(self, p: GroupParams):
        """(d, z), float32 (rows, 1) each (z None when there is no zero point), such that
        ``fake(w, p) == (round_scaled(y) - z) * d`` with ``y = w / d + z`` (y = 0 where d == 0);
        None where fake is not computed that way (block formats in directed or stochastic modes).
        GPTQ's fused loops run on (d, z) alone."""
        if isinstance(self.fmt, BlockFormat):
            if not self._fast_block():
                return None
            d = p.scale.float()
            if not self.fmt.pow2_scale and self.tensor_scale is not None:
                d = d * self.tensor_scale.to(d.device)
            return d, None
        return p.scale.float(), None if p.zero is None else p.zero.float()

    def dequant(self, q: torch.Tensor, p: GroupParams) -> torch.Tensor:
        if isinstance(self.fmt, BlockFormat):
            # float32 product == the reference's float64 product rounded to float32 (the power-of-
            # two case is exact; the amax rule multiplies in float32 in the reference too)
            d, _ = self.column_affine(p) if self._fast_block() else (None, None)
            if d is not None:
                return q.float() * d
            qb = q.double().reshape(q.shape[0], 1, q.shape[1])
            return reference.block_values(qb, p.scale, self.fmt, self.tensor_scale).reshape(q.shape).float()
        if p.zero is not None:
            return (q.float() - p.zero) * p.scale
        return q.float() * p.scale

    def fake(self, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
        """Quantize-dequantize a slab of columns with given parameters (float32 out)."""
        return self.dequant(self.levels(w, p), p)

    def rtn(self, W: torch.Tensor):
        """Round-to-nearest of a whole weight: (quantized float32 weight, params per group).

        Full groups are fitted together as rows of one (rows * n_groups, g) matrix; a ragged last
        group is fitted on its own."""
        self.prepare(W)
        rows, cols = W.shape
        g = self.group_size(cols)
        n_full = cols // g
        out = torch.empty(rows, cols, dtype=torch.float32, device=W.device)
        plist: List[GroupParams] = []
        if n_full:
            slab = W[:, : n_full * g].reshape(rows * n_full, g)
            p = self.params(slab)
            out[:, : n_full * g] = self.fake(slab, p).reshape(rows, n_full * g)
            scale = p.scale.reshape(rows, n_full)
            zero = None if p.zero is None else p.zero.reshape(rows, n_full)
            plist = [GroupParams(scale[:, i : i + 1], None if zero is None else zero[:, i : i + 1])
                     for i in range(n_full)]
        if n_full * g < cols:
            sl = slice(n_full * g, cols)
            p = self.params(W[:, sl])
            out[:, sl] = self.fake(W[:, sl], p)
            plist.append(p)
        return out, plist

    def bits_per_weight(self, cols: int) -> float:
        """True storage bits per weight: codes, scales (and zero points) amortised."""
        if isinstance(self.fmt, BlockFormat):
            return self.fmt.bits
        if self.spec.granularity == "tensor":
            return float(self.fmt.bits)
        n_groups = math.ceil(cols / self.group_size(cols))
        scale_bits = torch.finfo(self.scale_dtype).bits
        extra = scale_bits + (0 if self.spec.symmetric else self.fmt.bits)
        return self.fmt.bits + extra * n_groups / cols
