"""Least-squares scales: for each row ``w`` of a matrix and a grid of values ``v`` (any lowbit
element format), the scale ``s > 0`` minimising ``||w - s * round_v(w / s)||^2``, where
``round_v`` picks the nearest grid value.

For a fixed ``s`` the nearest values are the best codes, so the minimum over ``s`` of this error is
the joint least-squares optimum over (scale, codes). Two grids have it in closed form:

- the sign grid {-1, +1} (1-bit adapters): every code is ``sign(w)`` whatever ``s``, and the
  error ``sum (|w| - s)^2`` is least at ``s = mean |w|``;
- in general, as ``s`` falls from infinity each ``|w_i| / s`` crosses the grid's midpoints one by
  one. Between two crossings the codes are fixed and the error is a quadratic in ``s`` with its
  minimum at ``<w, q> / <q, q>``; :func:`exact_scale` walks every crossing in order (a sort and two
  cumulative sums) and returns the global minimum. Its cost is one event per element and
  midpoint, so it is used for grids of at most :data:`EXACT_MAX_VALUES` values.

Larger grids (8-bit) use :func:`lloyd_scale`: the best of several clipping ratios, then
alternating "nearest codes for the scale / least-squares scale for the codes" until neither
changes; the result is a fixed point of both steps (a local optimum), which tests compare with
:func:`exact_scale`.
"""
from __future__ import annotations

import functools

import torch

EXACT_MAX_VALUES = 16
_EVENT_BUDGET = 1 << 22      # events sorted at once (rows are processed in chunks below it)
_LLOYD_RATIOS = 48
_LLOYD_ITERS = 64
_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def nearest(y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The grid value nearest to each element of ``y`` (``values`` ascending; a tie takes the lower)."""
    v = values.to(y.dtype)
    mids = (v[1:] + v[:-1]) / 2
    return v[torch.searchsorted(mids, y.contiguous())]


def row_error(w: torch.Tensor, s: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, ``||w - s * nearest(w / s)||^2`` in float64 (a zero scale gives the zero row)."""
    w = w.double()
    values = values.to(w.device)
    s = s.double().reshape(-1, 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, nearest(w / safe, values.double()) * s, torch.zeros_like(w))
    return (w - q).pow(2).sum(1)


@functools.lru_cache(maxsize=64)
def _sides(table: tuple):
    """Both sides of a grid (as a tuple of floats), cached: every forward of an adapter asks again."""
    values = torch.tensor(table, dtype=torch.float64)
    return _side(values, 1.0), _side(values, -1.0)


def _side(values: torch.Tensor, sign: float):
    """For elements of this sign, in the mirrored grid ``u = sign * v``: the level taken just above
    0, the positive midpoints (ascending) and the level after crossing each."""
    u = torch.sort(values * sign).values
    mids = (u[1:] + u[:-1]) / 2
    start = u[torch.searchsorted(mids, torch.tensor([1e-300], dtype=u.dtype))].reshape(())
    pos = torch.nonzero(mids > 0).reshape(-1)
    return start, mids[pos], u[pos + 1]


def exact_scale(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The global least-squares scale of each row of ``w`` (float64, 0 for an all-zero row)."""
    w = w.double()
    rows, n = w.shape
    out = torch.zeros(rows, dtype=torch.float64, device=w.device)
    sides = [tuple(t.to(w.device) for t in side) for side in _sides(tuple(values.double().tolist()))]
    k = max(sides[0][1].numel(), sides[1][1].numel())
    chunk = max(1, _EVENT_BUDGET // max(1, n * max(k, 1)))
    for r0 in range(0, rows, chunk):
        out[r0:r0 + chunk] = _exact_rows(w[r0:r0 + chunk], sides, k)
    return out


def _pad(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    return torch.cat([t, t.new_full((k - t.numel(),), fill)])


def _exact_rows(w: torch.Tensor, sides, k: int) -> torch.Tensor:
    a = w.abs()
    neg = w < 0
    start = torch.where(neg, sides[1][0], sides[0][0])                 # level magnitudes at s = inf
    wq0 = (a * start).sum(1)
    qq0 = (start * start).sum(1)
    ww = (a * a).sum(1)
    if k == 0:  # a grid with no midpoint above zero (the sign grid): one interval, s = <w,q>/<q,q>
        return torch.where(ww > 0, wq0 / qq0, torch.zeros_like(ww)).clamp(min=0)
    # events: element i crosses midpoint j at s = |w_i| / m_j, moving from level prev_j to level_j
    mids = torch.stack([_pad(sides[0][1], k, float("inf")), _pad(sides[1][1], k, float("inf"))])
    after = torch.stack([_pad(sides[0][2], k, 0.0), _pad(sides[1][2], k, 0.0)])
    # the level before crossing midpoint j is the start level, then each previous crossing's
    before = torch.stack([_pad(torch.cat([sides[i][0].reshape(1), sides[i][2]])[:sides[i][1].numel()], k, 0.0)
                          for i in range(2)])
    side = neg.long()
    s_ev = a.unsqueeze(-1) / mids[side]                                # (rows, n, k); padded: 0
    d_wq = a.unsqueeze(-1) * (after[side] - before[side])
    d_qq = after[side] ** 2 - before[side] ** 2
    rows = w.shape[0]
    s_ev, d_wq, d_qq = s_ev.reshape(rows, -1), d_wq.reshape(rows, -1), d_qq.reshape(rows, -1)
    s_ev, order = torch.sort(s_ev, dim=1, descending=True)
    wq = torch.cat([wq0[:, None], wq0[:, None] + torch.cumsum(torch.gather(d_wq, 1, order), 1)], 1)
    qq = torch.cat([qq0[:, None], qq0[:, None] + torch.cumsum(torch.gather(d_qq, 1, order), 1)], 1)
    hi = torch.cat([torch.full_like(s_ev[:, :1], float("inf")), s_ev], 1)   # interval e: (lo_e, hi_e]
    lo = torch.cat([s_ev, torch.zeros_like(s_ev[:, :1])], 1)
    best = torch.where(qq > 0, wq / qq.clamp(min=1e-300), torch.zeros_like(wq))
    s = torch.minimum(torch.maximum(best, lo), hi)
    err = ww[:, None] - 2 * s * wq + s * s * qq
    err = torch.where(hi > 0, err, torch.full_like(err, float("inf")))  # intervals below s = 0 do not exist
    pick = torch.argmin(err, dim=1, keepdim=True)
    out = torch.gather(s, 1, pick).reshape(-1)
    return torch.where(ww > 0, out, torch.zeros_like(out))


def lloyd_scale(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A least-squares fixed point per row (see the module docstring), float64."""
    w = w.double()
    values = values.double().to(w.device)
    top = values.abs().max()
    amax = w.abs().amax(1)
    ratios = torch.linspace(0.1, 1.0, _LLOYD_RATIOS, dtype=torch.float64, device=w.device)
    cands = amax[:, None] / top * ratios[None, :]                       # (rows, R)
    y = w[:, None, :] / torch.where(cands > 0, cands, torch.ones_like(cands))[:, :, None]
    errs = (w[:, None, :] - nearest(y, values) * cands[:, :, None]).pow(2).sum(2)   # (rows, R), one pass
    s = torch.gather(cands, 1, errs.argmin(1, keepdim=True)).reshape(-1)
    for _ in range(_LLOYD_ITERS):
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = nearest(w / safe[:, None], values)
        qq = (q * q).sum(1)
        new = torch.where(qq > 0, (w * q).sum(1) / qq.clamp(min=1e-300), torch.zeros_like(s))
        if torch.equal(new, s):
            break
        s = new
    return torch.where(amax > 0, s.clamp(min=0), torch.zeros_like(s))


def optimal_scale(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The least-squares scale per row: exact for grids of up to :data:`EXACT_MAX_VALUES` values,
    a Lloyd fixed point beyond."""
    if values.numel() <= EXACT_MAX_VALUES:
        return exact_scale(w, values)
    return lloyd_scale(w, values)


def stored_scale(w: torch.Tensor, s: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` rounded to the storage ``dtype``: of the representable neighbours of ``s``, the one with
    the smaller error (returned in ``dtype``)."""
    down = s.to(dtype)
    # the neighbours of a non-negative float are its bit pattern +- 1 (any device, any float dtype)
    bits = down.view(_INT_OF[dtype])
    up = (bits + 1).view(dtype)
    low = torch.where(bits > 0, bits - 1, bits).view(dtype)
    cands = torch.stack([low, down, up], 1)
    errs = torch.stack([row_error(w, cands[:, j].double(), values) for j in range(3)], 1)
    return torch.gather(cands, 1, errs.argmin(1, keepdim=True)).reshape(-1)
