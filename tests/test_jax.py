"""lowbit.jax: same bits as lowbit.quantize, under jit/vmap, with a straight-through gradient."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'lowbit[jax]'); lowbit.jax untested")
jnp = pytest.importorskip("jax.numpy")

import lowbit  # noqa: E402
import lowbit.jax as lj  # noqa: E402


def _np(a):
    return np.array(a)  # writable copy of a jax array


def _x(shape=(4, 64), seed=0, scale=4.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale


@pytest.mark.parametrize("fmt,mode", [("e4m3", "nearest_even"), ("e5m2", "toward_zero"), ("int4", "up"),
                                      ("nf4", "nearest_away"), ("mxfp4", "nearest_even"),
                                      ("nvfp4", "down"), ("bf16", "odd")])
def test_same_bits_as_lowbit_quantize_eager_and_jit(fmt, mode):
    x = _x()
    want = lowbit.quantize(_np(x), fmt, mode)
    got = lj.quantize(x, fmt, mode)
    assert isinstance(got, jax.Array) and got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(_np(got), want)
    np.testing.assert_array_equal(_np(jax.jit(lambda v: lj.quantize(v, fmt, mode))(x)), want)


def test_subnormals_survive_the_host_callback():
    # XLA runs callbacks with flush-to-zero/denormals-are-zero; lowbit.jax must not inherit that
    x = jnp.array([1e-40, -3e-39, 2.0 ** -133, 2.0 ** -149, 1.5e-38, 1.0], dtype=jnp.float32)
    for fmt in ("bf16", "fp32", "e8m3"):
        want = lowbit.quantize(_np(x), fmt)
        assert (want[:3] != 0).all() or fmt == "e8m3"  # bf16/fp32 keep these float32 subnormals
        np.testing.assert_array_equal(_np(jax.jit(lambda v: lj.quantize(v, fmt))(x)), want)
        np.testing.assert_array_equal(_np(lj.decode(jax.jit(lambda v: lj.encode(v, fmt))(x))), want)
    # and the thread's flush mode is left as XLA had it: jnp arithmetic still flushes afterwards
    y = jax.jit(lambda v: lj.quantize(v, "bf16") * 1.0)(x)
    assert y.shape == x.shape


def test_dtypes_bf16_f16_and_scale_axis():
    x = _x((8, 32))
    xb = x.astype(jnp.bfloat16)
    got = lj.quantize(xb, "e4m3")
    assert got.dtype == jnp.bfloat16
    want = lowbit.quantize(torch.from_numpy(_np(xb).astype(np.float32)).bfloat16(), "e4m3").float().numpy()
    np.testing.assert_array_equal(_np(got).astype(np.float32), want)
    xh = x.astype(jnp.float16)
    np.testing.assert_array_equal(_np(lj.quantize(xh, "e3m2fn")), lowbit.quantize(_np(xh), "e3m2fn"))
    s = jnp.linspace(0.1, 1.0, 32)  # per-column scale, broadcast
    np.testing.assert_array_equal(_np(lj.quantize(x, "int8", scale=s)),
                                  lowbit.quantize(_np(x), "int8", scale=_np(s)))
    xt = _x((32, 8))
    np.testing.assert_array_equal(_np(lj.quantize(xt, "mxfp8", axis=0)), lowbit.quantize(_np(xt), "mxfp8", axis=0))


def test_vmap_keeps_block_and_tensor_scales_per_example():
    x = _x((3, 32))
    got = jax.vmap(lambda r: lj.quantize(r, "nvfp4"))(x)
    want = np.stack([lowbit.quantize(_np(x[i]), "nvfp4") for i in range(3)])
    np.testing.assert_array_equal(_np(got), want)
    assert not np.array_equal(want, lowbit.quantize(_np(x), "nvfp4"))  # a shared tensor scale would differ


def test_straight_through_gradient_under_grad_and_jit():
    x = _x((5, 16))

    def loss(v):
        return jnp.sum(lj.quantize(v, "int4", scale=0.5) ** 2)

    g = jax.jit(jax.grad(loss))(x)
    np.testing.assert_allclose(_np(g), 2 * lowbit.quantize(_np(x), "int4", scale=0.5), rtol=1e-6)
    g0 = jax.grad(lambda v: jnp.sum(lj.quantize(v, "e4m3", ste=False)))(x)
    assert not np.any(_np(g0))
    # gradient through a block format and inside vmap
    gv = jax.vmap(jax.grad(lambda r: jnp.sum(lj.quantize(r, "mxfp4") * r)))(_x((2, 32)))
    assert gv.shape == (2, 32) and np.all(np.isfinite(_np(gv)))
    # the scale gets a zero gradient
    gs = jax.grad(lambda s: jnp.sum(lj.quantize(x, "int4", scale=s)))(0.5)
    assert float(gs) == 0.0


def test_stochastic_rounding_needs_a_key_and_is_reproducible():
    x = jnp.full((20000,), 1 / 3, dtype=jnp.float32)
    with pytest.raises(ValueError, match="key="):
        lj.quantize(x, "e4m3", "stochastic")
    k = jax.random.key(7)
    a = lj.quantize(x, "e4m3", "stochastic", key=k)
    assert np.array_equal(_np(a), _np(lj.quantize(x, "e4m3", "stochastic", key=k)))
    assert not np.array_equal(_np(a), _np(lj.quantize(x, "e4m3", "stochastic", key=jax.random.key(8))))
    f = jax.jit(lambda v, key: lj.quantize(v, "e4m3", "stochastic", key=key))
    b = f(x, k)
    assert np.array_equal(_np(a), _np(b))  # same key, same bits under jit
    lo, hi = 0.3125, 0.34375
    assert abs((_np(b).mean() - lo) / (hi - lo) - 2 / 3) < 0.02  # P(hi) = (1/3 - lo) / (hi - lo)
    assert set(np.unique(_np(b))) == {np.float32(lo), np.float32(hi)}


@pytest.mark.parametrize("fmt,kw", [("nvfp4", {}), ("mxfp6_e2m3", {"axis": 0}), ("e4m3", {}),
                                    ("int8", {"scale": 0.05}), ("nf4", {})])
def test_encode_decode_round_trip_under_jit(fmt, kw):
    x = _x((32, 32))
    enc = jax.jit(lambda v: lj.encode(v, fmt, **kw))(x)
    ref = lowbit.encode(torch.from_numpy(_np(x)), fmt, **kw)
    np.testing.assert_array_equal(_np(enc.codes), ref.codes.numpy())
    if ref.scales is not None:
        np.testing.assert_array_equal(_np(enc.scales).astype(np.float64), ref.scales.numpy().astype(np.float64))
    back = jax.jit(lj.decode)(enc)
    assert back.dtype == x.dtype
    np.testing.assert_array_equal(_np(back), lowbit.quantize(_np(x), fmt, **kw))


def test_errors_are_raised_eagerly_and_clearly():
    x = _x((2, 30))
    with pytest.raises(ValueError, match="block size 32"):
        lj.quantize(x, "mxfp4")
    with pytest.raises(ValueError, match="unknown rounding"):
        lj.quantize(x, "e4m3", "sideways")
    with pytest.raises(lowbit.FormatError):
        lj.quantize(x, "e9m30")
    with pytest.raises(TypeError, match="int32"):
        lj.quantize(jnp.arange(4), "int4")
    with pytest.raises(ValueError, match="block scales"):
        lj.quantize(_x((2, 32)), "mxfp4", scale=2.0)
    with pytest.raises(ValueError, match="do not all fit"):
        lj.quantize(x.astype(jnp.float16), "bf16")


def test_import_lowbit_stays_free_of_jax():
    code = ("import sys, lowbit; assert 'jax' not in sys.modules; import lowbit.jax; "
            "assert 'jax' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
