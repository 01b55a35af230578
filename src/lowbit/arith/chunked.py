"""Arrays larger than memory: lowbit.arith functions applied block by block along axis 0.

    x = np.load("big.npy", mmap_mode="r")                       # or any array / np.memmap
    out = np.lib.format.open_memmap("exp.npy", "w+", np.float64, x.shape)
    chunked.map_blocks(arith.exp, x, fmt="bf16", out=out)       # elementwise: any function
    chunked.scan_blocks("cumsum", x, "bf16", out=out2)         # running sums, carried across blocks
    s = chunked.fold_blocks("sum", x, "bf16")                   # sequential sum, carried across blocks

Only ``rows`` rows (default: what fits in ``max_bytes`` of float64) are in memory at a time. The
results are identical to the in-memory functions: elementwise functions do not look across elements,
and the sequential reductions (every operation rounded, ``accum_every=1``) carry their rounded running
value from one block into the next, which is exactly the next step of the unblocked loop. Stochastic
modes draw from the generator block after block (same distribution, a different stream than one call).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from . import basic, reductions

_SCANS = {"cumsum": reductions.cumsum, "cumprod": reductions.cumprod}
_FOLDS = {"sum": basic.sum, "prod": reductions.prod}


def _rows(x, rows: Optional[int], max_bytes: int) -> int:
    if rows is not None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        return rows
    per_row = 8 * int(np.prod(x.shape[1:], dtype=np.int64)) or 8
    return max(1, max_bytes // per_row)


def _as_array(x, name="x"):
    if not hasattr(x, "shape") or not hasattr(x, "__getitem__"):
        raise TypeError(f"{name}: expected a NumPy array or memmap, got {type(x).__name__}")
    if len(x.shape) == 0:
        raise ValueError(f"{name}: block processing needs at least one axis")
    return x


def map_blocks(fn: Callable, *arrays, out=None, rows: Optional[int] = None, max_bytes: int = 1 << 28,
               **kwargs):
    """``fn(*blocks, **kwargs)`` on blocks of rows of same-shaped arrays, written into ``out`` (an
    array or memmap of the result's shape; None: a new float64 array)."""
    arrays = [_as_array(a, f"array {i}") for i, a in enumerate(arrays)]
    shape = arrays[0].shape
    for a in arrays[1:]:
        if a.shape != shape:
            raise ValueError(f"arrays must have one shape, got {shape} and {a.shape}")
    if out is None:
        out = np.empty(shape, dtype=np.float64)
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    step = _rows(arrays[0], rows, max_bytes)
    for r in range(0, shape[0], step):
        out[r:r + step] = fn(*[np.asarray(a[r:r + step], dtype=np.float64) for a in arrays], **kwargs)
    return out


def scan_blocks(name: str, x, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *,
                out=None, rows: Optional[int] = None, max_bytes: int = 1 << 28, generator=None):
    """cumsum or cumprod along axis 0, every operation rounded, block by block."""
    if name not in _SCANS:
        raise ValueError(f"scan_blocks does {', '.join(_SCANS)}, got {name!r}")
    x = _as_array(x)
    out = np.empty(x.shape, dtype=np.float64) if out is None else out
    step = _rows(x, rows, max_bytes)
    carry = None
    for r in range(0, x.shape[0], step):
        block = np.asarray(x[r:r + step], dtype=np.float64)
        if carry is not None:  # the rounded running value is the first term: rounding it is exact
            block = np.concatenate([carry[None], block])
        y = _SCANS[name](block, fmt, 0, 1, rounding, overflow, generator=generator)
        y = y if carry is None else y[1:]
        out[r:r + step] = y
        carry = y[-1]
    return out


def fold_blocks(name: str, x, fmt, rounding: str = "nearest_even", overflow: Optional[str] = None, *,
                rows: Optional[int] = None, max_bytes: int = 1 << 28, generator=None):
    """sum or prod along axis 0 (sequential, every operation rounded), block by block."""
    if name not in _FOLDS:
        raise ValueError(f"fold_blocks does {', '.join(_FOLDS)}, got {name!r}")
    x = _as_array(x)
    step = _rows(x, rows, max_bytes)
    acc = None
    for r in range(0, x.shape[0], step):
        block = np.asarray(x[r:r + step], dtype=np.float64)
        if acc is not None:
            block = np.concatenate([np.asarray(acc)[None], block])
        acc = _FOLDS[name](block, fmt, 0, 1, rounding, overflow, generator=generator)
    return acc


__all__ = ["map_blocks", "scan_blocks", "fold_blocks"]
