"""GPTQ (Frantar et al., 2023), format-agnostic.

Columns are quantized one at a time; each column's rounding error is spread over the columns not
yet quantized through the inverse Hessian of the layer's reconstruction loss ||XW^T - XQ^T||^2
(H = 2 X^T X / n). Nothing here knows the number format: the quantizer rounds a column given its
group's parameters, so the same loop serves INT, FP, codebooks, MX and NVFP4.

Speed: every format whose fake-quantization is (round(w / d + z) - z) * d, with a per-(row, group)
divisor d and zero point z, runs the fused loop on per-column arrays of d and z: one Triton kernel
per block of columns on CUDA (kernels/triton_gptq.py), a torch loop on the transposed weight
elsewhere. Layers fed the same inputs share the Hessian and run as one matrix of stacked rows
(``gptq_shared``).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import kernels
from ..formats import BlockFormat
from ..quant.weight import GroupParams, WeightQuantizer
from ..rounding import STOCHASTIC_MODES

try:  # scipy ships a BLAS with syrk; torch does not expose it
    from scipy.linalg.blas import ssyrk as _syrk
except ImportError:  # pragma: no cover - scipy is in the llm extra
    _syrk = None


class HessianAccumulator:
    """Running H = 2/n sum x x^T over the rows x of a layer's inputs."""

    # From this width on, float32 CPU inputs go through BLAS's symmetric rank-k update (only one
    # triangle: half the flops). On the 2-core reference CPU, 65,536 rows: 1,536 columns 0.86-0.95 s
    # vs 1.70 s for the full product; 576 columns 0.20 vs 0.24 s on a quiet machine (a wash under load).
    SYRK_MIN_COLS = 512

    def __init__(self, cols: int, device=None):
        self._H = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self._upper = None  # numpy, Fortran order: the syrk path's accumulated upper triangle
        self.n = 0

    @property
    def H(self) -> torch.Tensor:
        if self._upper is not None:
            upper = torch.from_numpy(self._upper).t()  # Fortran upper triangle = C-order lower
            self._H = torch.tril(upper) + torch.tril(upper, -1).t()
            self._upper = None
        return self._H

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        m = x.shape[0]
        if m == 0:
            return
        beta, alpha = self.n / (self.n + m), 2.0 / (self.n + m)
        self.n += m
        x = x.float()
        if _syrk is not None and x.device.type == "cpu" and x.shape[1] >= self.SYRK_MIN_COLS:
            if self._upper is None:
                self._upper = np.asfortranarray(self.H.numpy())
            a = x.contiguous().numpy().T  # (cols, m) in Fortran order: A A^T = X^T X
            self._upper = _syrk(alpha, a, beta=beta, c=self._upper, trans=0, lower=0, overwrite_c=1)
            return
        self.H.addmm_(x.t(), x, beta=beta, alpha=alpha)


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

    ``keep``: optional bool mask shaped like W; those weights are not rounded (Q holds their
    current, error-updated value) and feed back no error.
    """
    return gptq_shared([W], H, [quantizer], block_size, percdamp, act_order,
                       None if keep is None else [keep])[0]


LOOPS = ("auto", "fused", "plain")
DEFAULT_LOOP = "auto"   # what gptq_shared(loop=None) takes (benchmarks set "plain" for the baseline)


def gptq_shared(
    Ws: Sequence[torch.Tensor],
    H: torch.Tensor,
    quantizers: Sequence[WeightQuantizer],
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    keeps: Optional[Sequence[Optional[torch.Tensor]]] = None,
    loop: Optional[str] = None,
) -> List[GPTQResult]:
    """GPTQ of several weights fed the same inputs (q/k/v, gate/up), hence one Hessian: one
    damping, one column order, one inverse and one column loop over their rows stacked. Rows never
    interact in GPTQ, so each result equals that of ``gptq`` on the weight alone; each quantizer
    keeps its own whole-tensor state (NVFP4's tensor scale) and group parameters.

    ``loop``: "fused" runs the column loop on per-column divisors and zero points (a Triton kernel
    per block on CUDA, a lean torch loop elsewhere); "plain" calls the quantizer per column (any
    format, any rounding mode); "auto" takes the fused loop wherever the format allows it; None
    means DEFAULT_LOOP.
    """
    loop = DEFAULT_LOOP if loop is None else loop
    if loop not in LOOPS:
        raise ValueError(f"unknown GPTQ loop {loop!r}; accepted: {', '.join(LOOPS)}")
    if len(Ws) != len(quantizers) or not Ws:
        raise ValueError(f"gptq_shared needs one quantizer per weight, got {len(Ws)} weights "
                         f"and {len(quantizers)} quantizers")
    cols = Ws[0].shape[1]
    for W in Ws:
        if W.dim() != 2 or W.shape[1] != cols:
            raise ValueError(f"weights sharing a Hessian need one input width; got shapes "
                             f"{[tuple(x.shape) for x in Ws]}")
    specs = {str(q.spec) for q in quantizers}
    if len(specs) > 1:
        raise ValueError(f"weights quantized in one loop need one spec, got {sorted(specs)}")
    H = H.detach().float().clone()
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not match weight of shape {tuple(Ws[0].shape)}")
    if not torch.isfinite(H).all():
        raise FloatingPointError("Hessian holds nan/inf: the calibration activations overflowed")
    W = torch.cat([x.detach().float() for x in Ws], dim=0) if len(Ws) > 1 else Ws[0].detach().float().clone()
    W = W.to(H.device)
    parts = []
    r0 = 0
    for x in Ws:
        parts.append(slice(r0, r0 + x.shape[0]))
        r0 += x.shape[0]
    K = None
    if keeps is not None and len(keeps) != len(Ws):
        raise ValueError(f"got {len(keeps)} keep masks for {len(Ws)} weights (pass None for a weight without one)")
    if keeps is not None and any(k is not None for k in keeps):
        K = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        for sl, k, x in zip(parts, keeps, Ws):
            if k is None:
                continue
            if k.shape != x.shape:
                raise ValueError(f"keep mask of shape {tuple(k.shape)} does not match weight of shape {tuple(x.shape)}")
            K[sl] = k.to(device=W.device, dtype=torch.bool)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    for q, sl in zip(quantizers, parts):
        q.prepare(W[sl])
    groups = quantizers[0].groups(cols)
    group_of = torch.empty(cols, dtype=torch.long)
    for gi, sl in enumerate(groups):
        group_of[sl] = gi
    params: List[Optional[List[GroupParams]]] = [None] * len(groups)
    if act_order:
        per_part = [_static_params(q, W[rs], groups) for q, rs in zip(quantizers, parts)]
        for gi in range(len(groups)):
            params[gi] = [pp[gi] for pp in per_part]
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(cols, device=H.device)
    W = W[:, perm]
    if K is not None:
        K = K[:, perm]
    H = H[perm][:, perm]
    Hinv, damp = _inverse_cholesky(H, percdamp)
    Hinv = Hinv.contiguous()  # both loops (and the kernel) read it row-major: same matmuls, same bits
    if damp > percdamp:
        warnings.warn(f"GPTQ: Hessian needed damping {damp:g} (asked {percdamp:g})", stacklevel=2)

    state = _LoopState(quantizers, parts, groups, group_of.tolist(), params, perm.tolist(), act_order)
    fused = loop == "fused" or (loop == "auto" and _fused_ok(quantizers))
    if loop == "fused" and not _fused_ok(quantizers):
        raise ValueError(f"the fused GPTQ loop cannot run {quantizers[0].spec}: use loop='plain' or 'auto'")
    with _one_thread():
        if fused:
            Q = _fused_loop(W, Hinv, K, state, block_size)
        else:
            Q = _column_loop(W, Hinv, K, state, block_size)
    Q = Q[:, torch.argsort(perm)]
    return [GPTQResult(Q[sl], [p[k] for p in params], damp, int(dead.sum())) for k, sl in enumerate(parts)]


def _static_params(q: WeightQuantizer, W: torch.Tensor, groups: List[slice]) -> List[GroupParams]:
    """Parameters of every group of W (rows, cols), fitted in one call: full groups as the rows of
    a (rows * n, g) matrix (fitting is row by row, so this equals fitting each group alone), a
    ragged last group on its own."""
    rows, cols = W.shape
    g = groups[0].stop - groups[0].start
    n_full = sum(1 for sl in groups if sl.stop - sl.start == g)
    out: List[GroupParams] = []
    if n_full:
        p = q.params(W[:, : n_full * g].reshape(rows * n_full, g))
        scale = p.scale.reshape(rows, n_full)
        zero = None if p.zero is None else p.zero.reshape(rows, n_full)
        out = [GroupParams(scale[:, i : i + 1], None if zero is None else zero[:, i : i + 1])
               for i in range(n_full)]
    out += [q.params(W[:, sl]) for sl in groups[n_full:]]
    return out


class _LoopState:
    """What both column loops share: the parts (row slices and their quantizers), the groups and
    their parameters, filled up front (static groups) or as the loop reaches each group."""

    def __init__(self, quantizers, parts, groups, group_of, params, perm_list, static):
        self.quantizers, self.parts, self.groups = quantizers, parts, groups
        self.group_of, self.params, self.perm, self.static = group_of, params, perm_list, static
        self.starts = {sl.start for sl in groups}

    def fit(self, gi: int, slab: torch.Tensor) -> None:
        self.params[gi] = [q.params(slab[rs]) for q, rs in zip(self.quantizers, self.parts)]

    def fake(self, w: torch.Tensor, gi: int) -> torch.Tensor:
        ps = self.params[gi]
        if len(self.parts) == 1:
            return self.quantizers[0].fake(w, ps[0])
        return torch.cat([q.fake(w[rs], p) for q, rs, p in zip(self.quantizers, self.parts, ps)])

    def affine_all(self):
        """(d, z) of every group, (rows, n_groups) each, in one call per part."""
        d, z = [], []
        for k, q in enumerate(self.quantizers):
            ps = [p[k] for p in self.params]
            zero = None if ps[0].zero is None else torch.cat([p.zero for p in ps], dim=1)
            dk, zk = q.column_affine(GroupParams(torch.cat([p.scale for p in ps], dim=1), zero))
            d.append(dk)
            z.append(zk)
        return torch.cat(d), (None if z[0] is None else torch.cat(z))

    def affine(self, gi: int):
        """(d, z) of group gi over all rows; z None without zero points."""
        dz = [q.column_affine(p) for q, p in zip(self.quantizers, self.params[gi])]
        d = torch.cat([x[0] for x in dz])
        z = None if dz[0][1] is None else torch.cat([x[1] for x in dz])
        return d, z


def _column_loop(W, Hinv, K, st: _LoopState, block_size):
    """The error-feedback loop over (permuted) columns, the quantizer called per column; fills the
    parameters of dynamic groups. Runs on the transposed weight (a column is a contiguous row), in
    the same layout as the fused torch loop, so that on the CPU both do the very same float
    arithmetic (torch's addr_ rounds differently on strided views)."""
    WT = W.t().contiguous()
    KT = None if K is None else K.t().contiguous()
    cols = WT.shape[0]
    QT = torch.zeros_like(WT)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        ET = torch.zeros(i2 - i1, WT.shape[1], dtype=WT.dtype, device=WT.device)
        for j in range(i1, i2):
            col = st.perm[j]
            gi = st.group_of[col]
            if not st.static and col in st.starts:
                sl = st.groups[gi]
                # the group's columns as updated so far: this one and the ones after it
                st.fit(gi, WT[j : j + sl.stop - sl.start].t())
            w = WT[j]
            q = st.fake(w[:, None], gi)[:, 0]
            if KT is not None:
                q = torch.where(KT[j], w, q)
            QT[j] = q
            err = (w - q) / Hinv[j, j]
            WT[j:i2].addr_(Hinv[j, j:i2], err, alpha=-1)
            ET[j - i1] = err
        WT[i2:] -= Hinv[i1:i2, i2:].t() @ ET
    return QT.t()


# --- the fused loop --------------------------------------------------------------------------------

def _column_grid(q: WeightQuantizer):
    return q.fmt.element if isinstance(q.fmt, BlockFormat) else q.grid


def _fused_ok(quantizers) -> bool:
    """The fused loop needs fake == (round(w / d + z) - z) * d: every format but block formats in
    directed modes; stochastic modes keep the plain loop (its random draws per column)."""
    q = quantizers[0]
    if q.spec.rounding in STOCHASTIC_MODES:
        return False
    return not (isinstance(q.fmt, BlockFormat) and not q._fast_block())


def _kernel_for(W: torch.Tensor, q: WeightQuantizer):
    """The Triton module when W is on CUDA and the kernel rounds to q's grid (codebooks and a few
    exotic formats are not claimed: the torch loop runs them, on the GPU too)."""
    if not W.is_cuda:
        return None
    tg = _triton_gptq()
    return tg if tg is not None and tg.claims(_column_grid(q), q.spec.rounding) else None


def _triton_gptq():
    if kernels.triton_backend() is None:
        return None
    from ..kernels import triton_gptq
    return triton_gptq


def _fused_loop(W, Hinv, K, st: _LoopState, block_size):
    """The same loop on per-column divisors D and zero points Z (rows, cols): on CUDA one Triton
    launch per block (per group segment with dynamic groups), elsewhere (or for grids the kernel
    does not claim) a torch loop of a dozen ops per column. W is updated in place."""
    rows, cols = W.shape
    q0 = st.quantizers[0]
    D = torch.empty_like(W)
    Z = None
    if st.static:
        d, z = st.affine_all()
        idx = torch.tensor([st.group_of[c] for c in st.perm], device=W.device)
        D = d[:, idx].contiguous()
        if z is not None:
            Z = z[:, idx].contiguous()
    elif q0.spec.symmetric is False:
        Z = torch.empty_like(W)
    tg = _kernel_for(W, q0)
    if tg is None:
        return _fused_loop_torch(W, Hinv, D, Z, K, st, block_size)
    K8 = None if K is None else K.to(torch.int8).contiguous()
    Q = torch.zeros_like(W)
    block_size = min(block_size, tg.BLOCK_COLS)
    W = W.contiguous()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        E1 = torch.zeros(rows, i2 - i1, dtype=W.dtype, device=W.device)
        for a, b in _segments(st, i1, i2):
            if not st.static and a in st.starts:
                _fit_dynamic(st, W[:, a : st.groups[st.group_of[a]].stop], D, Z, a, transposed=False)
            tg.block_loop(W[:, i1:i2], Q[:, i1:i2], E1, Hinv[i1:i2, i1:i2], D[:, i1:i2],
                          None if Z is None else Z[:, i1:i2], None if K8 is None else K8[:, i1:i2],
                          _column_grid(q0), q0.spec.rounding, a - i1, b - i1)
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q


def _segments(st: _LoopState, i1: int, i2: int):
    """Block i1..i2 cut at the starts of dynamic groups (their parameters are fitted in between)."""
    cuts = [i1] + ([] if st.static else [c for c in range(i1 + 1, i2) if c in st.starts]) + [i2]
    return list(zip(cuts[:-1], cuts[1:]))


def _fit_dynamic(st: _LoopState, slab, D, Z, a: int, transposed: bool) -> None:
    """Fit the dynamic group starting at column a to ``slab`` (its columns as updated so far) and
    write its (d, z) into D, Z."""
    gi = st.group_of[a]
    sl = st.groups[gi]
    st.fit(gi, slab.t() if transposed else slab)
    d, z = st.affine(gi)
    if transposed:
        D[sl] = d.t()
        if Z is not None:
            Z[sl] = z.t()
    else:
        D[:, sl] = d
        if Z is not None:
            Z[:, sl] = z


def _fused_loop_torch(W, Hinv, D, Z, K, st: _LoopState, block_size):
    """The fused loop in torch, on transposed copies so that each column is contiguous."""
    q0 = st.quantizers[0]
    WT = W.t().contiguous()
    DT = D.t().contiguous()
    ZT = None if Z is None else Z.t().contiguous()
    KT = None if K is None else K.t().contiguous()
    QT = torch.zeros_like(WT)
    cols, rows = WT.shape
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        ET = torch.zeros(i2 - i1, rows, dtype=WT.dtype, device=WT.device)
        for a, b in _segments(st, i1, i2):
            if not st.static and a in st.starts:
                _fit_dynamic(st, WT[a : st.groups[st.group_of[a]].stop], DT, ZT, a, transposed=True)
            _torch_segment(WT, QT, ET, Hinv, DT, ZT, KT, q0, i1, i2, a, b)
        WT[i2:] -= Hinv[i1:i2, i2:].t() @ ET
    return QT.t()


def _torch_segment(WT, QT, ET, Hinv, DT, ZT, KT, quantizer, i1, i2, a, b):
    """Columns a..b-1 of block i1..i2, in place on the transposed weights WT (cols, rows), where a
    column is a contiguous row: the plain loop's arithmetic op for op."""
    zero = torch.zeros((), device=WT.device)
    for j in range(a, b):
        w = WT[j]
        d = DT[j]
        y = torch.where(d > 0, w / d, zero)
        if ZT is not None:
            y = y + ZT[j]
        q = quantizer.round_scaled(y)
        q = (q - ZT[j]) * d if ZT is not None else q * d
        if KT is not None:
            q = torch.where(KT[j], w, q)
        QT[j] = q
        err = (w - q) / Hinv[j, j]
        WT[j:i2].addr_(Hinv[j, j:i2], err, alpha=-1)
        ET[j - i1] = err
