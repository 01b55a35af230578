"""GPTQ (Frantar et al., 2023), format-agnostic.

Columns are quantized one at a time; each column's rounding error is spread over the columns not
yet quantized through the inverse Hessian of the layer's reconstruction loss ||XW^T - XQ^T||^2
(H = 2 X^T X / n). Nothing here knows the number format: the quantizer rounds a column given its
group's parameters, so the same loop serves INT, FP, codebooks, MX and NVFP4.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..quant.weight import GroupParams, WeightQuantizer


class HessianAccumulator:
    """Running H = 2/n sum x x^T over the rows x of a layer's inputs."""

    def __init__(self, cols: int, device=None):
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


@dataclass
class GPTQResult:
    weight: torch.Tensor              # quantized (dequantized values), float32, original column order
    params: List[GroupParams]         # one per group, in original column order
    damping: float                    # relative damping finally used
    dead_columns: int                 # columns whose inputs were always zero


def _inverse_cholesky(H: torch.Tensor, percdamp: float):
    """Upper Cholesky factor of H^-1, adding damping until H is numerically positive definite."""
    diag_mean = torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = percdamp
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + damp * diag_mean * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        damp = max(damp * 10, 1e-4)
    raise FloatingPointError(f"Hessian is not positive definite even with damping {damp:g}")


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of tiny ops: with several intra-op threads each op pays a
    synchronisation that costs far more than its arithmetic (40x slower on a busy 2-core CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    quantizer: WeightQuantizer,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    keep: Optional[torch.Tensor] = None,
) -> GPTQResult:
    """Quantize weight W (rows, cols) given the Hessian H (cols, cols) of its inputs.

    Groups are dynamic (each group's scale is fitted when its first column is reached, to the
    weights as already updated by earlier errors); with ``act_order`` columns go in order of
    decreasing H diagonal and groups are fitted up front on the original weights (static groups),
    so every group keeps one scale whatever the order.

    ``keep`` (bool, W's shape) marks weights retained outside the low-bit grid (see ptq.retention):
    they are left out of every scale fit, and at their turn take their current, error-updated value
    unrounded (Q[keep] = W_current[keep]), so they feed back zero error; rounding them to the retain
    format is the caller's job.
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match weight of shape {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise FloatingPointError("Hessian holds nan/inf: the calibration activations overflowed")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    if keep is not None:
        if keep.shape != W.shape:
            raise ValueError(f"keep mask of shape {tuple(keep.shape)} does not match weight of shape {tuple(W.shape)}")
        keep = keep.to(W.device, torch.bool)
    quantizer.prepare(W if keep is None else W.masked_fill(keep, 0.0))
    groups = quantizer.groups(cols)
    group_of = torch.empty(cols, dtype=torch.long)
    for gi, sl in enumerate(groups):
        group_of[sl] = gi
    params: List[Optional[GroupParams]] = [None] * len(groups)
    if act_order:
        for gi, sl in enumerate(groups):
            params[gi] = quantizer.params(W[:, sl] if keep is None else W[:, sl].masked_fill(keep[:, sl], 0.0))
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    keep = None if keep is None else keep[:, perm]
    Hinv, damp = _inverse_cholesky(H, percdamp)
    if damp > percdamp:
        warnings.warn(f"GPTQ: Hessian needed damping {damp:g} (asked {percdamp:g})", stacklevel=2)

    with _one_thread():
        Q = _column_loop(W, Hinv, quantizer, groups, group_of, params, perm.tolist(), block_size, act_order,
                         keep)
    inv = torch.argsort(perm)
    return GPTQResult(Q[:, inv], params, damp, int(dead.sum()))


def _column_loop(W, Hinv, quantizer, groups, group_of, params, perm_list, block_size, act_order, keep=None):
    """The error-feedback loop over (permuted) columns; fills ``params`` of dynamic groups."""
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    starts = {sl.start for sl in groups}
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm_list[i1 + i]
            gi = int(group_of[col])
            if not act_order and col in starts:
                sl = groups[gi]
                # the group's columns: this one (being updated in W1) and the ones after it
                slab = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : sl.stop - sl.start]
                if keep is not None:
                    slab = slab.masked_fill(keep[:, i1 + i : i1 + i + slab.shape[1]], 0.0)
                params[gi] = quantizer.params(slab)
            w = W1[:, i : i + 1]
            q = quantizer.fake(w, params[gi])
            if keep is not None:
                q = torch.where(keep[:, i1 + i : i1 + i + 1], w, q)
            Q[:, i1 + i] = q[:, 0]
            err = (w[:, 0] - q[:, 0]) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q
