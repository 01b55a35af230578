"""Shared test vectors and comparison for the kernel backends (imported by test_kernels_cpu/gpu).

The vectors follow the formats issue: every code point, every midpoint between neighbours, one
float32 ulp either side of each, overflow, +-0, nan, +-inf, float32 subnormals and random values
spread over the whole float32 exponent range.
"""
from __future__ import annotations

import numpy as np
import torch

import lowbit
from lowbit.formats import BlockFormat, FloatFormat, IntFormat
from lowbit.kernels import reference

DETERMINISTIC = ("nearest_even", "nearest_away", "nearest_zero", "toward_zero", "up", "down", "odd")

# every FloatFormat policy, subnormals on and flushed, odd shapes, integers and fixed point
ELEMENT_FORMATS = (
    "e4m3fn", "e5m2", "e4m3fnuz", "e5m2fnuz", "e3m4", "e4m3", "e3m2fn", "e2m3fn", "e2m1fn", "bf16",
    "fp16", "tf32", "p3109_k8p3", "p3109_k8p4", "e4m3_ftz", "e2m0", "e3m0fnan", "e5m2_b10",
    "e1m2fn", "e8m3", "e6m9", "e2m1fn_ftz", "e3m2_b-2",
    "int4", "int4n", "int8", "uint4", "int1", "uint8", "fixed8.4", "fixed8.-3", "int16", "ufixed6.2",
)
BLOCK_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "nvfp4",
                 "bfp8_b16", "block(e2m1fn,e4m3fn,16)", "block(int4,e8m0,8)", "block(e3m2fn,e4m3fnuz,32)")


def _f32_neighbours(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))])


def element_vectors(fmt, n_random: int = 20000, seed: int = 0, max_codes: int = 4096) -> torch.Tensor:
    """float32 test vector for an element format (both signs)."""
    vals = fmt.values().numpy()
    vals = vals[np.abs(vals) <= np.finfo(np.float32).max]
    mids = (vals[1:] + vals[:-1]) / 2
    if len(vals) > max_codes:
        # wide formats (bf16, fp16, ...): the smallest and largest magnitudes in full (subnormals,
        # the normal boundary, overflow) and a random sample of the rest
        rng0 = np.random.default_rng(seed + 1)
        order = np.argsort(np.abs(vals))
        keep = np.concatenate([order[:max_codes // 4], order[-max_codes // 4:],
                               rng0.choice(order, max_codes // 2, replace=False)])
        keep = np.unique(keep)
        vals, mids = vals[keep], mids[keep[keep < len(mids)]]
    pts = np.concatenate([vals, mids])
    pts = pts[np.abs(pts) <= np.finfo(np.float32).max]
    pts32 = pts.astype(np.float32)
    pts32 = pts32[pts32.astype(np.float64) == pts]          # only points float32 holds exactly
    top = float(np.abs(vals).max())
    extra = np.array([0.0, np.inf, np.nan, top * 1.01, top * 1.5, top * 2, top * 4, 1e30,
                      np.finfo(np.float32).max, np.finfo(np.float32).tiny, 2.0**-149, 2.0**-140,
                      1.0, 0.5, 3.0], dtype=np.float64)
    pos_min = float(np.abs(vals[vals != 0]).min()) if np.any(vals != 0) else 1.0
    extra = np.concatenate([extra, [pos_min / 2, pos_min / 4, pos_min * 0.75, pos_min * 0.25]])
    extra = extra[np.isnan(extra) | (np.abs(extra) <= np.finfo(np.float32).max)].astype(np.float32)
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):   # values past float32's range become +-inf: wanted
        rnd = (rng.standard_normal(n_random) * np.exp2(rng.integers(-150, 128, n_random))).astype(np.float32)
    rnd_in = (rng.uniform(-1, 1, n_random) * top).astype(np.float32)
    allv = np.concatenate([_f32_neighbours(pts32), extra, rnd, rnd_in])
    allv = np.concatenate([allv, -allv])
    return torch.from_numpy(allv)


def overflow_policies(fmt) -> tuple:
    """The overflow policies a format accepts (saturate always; inf/nan where it can signal them)."""
    if not isinstance(fmt, FloatFormat):
        return ("saturate",)
    out = ["saturate"]
    if fmt.has_inf or fmt.has_nan:
        out.append("inf")
    if fmt.has_nan:
        out.append("nan")
    return tuple(out)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: identical float32 bits, or both nan (nan payloads are not part of the contract)."""
    a32, b32 = a.float(), b.float()
    return (a32.view(torch.int32) == b32.view(torch.int32)) | (torch.isnan(a32) & torch.isnan(b32))


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    ok = same_bits(got.cpu(), want.cpu())
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:8].flatten()
        xs = x.reshape(-1).cpu()[bad] if x.numel() == got.numel() else None
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} elements differ; first at {bad.tolist()}: "
            f"x={None if xs is None else xs.tolist()} got={got.reshape(-1).cpu()[bad].tolist()} "
            f"want={want.reshape(-1).cpu()[bad].tolist()}")


def reference_element(x: torch.Tensor, fmt, mode: str, overflow: str = "saturate") -> torch.Tensor:
    return reference.round_element(x.double(), fmt, mode, overflow).to(x.dtype)


def block_vectors(fmt: BlockFormat, n_blocks: int = 512, seed: int = 0) -> torch.Tensor:
    """Blocks of float32 data that exercise scales and elements: random blocks over the whole float32
    range, blocks whose amax sits on/near powers of two and scale midpoints, blocks holding
    code points, midpoints and ulp neighbours of the element grid times the scale, all-zero blocks,
    blocks with nan/inf, and float32 subnormals."""
    rng = np.random.default_rng(seed)
    n = fmt.size
    rows = []
    for _ in range(n_blocks):
        e = rng.integers(-140, 120)
        rows.append(rng.standard_normal(n) * 2.0**e)
    elem = fmt.element
    ev = elem.values().numpy()
    mids = (ev[1:] + ev[:-1]) / 2
    grid = np.concatenate([ev, mids])
    grid = np.concatenate([grid, np.nextafter(grid.astype(np.float32), np.float32(np.inf)),
                           np.nextafter(grid.astype(np.float32), np.float32(-np.inf))])
    for e in (-130, -120, -20, -3, 0, 1, 7, 60, 110):
        scale = 2.0**e
        g = rng.permutation(grid)
        for i in range(0, len(g), n):
            chunk = g[i:i + n]
            if len(chunk) < n:
                chunk = np.concatenate([chunk, rng.choice(grid, n - len(chunk))])
            rows.append(chunk * scale)
    for amax in (1.0, 2.0, 0.75, 6.0, 448.0, 1.0 - 2**-24, 2.0**-126, 2.0**-149, 3.4e38, 2.0**127):
        r = rng.uniform(-1, 1, n) * amax
        r[rng.integers(n)] = amax
        rows.append(r)
    rows.append(np.zeros(n))
    z = np.zeros(n); z[3] = -0.0; z[1] = 2.0**-149
    rows.append(z)
    for special in (np.nan, np.inf, -np.inf):
        r = rng.standard_normal(n); r[n // 2] = special
        rows.append(r)
    data = np.stack(rows).astype(np.float32)
    data = np.where(np.isfinite(data) | np.isnan(data) | np.isinf(data), data, 0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(data))


def reference_block(x: torch.Tensor, fmt, mode: str, axis: int = -1) -> torch.Tensor:
    out, _, _, _ = reference.quantize_block(x, fmt, mode, axis)
    return out.to(x.dtype)
