"""The CUDA fault-injection kernel (kernels/triton_faults.py): bit for bit against a torch reference
of the same construction on the same Philox words, and the law of the flips by chi-square tests
(which a perturbed law fails). On CUDA the real kernel runs; without CUDA, Triton's interpreter."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import lowbit
from lowbit import arith

import _faults_ref as ref
from _interpreter import INTERPRET, interpreter_rerun, kernel_module

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
ALL8 = tuple(range(8))



@pytest.fixture
def tf():
    return kernel_module("triton_faults")


test_interpreter_run = interpreter_rerun(__file__)


def _codes(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(dtype)
    hi = min(2 ** (8 * torch.empty((), dtype=dtype).element_size() - 1), 2**62)
    return torch.randint(-hi, hi, (n,), generator=g, dtype=torch.int64).to(dtype)


def _want(codes, positions, per, key, p, tf, chunk=None):
    return ref.flip_reference(codes, positions, per, key, p, chunk or tf.chunk_units(p))


def _group(dtype) -> int:
    """Elements per 4 bytes (1 for wider codes): the groups of the per-group statistic."""
    return max(1, 4 // torch.empty((), dtype=dtype).element_size())


# --- bit for bit against the reference ----------------------------------------------------------------
# Float64 log in the kernel (libdevice; numpy under the interpreter) and in torch may differ by an ulp.
# A gap changes only if E / lambda then crosses an integer: probability about (E / lambda) 2^-52 per
# draw, at most C 2^-52 = 2^-32 here (C <= 2^20), so these fixed-seed comparisons are exact in practice.

CASES = [(torch.uint8, ALL8, "bit", 0.02, 9001), (torch.int8, (0, 7), "element", 0.05, 5000),
         (torch.int16, (3, 7, 14, 15), "bit", 0.03, 4099), (torch.int16, tuple(range(16)), "element", 0.06, 3001),
         (torch.int32, tuple(range(16)), "bit", 0.01, 3000), (torch.int64, tuple(range(0, 64, 3)), "bit", 0.02, 2500),
         (torch.int64, (1, 31, 32, 63), "bit", 1.0 / 16, 1001), (torch.int64, (1, 63), "element", 0.06, 2000),
         (torch.uint8, (6,), "bit", 1e-4, 20000)]


@pytest.mark.parametrize("dtype,positions,per,p,n", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernel_equals_reference(tf, dtype, positions, per, p, n):
    codes = _codes(n, dtype, seed=n).to(DEV)
    out = tf.flip_bits(codes, p, positions, per, 987654321987)
    assert out.dtype == dtype and out.shape == codes.shape
    want = _want(codes.cpu(), positions, per, 987654321987, p, tf)
    assert torch.equal(out.cpu(), want)
    assert not torch.equal(out, codes)


def test_strided_unaligned_and_shaped_inputs(tf):
    """An unaligned view, a strided view and a 2-D tensor: the flips of their contiguous copy."""
    base = _codes(8002, torch.uint8, 9).to(DEV)
    for codes in (base[1:], base[::2], base[:8000].reshape(80, 100)):
        out = tf.flip_bits(codes, 0.01, ALL8, "bit", 77)
        assert out.shape == codes.shape and out.is_contiguous()
        assert torch.equal(out.cpu(), _want(codes.contiguous().cpu(), ALL8, "bit", 77, 0.01, tf))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_many_chunks_and_a_ragged_last_chunk(tf, chunk):
    """C = 1 (every unit its own chunk), 7 (chunks across elements, a ragged last chunk), 64."""
    codes = _codes(1001, torch.int16, 5).to(DEV)
    pos = (0, 4, 9, 15)
    out = tf.flip_bits(codes, 0.03, pos, "bit", 31, chunk_=chunk)
    assert torch.equal(out.cpu(), _want(codes.cpu(), pos, "bit", 31, 0.03, tf, chunk))


def test_tiny_rate_and_huge_gaps(tf):
    """p = 1e-12, 1e-300 and 1e-320 (1/lambda = inf): gaps of ~1e13 units and more are clamped to
    the chunk: no flip, no overflow, and the reference agrees."""
    codes = _codes(4096, torch.int64, 2).to(DEV)
    for p in (1e-12, 1e-300, 1e-320):
        out = tf.flip_bits(codes, p, tuple(range(64)), "bit", 5)
        assert torch.equal(out, codes)
        assert ref.failures(5, 4096 * 64, p, tf.chunk_units(p))[0].numel() == 0


def test_chunk_sizes():
    from lowbit.kernels.triton_faults import MAX_CHUNK, MEAN_FLIPS, MIN_CHUNK, chunk_units
    assert chunk_units(1e-12) == MAX_CHUNK and chunk_units(1.0 / 16) == MIN_CHUNK
    for p in (1e-5, 1e-3, 0.01, 0.03):
        c = chunk_units(p)
        assert c & (c - 1) == 0 and c * p <= MEAN_FLIPS
        assert c == MAX_CHUNK or MEAN_FLIPS < 2 * c * p


@pytest.mark.parametrize("dtype,positions,per", [(torch.uint8, ALL8, "bit"), (torch.int16, (0, 5, 15), "bit"),
                                                 (torch.int64, (2, 40, 63), "element")])
@pytest.mark.parametrize("one_pass", [True, False])
def test_copy_and_flips_in_one_pass_over_many_tiles(tf, monkeypatch, dtype, positions, per, one_pass):
    """Small tiles (several per call, a ragged last one, a copy loop of several steps): every
    program copies its tile and then flips only inside it, so no flip is lost to a later copy; the
    two-pass design (torch copies, the kernel flips) gives the same codes."""
    monkeypatch.setattr(tf, "ONE_PASS", one_pass)
    monkeypatch.setattr(tf, "TILE", 512)
    monkeypatch.setattr(tf, "COPY_WORDS", 64)
    codes = _codes(512 * 5 + 200, dtype, 3).to(DEV)
    out = tf.flip_bits(codes, 0.02, positions, per, 4242, chunk_=256)
    assert torch.equal(out.cpu(), _want(codes.cpu(), positions, per, 4242, 0.02, tf, 256))


def test_gap_draw_is_exact_to_float64_precision():
    """E = -log(u) of the reference's draw (the kernel's formula) against mpmath at 50 digits, on
    crafted Philox words: both halves, w at the ends of its grid, w near 2^-54 (v = 1 - w rounds to 1
    or to 1 - 2^-53), random words. Relative error of E within 2^-50: every gap law probability
    P(gap >= j) = P(E >= j lambda) is then exact to ~ln(1/P) 2^-50 relative."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    cases = [(0, 0, 0), (0x7FFFFFFF, M, M), (1 << 31, 0, 0), (M, M, M), (1 << 31, 1 << 10, 7),
             (1 << 31, 1 << 9, 0), (1 << 31, (1 << 9) + 1, 0), (1 << 31, 1 << 11, M), (5, 12345, 678)]
    g = torch.Generator().manual_seed(0)
    cases += [tuple(int(v) for v in torch.randint(0, 2**32, (3,), generator=g)) for _ in range(200)]
    for w0, w1, w3 in cases:
        m = ((w0 & 0x7FFFFFFF) << 32) | w1
        w = (float(m) + (w3 + 0.5) * 2.0**-32) * 2.0**-64   # float64 as the kernel's (m rounded once)
        u = 1 - mpmath.mpf(w) if w0 >> 31 else mpmath.mpf(w)
        exact = -mpmath.log(u)
        e = _e_of_words(w0, w1, w3)
        assert abs(e - exact) <= abs(exact) * 2**-50, (w0, w1, w3, e, exact)


M = 0xFFFFFFFF


def _e_of_words(w0: int, w1: int, w3: int) -> float:
    """E computed by the reference's formula for given words (lambda = 1)."""
    m = ((w0 & 0x7FFFFFFF) << 32) | w1
    w = torch.tensor([(float(m) + (w3 + 0.5) * 2.0**-32) * 2.0**-64], dtype=torch.float64)
    v = 1.0 - w
    d = (1.0 - v) - w
    if w0 >> 31:
        return float(-(torch.log(v) + d))
    return float(-torch.log(w))


def test_philox_matches_random123_known_answers():
    m = 0xFFFFFFFF
    got = ref.philox4x32(0, torch.zeros(1, dtype=torch.int64), 0, 0, 0, rounds=10)
    assert [int(v) for v in got] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    got = ref.philox4x32(m | m << 32, torch.full((1,), m, dtype=torch.int64), m, m, m, rounds=10)
    assert [int(v) for v in got] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_dispatch_seed_and_errors(tf):
    codes = _codes(3000, torch.uint8).to(DEV)
    mask = arith.field_mask(lowbit.format("e4m3fn"), ["exponent", "sign"])
    pos = tuple(b for b in range(8) if mask >> b & 1)
    out = arith.flip_bits(codes, 0.01, mask, seed=7)
    assert torch.equal(out.cpu(), _want(codes.cpu(), pos, "bit", 7, 0.01, tf))
    gen = torch.Generator(device=DEV).manual_seed(3)
    a = arith.flip_bits(codes, 0.01, mask, seed=gen)
    b = arith.flip_bits(codes, 0.01, mask, seed=torch.Generator(device=DEV).manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, arith.flip_bits(codes, 0.01, mask, seed=gen))
    assert bool((((out ^ codes).to(torch.int64) & ~mask) == 0).all())
    with pytest.raises(ValueError, match="seed"):
        arith.flip_bits(codes, 0.01, mask, seed="x")
    with pytest.raises(ValueError, match="CUDA tensor"):
        tf.flip_bits(codes.float(), 0.01, pos, "bit", 0)
    with pytest.raises(ValueError, match="1/16"):
        tf.flip_bits(codes, 0.5, pos, "bit", 0)
    with pytest.raises(ValueError, match="inside the code"):
        tf.flip_bits(codes, 0.01, (3, 8), "bit", 0)
    assert not tf.claims(codes, 0.01, (8,)) and tf.claims(codes.to(torch.int16), 0.01, (8,))
    assert tf.flip_bits(codes[:0], 0.01, pos, "bit", 0).numel() == 0


def test_sparse_path_when_the_kernel_fails(tf, monkeypatch):
    """A kernel that raises: flip_bits warns and the sparse path answers with the same law's flips."""
    from lowbit.arith import faults

    def broken(*a, **k):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(tf, "flip_bits", broken)
    monkeypatch.setattr(faults, "_fused_error", [])
    codes = _codes(3000, torch.uint8).to(DEV)
    with pytest.warns(UserWarning, match="fused Triton kernel failed"):
        out = arith.flip_bits(codes, 0.01, 0xFF, seed=1)
    assert out.shape == codes.shape and not torch.equal(out, codes)


@pytest.mark.parametrize("per_element", [False, True])
def test_kernel_compiles_for_hopper(per_element):
    """The kernel compiles for an H100 (sm_90) without a GPU with the installed Triton (3.9 here,
    3.6 on the GPU machine: run this file with each): the tile copied, then a barrier, then flips
    applied with a relaxed 32-bit XOR atomic,
    the float64 libdevice logarithm (its ln 2 constant), no division and no float32 approximation."""
    import re
    if INTERPRET:
        pytest.skip("the interpreter does not compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as e:  # no NVIDIA backend or no ptxas in this triton
        pytest.skip(f"Triton's NVIDIA backend is not usable here ({type(e).__name__})")
    from lowbit.kernels import triton_faults as tf
    consts = {"NB": 8, "BITS": 8, "PER_ELEMENT": per_element, "C": 2**14, "LANES": 32, "BLOCK": 32,
              "COPY": True, "TILE_WORDS": 2**14, "COPY_WORDS": tf.COPY_WORDS, "NR": 7}
    sig = {"src_ptr": "*i32", "words_ptr": "*i32", "nwords": "i64", "nunits": "i64", "nchunks": "i64",
           "seed": "i64", "inv_lam_bits": "i64", "POS": "*i32", **{k: "constexpr" for k in consts}}
    aligned = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}   # as Triton specializes them
    try:
        src = ASTSource(fn=tf._faults_kernel, signature=sig, constexprs=consts, attrs=aligned)
    except TypeError:   # a Triton without attrs: no alignment known, so no vector check
        src, aligned = ASTSource(fn=tf._faults_kernel, signature=sig, constexprs=consts), None
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tf.WARPS})
    ptx = k.asm["ptx"]
    if aligned:     # whole tiles copy with 16-byte vectors, as torch's copy does
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert not re.findall(r"\bdiv\.[a-z0-9.]+", ptx) and "0d3FE62E42FEFA39EF" in ptx
    assert re.search(r"\b(atom|red)\.global\.gpu\.relaxed\.xor\.b32", ptx)
    assert ptx.index("bar.sync") < ptx.index("xor.b32")
    assert not re.search(r"lg2\.approx|ex2\.approx", ptx)


# --- the law: chi-square tests ----------------------------------------------------------------------

def _chi2_bound(df: int, z: float = 4.75) -> float:
    """Upper 1e-6 quantile of chi-square(df) (Wilson-Hilferty): a right law fails once in a million."""
    c = 2.0 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def _chi2(observed, expected) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


def _binomial_cells(k: torch.Tensor, zeros: int, trials: int, p: float):
    """Observed and expected counts of k = 0, 1, ... for Binomial(trials, p), the tail pooled from
    where it expects fewer than 5; k holds the nonzero counts only, ``zeros`` how many are 0."""
    n = k.numel() + zeros
    probs = [math.comb(trials, j) * p**j * (1 - p) ** (trials - j) for j in range(trials + 1)]
    top = 1
    while top < trials and n * (1 - sum(probs[:top + 1])) >= 5:
        top += 1
    obs = [zeros + int((k == 0).sum())] + [int((k == j).sum()) for j in range(1, top)] + [int((k >= top).sum())]
    return obs, [n * q for q in probs[:top]] + [n * (1 - sum(probs[:top]))]


def _cells_chi2(obs_exp) -> tuple:
    obs, exp = obs_exp
    return _chi2(obs, exp), _chi2_bound(len(obs) - 1)


def _sparse_bits(diff: torch.Tensor, positions, group: int):
    """Rows (elements) with a flip, their (rows, nb) 0/1 flip matrix, and the flips per group of
    the groups that have one (complete groups only)."""
    d = diff.reshape(-1)
    idx = d.nonzero().squeeze(1)
    v = d[idx].to(torch.int64)
    f = torch.stack([(v >> b) & 1 for b in positions], 1).cpu()
    full = idx < d.numel() // group * group
    grp = (idx[full] // group).cpu()
    per_group = torch.zeros(0, dtype=torch.int64)
    if grp.numel():
        uniq, inv = torch.unique(grp, return_inverse=True)
        per_group = torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inv, f[full.cpu()].sum(1))
    return f, per_group


def per_bit_statistics(diff: torch.Tensor, positions, p: float, group: int) -> dict:
    """Chi-square statistics and bounds for a per-bit law with rate p: each bit's frequency, each
    pair of bits in one element, flips per element and per group (independence across the group)."""
    n, nb = diff.numel(), len(positions)
    f, per_group = _sparse_bits(diff, positions, group)
    out = {"bits": (_chi2(f.sum(0).tolist(), [n * p] * nb) / (1 - p), _chi2_bound(nb))}
    pairs = [int((f[:, i] & f[:, j]).sum()) for i in range(nb) for j in range(i + 1, nb)]
    if pairs:
        out["pairs"] = (_chi2(pairs, [n * p * p] * len(pairs)), _chi2_bound(len(pairs)))
    out["per element"] = _cells_chi2(_binomial_cells(f.sum(1), n - f.shape[0], nb, p))
    ng = n // group
    out["per group"] = _cells_chi2(_binomial_cells(per_group, ng - per_group.numel(), nb * group, p))
    return out


def _assert_law(stats: dict):
    bad = {k: v for k, v in stats.items() if v[0] > v[1]}
    assert not bad, f"chi-square above its 1e-6 bound: {bad}"


def _assert_detects(stats: dict):
    assert any(v[0] > v[1] for v in stats.values()), f"a wrong law passed: {stats}"


def test_per_bit_law_and_a_wrong_law_fails(tf):
    n, p = 32_768, 0.04
    codes = _codes(n, torch.uint8, 1).to(DEV)
    diff = (tf.flip_bits(codes, p, ALL8, "bit", 11) ^ codes).cpu()
    _assert_law(per_bit_statistics(diff, ALL8, p, 4))
    # wrong laws: rate 1.1 p; a wrong bit set (bit 7 never flips, the others take its share)
    wrong = ref.flip_reference(codes.cpu(), ALL8, "bit", 11, 1.1 * p, tf.chunk_units(p)) ^ codes.cpu()
    _assert_detects(per_bit_statistics(wrong, ALL8, p, 4))
    seven = ref.flip_reference(codes.cpu(), ALL8[:7], "bit", 11, p * 8 / 7, tf.chunk_units(p)) ^ codes.cpu()
    _assert_detects(per_bit_statistics(seven, ALL8, p, 4))


def test_per_bit_law_wide_codes(tf):
    """int32 codes (one element per group, 12 allowed bits of 32) and int16 (two per group)."""
    p = 0.05
    for dtype, positions, n in ((torch.int32, (0, 5, 9, 13, 17, 20, 22, 25, 26, 28, 30, 31), 8192),
                                (torch.int16, (0, 1, 2, 10, 11, 15), 16384)):
        codes = _codes(n, dtype, 2).to(DEV)
        diff = (tf.flip_bits(codes, p, positions, "bit", 5) ^ codes).cpu()
        _assert_law(per_bit_statistics(diff, positions, p, _group(dtype)))


def per_element_statistics(diff: torch.Tensor, positions, p: float, group: int) -> dict:
    n, nb = diff.numel(), len(positions)
    f, per_group = _sparse_bits(diff, positions, group)
    assert int(f.sum(1).max()) <= 1, "per='element' flipped more than one bit of an element"
    k = f.shape[0]
    out = {"hit rate": (_chi2([k, n - k], [n * p, n * (1 - p)]), _chi2_bound(1)),
           "which bit": (_chi2(f.sum(0).tolist(), [k / nb] * nb), _chi2_bound(nb - 1))}
    if group > 1:
        ng = n // group
        out["per group"] = _cells_chi2(_binomial_cells(per_group, ng - per_group.numel(), group, p))
    return out


def test_per_element_law_and_a_wrong_law_fails(tf):
    n, p, positions = 131_072, 0.05, (0, 1, 2, 4, 7)   # 1.1 p: ~8 standard deviations off
    codes = _codes(n, torch.uint8, 3).to(DEV)
    diff = (tf.flip_bits(codes, p, positions, "element", 99) ^ codes).cpu()
    _assert_law(per_element_statistics(diff, positions, p, 4))
    high = ref.flip_reference(codes.cpu(), positions, "element", 99, 1.1 * p, tf.chunk_units(p))
    _assert_detects(per_element_statistics(high ^ codes.cpu(), positions, p, 4))
    fewer = ref.flip_reference(codes.cpu(), positions[:4], "element", 99, p, tf.chunk_units(p))
    _assert_detects(per_element_statistics(fewer ^ codes.cpu(), positions, p, 4))


# --- the real kernel (CUDA): bigger samples, every rate of the benchmark (speed: benchmarks/numerics_vs_pychop.py) ---

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("p", [1e-7, 1e-5, 1e-3, 0.05])
def test_gpu_law_at_benchmark_rates(tf, p):
    n = 2**28 if p < 1e-4 else 2**24
    codes = torch.randint(0, 256, (n,), device="cuda", dtype=torch.uint8)
    diff = tf.flip_bits(codes, p, ALL8, "bit", 2024) ^ codes
    stats = per_bit_statistics(diff, ALL8, p, 4)
    if p < 1e-4:   # pairs expected ~0: their chi-square says nothing; the others still apply
        stats.pop("pairs")
    _assert_law(stats)


@pytest.mark.gpu
@gpu
def test_gpu_per_element_law():
    from lowbit.kernels import triton_faults as tf
    n, p, positions = 2**24, 0.01, tuple(range(16))
    codes = torch.randint(-2**15, 2**15, (n,), device="cuda", dtype=torch.int16)
    diff = tf.flip_bits(codes, p, positions, "element", 1) ^ codes
    _assert_law(per_element_statistics(diff, positions, p, 2))
