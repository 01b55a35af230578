"""High-impact weight retention: the few weights that matter most are kept in a sparse side tensor at
a moderate precision (int8, fp8, fp16 or any element format lowbit knows); the rest are quantized to
the low-bit spec by RTN or GPTQ told which weights are kept.

Saliency (which weights matter), derived for one row w of a linear layer with input Hessian
H = 2 X^T X / n, whose output error is L(dw) = dw H dw^T:

* ``obs`` (default): rounding weight j alone to q(w_j) and letting every other weight of the row move
  to compensate optimally (Optimal Brain Surgeon) raises L by (w_j - q(w_j))^2 / [H^-1]_jj. This is
  the error GPTQ cannot undo, so keeping the weights with the largest such score removes the most
  irreducible error. (GPTQ's own per-column error, err_j = (w_j - q_j) / U_jj with U the Cholesky
  factor of H^-1, is the same quantity conditioned on the columns already done; the score uses the
  unconditioned [H^-1]_jj, which is order-free.) q is RTN at the low-bit spec with nothing kept.
* ``magnitude``: w_j^2 / [H^-1]_jj, the OBS cost of removing the weight (setting it to 0): large,
  well-used weights whatever the grid does to them.
* ``diag``: (w_j - q(w_j))^2 H_jj, the output error weight j's rounding adds when nothing else moves
  (the Hessian taken diagonal): the error RTN leaves, where ``obs`` is the error GPTQ leaves.
* ``fisher``: w_j^2 * E[g_j^2] with g the gradient of the calibration loss (causal LMs only): the
  diagonal-Fisher estimate of the loss increase from perturbing the weight on the scale of its size.

Every stored bit is counted: the dense low-bit codes (kept positions included, which hold 0), the
retained values at the retain format's width, one fp16 scale per row for scaled formats, and the
positions as either a bitmap (1 bit per weight) or CSR (a ceil(log2 cols)-bit column index per kept
weight plus a ceil(log2(cols+1))-bit count per row), whichever is smaller for the layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..formats import FloatFormat, format as parse_format
from ..formats.block import BlockFormat
from .. import kernels
from ..kernels.scalar_div import div_scalar
from ..quant.weight import WeightQuantizer
from ..quant.packed import pack_bits, pack_weight, unpack_bits, unpack_dense
from ..quant.spec import QuantSpec

SALIENCIES = ("obs", "magnitude", "fisher", "diag")
SCALE_BITS = 16  # per-row scales are stored as fp16


def _bytes(bits: int) -> int:
    return (bits + 7) // 8


@dataclass(frozen=True)
class RetainFormat:
    """The moderate precision of retained weights: an element format name, with one fp16 scale per
    row (``int8``) or per layer (``int8:tensor``) unless the format is a float of 16+ bits (fp16/bf16
    hold weights as they are, no scale)."""

    name: str
    scale: str = "row"

    @classmethod
    def parse(cls, text: str) -> "RetainFormat":
        name, _, scale = str(text).strip().partition(":")
        return cls(name, scale or "row")

    def __str__(self) -> str:
        return self.name if self.scale == "row" else f"{self.name}:{self.scale}"

    def __post_init__(self):
        if self.scale not in ("row", "tensor"):
            raise ValueError(f"retain scale {self.scale!r} not accepted; use FORMAT (one scale per row) or "
                             "FORMAT:tensor (one per layer), e.g. int8 or int8:tensor")
        try:
            fmt = parse_format(self.name)
        except ValueError as e:
            raise ValueError(f"unknown retain format {self.name!r}: {e}") from None
        if isinstance(fmt, BlockFormat):
            raise ValueError(f"retain format must be an element format (int8, e4m3fn, fp16, ...), not the "
                             f"block format {self.name!r}")
        if fmt.bits > 16:
            raise ValueError(f"retain format {self.name!r} has {fmt.bits} bits; at most 16 are accepted")

    @property
    def fmt(self):
        return parse_format(self.name)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def scaled(self) -> bool:
        f = self.fmt
        return not (isinstance(f, FloatFormat) and f.bits >= 16)

    def row_scales(self, values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> Optional[torch.Tensor]:
        """Per-row fp16 scale mapping each row's largest retained magnitude to the format's max."""
        if not self.scaled:
            return None
        amax = torch.zeros(n_rows, dtype=torch.float32)
        amax.scatter_reduce_(0, rows, values.abs().float(), reduce="amax")
        if self.scale == "tensor":
            amax = amax.amax().expand(n_rows)
        s = div_scalar(amax, float(self.fmt.max)).half().float()
        return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))

    def levels(self, values: torch.Tensor, rows: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
        """Values on the format's grid (before scaling), float64."""
        y = values.double()
        if scales is not None:
            y = y / scales.double()[rows]
        return kernels.quantize_element(y, self.fmt, "nearest_even", "saturate").double()

    def dequant(self, levels: torch.Tensor, rows: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
        v = levels.double()
        if scales is not None:
            v = v * scales.double()[rows]
        return v.float()

    def round(self, values: torch.Tensor, rows: torch.Tensor, n_rows: int):
        """(values rounded to the format, per-row scales or None)."""
        scales = self.row_scales(values, rows, n_rows)
        return self.dequant(self.levels(values, rows, scales), rows, scales), scales


# --- saliency ----------------------------------------------------------------------------------

def inverse_hessian_diag(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """diag(H^-1) of the damped Hessian (as GPTQ damps it); dead inputs get H_jj = 1. float32 as in
    GPTQ: the damping keeps H well conditioned and a score needs no more precision."""
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            return torch.diag(torch.cholesky_inverse(L)).float()
        damp = damp * 10
    raise FloatingPointError("Hessian is not positive definite even with heavy damping")


def hessian_saliency(W: torch.Tensor, H: torch.Tensor, quantizer: WeightQuantizer, kind: str = "obs",
                     percdamp: float = 0.01) -> torch.Tensor:
    """Per-weight score (rows, cols): output error that keeping the weight saves (see module doc)."""
    if kind not in ("obs", "magnitude", "diag"):
        raise ValueError(f"unknown Hessian saliency {kind!r}; accepted: obs, magnitude, diag")
    W = W.detach().float()
    if kind == "diag":
        return (W - quantizer.rtn(W)[0]).pow(2) * torch.diag(H).float().to(W.device)[None, :]
    d = inverse_hessian_diag(H, percdamp).to(W.device)
    if kind == "magnitude":
        return W.pow(2) / d
    Q, _ = quantizer.rtn(W)
    return (W - Q).pow(2) / d


def fisher_saliency(model, batches: List[dict], names: List[str]) -> Dict[str, torch.Tensor]:
    """w^2 * E[g^2] per weight of the named linears, g the gradient of the causal-LM loss per batch."""
    mods = {n: model.get_submodule(n) for n in names}
    acc = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in mods.items()}
    was_training = model.training
    model.eval()
    req = {n: m.weight.requires_grad for n, m in mods.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
    try:
        for b in batches:
            ids = b["input_ids"]
            with torch.enable_grad():
                out = model(**b, labels=ids)
                if getattr(out, "loss", None) is None:
                    raise ValueError("fisher saliency needs a model that returns a loss (a causal LM); "
                                     "use --retain-saliency obs or magnitude for encoders")
                grads = torch.autograd.grad(out.loss, [m.weight for m in mods.values()])
            for n, g in zip(mods, grads):
                acc[n] += g.float().pow(2)
    finally:
        for n, m in mods.items():
            m.weight.requires_grad_(req[n])
        model.train(was_training)
    return {n: mods[n].weight.detach().float().pow(2) * acc[n] / max(len(batches), 1) for n in names}


def top_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the round(ratio * numel) highest scores (ties broken by position)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"retain ratio must be in [0, 1), got {ratio}")
    k = int(round(ratio * score.numel()))
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(score.reshape(-1).float().cpu(), k).indices] = True
    return keep.reshape(score.shape)


# --- bit accounting and packing -----------------------------------------------------------------

def index_layout(rows: int, cols: int, k: int) -> Tuple[str, int]:
    """('bitmap' | 'csr', bits) — the cheaper way to store which k of rows x cols weights are kept."""
    bitmap = _bytes(rows * cols) * 8
    csr = (_bytes(k * max(1, math.ceil(math.log2(cols)))) + _bytes(rows * math.ceil(math.log2(cols + 1)))) * 8
    return ("csr", csr) if csr < bitmap else ("bitmap", bitmap)


def retained_bits(rows: int, cols: int, k: int, rfmt: RetainFormat) -> int:
    """Exact stored bits of the side tensor (values, positions, scales), byte padding included."""
    if k == 0:
        return 0
    bits = _bytes(k * rfmt.bits) * 8 + index_layout(rows, cols, k)[1]
    if rfmt.scaled:
        bits += (rows if rfmt.scale == "row" else 1) * SCALE_BITS
    return bits


def pack_retained(keep: torch.Tensor, Q: torch.Tensor, rfmt: RetainFormat) -> Dict[str, torch.Tensor]:
    """Side tensors for the kept entries of Q (whose kept values are already on the retain format)."""
    rows, cols = keep.shape
    flat = keep.reshape(-1).nonzero().reshape(-1)  # row-major order for both layouts
    if flat.numel() == 0:
        return {}
    r = flat // cols
    values = Q.reshape(-1)[flat].float()
    scales = rfmt.row_scales(values, r, rows)
    levels = rfmt.levels(values, r, scales)
    out = {"retain_values": pack_bits(rfmt.fmt.encode_values(levels), rfmt.bits)}
    layout, _ = index_layout(rows, cols, flat.numel())
    if layout == "bitmap":
        out["retain_bitmap"] = pack_bits(keep.reshape(-1).to(torch.int64), 1)
    else:
        out["retain_cols"] = pack_bits(flat % cols, max(1, math.ceil(math.log2(cols))))
        out["retain_row_counts"] = pack_bits(keep.sum(dim=1), math.ceil(math.log2(cols + 1)))
    if scales is not None:
        out["retain_scales"] = scales.half() if rfmt.scale == "row" else scales[:1].half()
    return out


def unpack_retained(t: Dict[str, torch.Tensor], rfmt: RetainFormat, shape) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keep mask, values at kept positions in row-major order) from ``pack_retained``'s tensors."""
    rows, cols = shape
    if "retain_bitmap" in t:
        keep = unpack_bits(t["retain_bitmap"], 1, rows * cols).bool().reshape(rows, cols)
    else:
        counts = unpack_bits(t["retain_row_counts"], math.ceil(math.log2(cols + 1)), rows)
        k = int(counts.sum())
        c = unpack_bits(t["retain_cols"], max(1, math.ceil(math.log2(cols))), k)
        r = torch.repeat_interleave(torch.arange(rows), counts)
        keep = torch.zeros(rows, cols, dtype=torch.bool)
        keep[r, c] = True
    flat = keep.reshape(-1).nonzero().reshape(-1)
    r = flat // cols
    levels = rfmt.fmt.decode_codes(unpack_bits(t["retain_values"], rfmt.bits, flat.numel()))
    scales = t["retain_scales"].float().expand(rows) if "retain_scales" in t else None
    return keep, rfmt.dequant(levels, r, scales)


def apply_retained(W: torch.Tensor, t: Dict[str, torch.Tensor], rfmt: Optional[RetainFormat]) -> torch.Tensor:
    """Dense low-bit weight W with the retained values written over their positions."""
    if rfmt is None or "retain_values" not in t:
        return W
    keep, values = unpack_retained(t, rfmt, W.shape)
    W = W.clone()
    W.reshape(-1)[keep.reshape(-1).nonzero().reshape(-1)] = values
    return W


def unpack_weight(t: Dict[str, torch.Tensor], spec: QuantSpec, shape, retain=None) -> torch.Tensor:
    """The float32 weight stored by ``pack_weight``; with ``retain`` (a retain format name) the
    retained high-impact values stored beside the codes are written over their positions."""
    W = unpack_dense(t, spec, shape)
    if retain:
        W = apply_retained(W, t, RetainFormat.parse(retain))
    return W


# --- one layer -----------------------------------------------------------------------------------

@dataclass
class RetainedLayer:
    weight: torch.Tensor          # final weight: low-bit values with retained values over them
    dense: torch.Tensor           # low-bit part (0 at kept positions), what the dense codes store
    params: list                  # the low-bit quantizer's group params
    keep: torch.Tensor            # bool mask
    side: Dict[str, torch.Tensor]  # packed side tensors
    side_bits: int


def finish_retained(Q: torch.Tensor, keep: torch.Tensor, rfmt: RetainFormat, params) -> RetainedLayer:
    """Round the kept entries of a low-bit result Q (which holds the updated full-precision values
    there) to the retain format; the dense part holds 0 at kept positions."""
    Q = Q.detach().float().cpu()
    keep = keep.cpu()
    flat = keep.reshape(-1).nonzero().reshape(-1)
    W = Q.clone()
    if flat.numel():
        r = flat // Q.shape[1]
        vals, _ = rfmt.round(Q.reshape(-1)[flat], r, Q.shape[0])
        W.reshape(-1)[flat] = vals
    dense = W.masked_fill(keep, 0.0)
    side = pack_retained(keep, W, rfmt)
    bits = 8 * sum(v.numel() * v.element_size() for v in side.values())
    return RetainedLayer(W, dense, params, keep, side, bits)


def rtn_retained(W: torch.Tensor, keep: torch.Tensor, quantizer: WeightQuantizer, rfmt: RetainFormat) -> RetainedLayer:
    """RTN of the non-kept weights (scales fitted without the kept ones), kept ones at the retain format."""
    W = W.detach().float()
    keep = keep.to(W.device)
    Q, params = quantizer.rtn(W.masked_fill(keep, 0.0))
    return finish_retained(torch.where(keep, W, Q), keep, rfmt, params)


# --- configuration ---------------------------------------------------------------------------------

ALLOCATIONS = ("fixed", "optimized")


@dataclass
class RetainConfig:
    """What `lowbit quantize --retain R --retain-format F --retain-alloc A` asks for."""

    ratio: float
    fmt: RetainFormat
    saliency: str = "obs"
    alloc: str = "fixed"
    ratios: Optional[Dict[str, float]] = None  # per layer, filled by the allocation program
    sens_seqs: int = 4                         # calibration sequences for the block sensitivities
    allocation: Optional[dict] = None          # the program's summary, for the report
    objective: str = "fisher"                  # optimized: loss model (ptq.retain_alloc.OBJECTIVES)
    curves: str = "rtn"                        # optimized: how each ratio's error is made (rtn | gptq)
    grid: Tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # optimized: ratios = ratio x these

    def __post_init__(self):
        if not 0.0 <= self.ratio < 0.5:
            raise ValueError(f"retain ratio must be in [0, 0.5), got {self.ratio}")
        if self.saliency not in SALIENCIES:
            raise ValueError(f"unknown retain saliency {self.saliency!r}; accepted: {', '.join(SALIENCIES)}")
        if self.alloc not in ALLOCATIONS:
            raise ValueError(f"unknown retain allocation {self.alloc!r}; accepted: {', '.join(ALLOCATIONS)}")
        if isinstance(self.fmt, str):
            self.fmt = RetainFormat.parse(self.fmt)
        if self.objective not in ("fisher", "block"):
            raise ValueError(f"unknown retention objective {self.objective!r}; accepted: fisher, block")
        if self.curves not in ("rtn", "gptq"):
            raise ValueError(f"unknown retention curves {self.curves!r}; accepted: rtn, gptq")
        self.grid = tuple(float(m) for m in self.grid)
        if not self.grid or any(not (m >= 0 and math.isfinite(m)) for m in self.grid) or 1.0 not in self.grid:
            raise ValueError(f"retention grid {list(self.grid)} not accepted: multiples of the ratio, each "
                             "finite and >= 0, including 1 (e.g. 0,0.5,1,2,4)")

    def ratio_for(self, name: str) -> float:
        if self.ratios is not None and name in self.ratios:
            return self.ratios[name]
        return self.ratio

    def to_dict(self) -> dict:
        d = {"ratio": self.ratio, "format": str(self.fmt), "saliency": self.saliency,
             "alloc": self.alloc, "allocation": self.allocation}
        if self.alloc == "optimized":
            d.update(objective=self.objective, curves=self.curves, grid=list(self.grid))
        return d


def parse_ratio(text) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    s = str(text).strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"retain ratio {text!r} is not a number or a percentage (e.g. 1% or 0.01)") from None


def gptq_retained(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, quantizer: WeightQuantizer,
                  rfmt: RetainFormat, **gptq_options) -> RetainedLayer:
    """GPTQ of the non-kept weights with scales fitted without the kept ones; kept ones take their
    error-updated value rounded to the retain format.

    GPTQ runs on W with the kept weights zeroed, so no scale (group, block, tensor) sees them. This
    changes nothing else: a kept weight feeds back no error whatever its value, so the updates every
    weight receives are the same, and the kept weight's updated value is W + (its updated zero)."""
    from .gptq import gptq

    W = W.detach().float()
    keep = keep.to(W.device)
    res = gptq(W.masked_fill(keep, 0.0), H, quantizer, keep=keep, **gptq_options)
    Q = torch.where(keep, W + res.weight, res.weight)
    return finish_retained(Q, keep, rfmt, res.params)


def retain_layer(name: str, W: torch.Tensor, H: torch.Tensor, quantizer: WeightQuantizer, cfg: RetainConfig,
                 method: str, scores: Optional[Dict[str, torch.Tensor]], gptq_options: dict):
    """Quantize one layer with retention: (weight, params, packed tensors, side bits per weight, info)."""
    ratio = cfg.ratio_for(name)
    score = scores[name] if scores is not None else hessian_saliency(W, H, WeightQuantizer(quantizer.spec),
                                                                      cfg.saliency, gptq_options.get("percdamp", 0.01))
    keep = top_mask(score, ratio)
    if method == "gptq":
        layer = gptq_retained(W, H, keep, quantizer, cfg.fmt, **gptq_options)
    else:
        layer = rtn_retained(W, keep, quantizer, cfg.fmt)
    params = [type(p)(p.scale.cpu(), None if p.zero is None else p.zero.cpu()) for p in layer.params]
    packed = {**pack_weight(layer.dense, quantizer, params), **layer.side}
    n = W.numel()
    info = {"format": str(cfg.fmt), "ratio": ratio, "kept": int(keep.sum()), "side_bits": layer.side_bits,
            "index": index_layout(W.shape[0], W.shape[1], int(keep.sum()))[0] if keep.any() else None}
    return layer.weight.to(W.device), layer.params, packed, layer.side_bits / n, info
