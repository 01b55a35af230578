"""Packed storage of quantized weights: integer codes at their bit width, scales, zero points.

``pack_weight`` turns a quantized weight (its values, the quantizer and the group parameters that
produced them) into plain tensors; ``unpack_dense`` gives back the identical float weight and
``dense_layout`` names the tensors, shapes and dtypes ``pack_weight`` produces for a spec and a
weight shape (what a checkpoint loader checks before decoding). Codes of any width 1..16 are
bit-packed little-endian into bytes.

This is the quantizer's own representation, so it lives in the quant layer: methods (GPTQ,
retention) pack here, and ``export`` writes the result into checkpoint files.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..formats import BlockFormat
from .spec import QuantSpec
from .weight import GroupParams, WeightQuantizer

# floating dtypes a layer's "scales" may be stored in (WeightQuantizer's scale_dtype)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_bytes(n: int, bits: int) -> int:
    """Bytes ``pack_bits`` produces for ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten integer codes (each < 2**bits) into a uint8 tensor of ceil(n * bits / 8) bytes."""
    if not 1 <= bits <= 16:
        raise ValueError(f"can pack codes of 1..16 bits, got {bits}")
    c = codes.reshape(-1).to(torch.int64)
    dev = c.device
    if bits == 8:
        return c.to(torch.uint8)
    if bits < 8:
        # 8 codes fill exactly `bits` bytes: build each chunk's 8*bits-bit integer, split it into bytes
        n = c.numel()
        c = torch.cat([c, c.new_zeros((-n) % 8)]).reshape(-1, 8)
        chunk = (c << (torch.arange(8, device=dev) * bits)).sum(dim=1)
        out = (chunk.unsqueeze(1) >> (torch.arange(bits, device=dev) * 8)) & 255
        return out.reshape(-1)[: (n * bits + 7) // 8].to(torch.uint8)
    bit_matrix = (c.unsqueeze(1) >> torch.arange(bits, device=dev)) & 1
    flat = bit_matrix.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8, device=dev)])
    weights = (2 ** torch.arange(8, device=dev)).to(torch.uint8)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``n`` codes as int64."""
    p = packed.reshape(-1).to(torch.int64)
    dev = p.device
    if bits == 8:
        return p[:n]
    if bits < 8:
        p = torch.cat([p, p.new_zeros((-p.numel()) % bits)]).reshape(-1, bits)
        chunk = (p << (torch.arange(bits, device=dev) * 8)).sum(dim=1)
        codes = (chunk.unsqueeze(1) >> (torch.arange(8, device=dev) * bits)) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n]
    flat = ((p.unsqueeze(1) >> torch.arange(8, device=dev)) & 1).reshape(-1)[: n * bits]
    return (flat.reshape(n, bits) << torch.arange(bits, device=dev)).sum(dim=1)


def pack_weight(Q: torch.Tensor, quantizer: WeightQuantizer, params: List[GroupParams]) -> Dict[str, torch.Tensor]:
    """Codes and scales of a quantized weight ``Q`` (rows, cols) fitted with ``params``."""
    rows, cols = Q.shape
    if quantizer.tensor_scale is not None:  # packing runs where Q is, wherever GPTQ ran
        quantizer.tensor_scale = quantizer.tensor_scale.to(Q.device)
    groups = quantizer.groups(cols)
    levels = _by_groups(quantizer.levels, Q, params, groups, torch.float64)
    fmt = quantizer.fmt
    elem = fmt.element if isinstance(fmt, BlockFormat) else quantizer.grid
    codes = elem.encode_values(levels)
    out = {"codes": pack_bits(codes, elem.bits)}
    scales = torch.cat([p.scale for p in params], dim=1)
    if isinstance(fmt, BlockFormat):
        out["scale_codes"] = fmt.scale.encode_values(scales).to(torch.uint8)
        if quantizer.tensor_scale is not None:
            out["tensor_scale"] = quantizer.tensor_scale.reshape(1).float()
    else:
        out["scales"] = scales.to(quantizer.scale_dtype)
        if params[0].zero is not None:
            zeros = torch.cat([p.zero for p in params], dim=1)
            out["zeros"] = pack_bits(zeros.to(torch.int64), quantizer.grid.bits)
    back = unpack_dense(out, quantizer.spec, (rows, cols))
    if not torch.equal(back, Q.float()):
        bad = (back != Q.float()).sum().item()
        raise AssertionError(f"packed weight does not decode to the quantized weight ({bad} values differ)")
    return out


def unpack_dense(t: Dict[str, torch.Tensor], spec: QuantSpec, shape) -> torch.Tensor:
    """The float32 weight stored by ``pack_weight`` (codes and scales; retained values, which the
    methods layer stores beside them, are applied by ``export.packing.unpack_weight``)."""
    rows, cols = shape
    q = WeightQuantizer(spec)
    fmt = q.fmt
    elem = fmt.element if isinstance(fmt, BlockFormat) else q.grid
    levels = elem.decode_codes(unpack_bits(t["codes"], elem.bits, rows * cols)).reshape(rows, cols)
    groups = q.groups(cols)
    if isinstance(fmt, BlockFormat):
        q.tensor_scale = t["tensor_scale"].reshape(()) if "tensor_scale" in t else None
        scales = fmt.scale.decode_codes(t["scale_codes"].to(torch.int64))
        zeros = None
    else:
        scales = t["scales"].float()
        zeros = None
        if "zeros" in t:
            zeros = unpack_bits(t["zeros"], q.grid.bits, rows * len(groups)).reshape(rows, len(groups)).float()
    params = [GroupParams(scales[:, gi : gi + 1], None if zeros is None else zeros[:, gi : gi + 1])
              for gi in range(len(groups))]
    return _by_groups(q.dequant, levels, params, groups, torch.float32)


def _by_groups(fn, X: torch.Tensor, params: List[GroupParams], groups: List[slice], dtype) -> torch.Tensor:
    """fn(slab, params) over every group of X (rows, cols). fn works row by row, so the full groups
    go in one call as the rows of a (rows * n, g) matrix (one call instead of one per group); a
    ragged last group goes alone."""
    rows, cols = X.shape
    out = torch.empty(rows, cols, dtype=dtype, device=X.device)
    g = groups[0].stop - groups[0].start
    n = sum(1 for sl in groups if sl.stop - sl.start == g)
    if n:
        scale = torch.cat([p.scale for p in params[:n]], dim=1).reshape(rows * n, 1)
        zero = None if params[0].zero is None else torch.cat([p.zero for p in params[:n]], dim=1).reshape(rows * n, 1)
        out[:, : n * g] = fn(X[:, : n * g].reshape(rows * n, g), GroupParams(scale, zero)).reshape(rows, n * g)
    for sl, p in zip(groups[n:], params[n:]):
        out[:, sl] = fn(X[:, sl], p)
    return out


def dense_layout(spec: QuantSpec, shape) -> Dict[str, Tuple[Tuple[int, ...], Tuple[torch.dtype, ...]]]:
    """{tensor name: (shape, accepted dtypes)} that ``pack_weight`` writes for a (rows, cols) weight
    quantized to ``spec`` (retained values, if any, come on top)."""
    rows, cols = shape
    q = WeightQuantizer(spec)
    fmt = q.fmt
    elem = fmt.element if isinstance(fmt, BlockFormat) else q.grid
    n_groups = len(q.groups(cols))
    u8 = (torch.uint8,)
    out = {"codes": ((packed_bytes(rows * cols, elem.bits),), u8)}
    if isinstance(fmt, BlockFormat):
        out["scale_codes"] = ((rows, n_groups), u8)
        if fmt.tensor_scale:
            out["tensor_scale"] = ((1,), (torch.float32,))
    else:
        out["scales"] = ((rows, n_groups), SCALE_DTYPES)
        if not spec.symmetric:
            out["zeros"] = ((packed_bytes(rows * n_groups, q.grid.bits),), u8)
    return out


def packed_nbytes(t: Dict[str, torch.Tensor]) -> int:
    """Bytes of a layer's packed tensors."""
    return sum(v.numel() * v.element_size() for v in t.values())
