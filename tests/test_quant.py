"""duo_jax.quant against expectations written independently in NumPy (float64)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from duo_jax import quant

DTYPES = [jnp.float32, jnp.bfloat16]


def _neighbours(values, dtype):
    """Each value and its two nearest representable neighbours in ``dtype``.

    Around 0 the neighbours are the smallest normal numbers: XLA on CPU flushes
    subnormals to zero, so they never reach a quantizer.
    """
    np_dtype = np.float32 if dtype == jnp.float32 else ml_dtypes.bfloat16
    out = []
    for v in values:
        if v == 0:
            tiny = float(ml_dtypes.finfo(np_dtype).tiny)
            out += [np.asarray(-tiny, np_dtype), np.asarray(0.0, np_dtype), np.asarray(tiny, np_dtype)]
            continue
        v = np.asarray(v, np_dtype)
        if np_dtype == np.float32:
            out += [np.nextafter(v, np.float32(-np.inf)), v, np.nextafter(v, np.float32(np.inf))]
        else:
            eps = np.float64(ml_dtypes.finfo(ml_dtypes.bfloat16).eps) * max(abs(float(v)), 2**-8)
            out += [np.asarray(float(v) - eps, np_dtype), v, np.asarray(float(v) + eps, np_dtype)]
    return out


def grid(dtype):
    """Thresholds, clip edges and their neighbours, plus random values."""
    edges = [-1.0, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0, 1 / 6, 5 / 6]
    rnd = np.random.default_rng(0).uniform(-1.5, 2.5, 200)
    x = np.concatenate([np.asarray(_neighbours(edges, dtype), np.float64), rnd])
    return jnp.asarray(x, dtype)


def as64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def np_levels(x, n, offset=0.0):
    return np.floor(n * np.clip(x + offset, 0, 1) + 0.5) / n


def np_window(x, offset=0.0):
    return ((x + offset > 0) & (x + offset < 1)).astype(np.float64)


def grad_of(f, x, cot):
    """Vector-Jacobian product of elementwise ``f`` with cotangent ``cot``."""
    return jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * cot))(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "fn,n",
    [(quant.binary, 1), (quant.ternary, 2), (functools.partial(quant.uniform, bits=2), 3),
     (functools.partial(quant.levels, n=5), 5)],
)
def test_levels_forward_and_clipped_ste(fn, n, dtype):
    x = grid(dtype)
    x64 = as64(x)
    y = fn(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(as64(y), np_levels(x64, n).astype(np.float32).astype(x64.dtype), rtol=1e-2 if dtype == jnp.bfloat16 else 0)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    g = grad_of(fn, x, cot)
    assert g.dtype == dtype
    np.testing.assert_allclose(as64(g), as64(cot.astype(dtype)) * np_window(x64), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thresholds_are_inclusive(dtype):
    x = jnp.asarray([0.25, 0.5, 0.75], dtype)
    np.testing.assert_array_equal(as64(quant.binary(x)), [0, 1, 1])
    np.testing.assert_array_equal(as64(quant.ternary(x)), [0.5, 0.5, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_is_mean_of_two_shifted_binaries_exactly(dtype):
    # Every float in a dense band around both thresholds, plus the grid.
    dense = np.concatenate([np.linspace(0.2, 0.3, 20001), np.linspace(0.7, 0.8, 20001)])
    x = jnp.concatenate([grid(dtype), jnp.asarray(dense, dtype)])
    two = quant.binary(x, offset=-0.25) + quant.binary(x, offset=0.25)
    np.testing.assert_array_equal(as64(quant.ternary(x)), as64(two) / 2)
    # and the window of each copy is the shifted clip window
    cot = jnp.ones(x.shape, jnp.float32)
    np.testing.assert_array_equal(
        as64(grad_of(functools.partial(quant.binary, offset=-0.25), x, cot)), np_window(as64(x), -0.25)
    )


def np_surrogate(name, x, beta):
    u = 2 * x - 1
    if name == "identity":
        return np.ones_like(x)
    if name == "approx_sign":
        return np.where(np.abs(u) < 1, 2 - 2 * np.abs(u), 0.0)
    if name == "swish_sign":
        s = 1 / (1 + np.exp(-beta * u))
        # d/du of 2 s (1 + beta u (1 - s)) - 1, written out independently
        ds = beta * s * (1 - s)
        return 2 * ds * (1 + beta * u * (1 - s)) + 2 * s * (beta * (1 - s) - beta * u * ds)
    if name == "tanh":
        return beta * (1 - np.tanh(beta * u) ** 2)
    raise AssertionError(name)


@pytest.mark.parametrize("name,kw", [("identity", {}), ("approx_sign", {}), ("swish_sign", {"beta": 5.0}),
                                     ("swish_sign", {"beta": 2.0}), ("tanh", {"beta": 2.0})])
@pytest.mark.parametrize("dtype", DTYPES)
def test_surrogates(name, kw, dtype):
    f = quant.get(name, **kw)
    x = grid(dtype)
    x64 = as64(x)
    np.testing.assert_array_equal(as64(f(x)), np_levels(x64, 1))
    cot = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
    expect = as64(cot) * np_surrogate(name, x64, kw.get("beta", 0.0))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(as64(grad_of(f, x, cot)), expect, rtol=tol, atol=tol * 5)


@pytest.mark.parametrize("name,kw", [("approx_sign", {}), ("swish_sign", {"beta": 5.0}), ("tanh", {"beta": 2.0}),
                                     ("clipped", {})])
def test_surrogates_integrate_to_the_step_height(name, kw):
    x64 = np.linspace(-3, 4, 700001)
    g = grad_of(quant.get(name, **kw), jnp.asarray(x64, jnp.float32), jnp.ones(x64.shape, jnp.float32))
    assert abs(float(np.sum(np.asarray(g, np.float64))) * (x64[1] - x64[0]) - 1.0) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_ste_sign(dtype):
    x = grid(dtype)
    x64 = as64(x)
    np.testing.assert_array_equal(as64(quant.ste_sign(x)), np.where(x64 >= 0, 1.0, -1.0))
    assert float(quant.ste_sign(jnp.zeros((), dtype))) == 1.0
    cot = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
    np.testing.assert_array_equal(
        as64(grad_of(quant.ste_sign, x, cot)), as64(cot.astype(dtype)) * (np.abs(x64) <= 1)
    )


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_binarize_weight(per_channel, dtype):
    w64 = np.random.default_rng(4).normal(size=(3, 3, 4, 5))
    w64[0, 0, 0, :] = 0.0  # sign(0) must be +1
    w = jnp.asarray(w64, dtype)
    w64 = as64(w)
    axes = (0, 1, 2) if per_channel else None
    scale = np.mean(np.abs(w64), axis=axes, keepdims=per_channel)
    expect = np.where(w64 >= 0, 1.0, -1.0) * scale
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(as64(quant.binarize_weight(w, per_channel)), expect, rtol=tol)
    assert np.all(as64(quant.binarize_weight(w, per_channel))[0, 0, 0, :] > 0)
    cot = jnp.asarray(np.random.default_rng(5).normal(size=w.shape), jnp.float32)
    g = jax.grad(lambda w: jnp.sum(quant.binarize_weight(w, per_channel).astype(jnp.float32) * cot))(w)
    np.testing.assert_array_equal(as64(g), as64(cot.astype(dtype)))


def test_binarize_weight_halves_exactly_when_split():
    w = jnp.asarray(np.random.default_rng(6).normal(size=(3, 3, 8, 4)), jnp.float32)
    split = jnp.concatenate([w / 2, w / 2], axis=-2)
    np.testing.assert_allclose(
        np.asarray(quant.binarize_weight(split)), np.asarray(jnp.concatenate([quant.binarize_weight(w) / 2] * 2, axis=-2)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", ["binary", "ternary", "approx_sign", "swish_sign", "ste_sign", "binarize_weight"])
def test_jit_and_vmap_agree_with_eager(name):
    f = quant.get(name)
    x = grid(jnp.float32).reshape(-1, 1)
    eager = f(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), np.asarray(eager))
    if name != "binarize_weight":  # a per-tensor scale is not elementwise
        np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), np.asarray(eager))
        g = jax.vmap(jax.grad(lambda v: f(v).sum()))(x)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.grad(lambda v: f(v).sum())(x)))


def test_registry():
    assert quant.get("clipped") is quant.binary
    assert {"binary", "ternary", "uniform", "ste_sign", "binarize_weight", "approx_sign", "swish_sign"} <= set(quant.names())
    with pytest.raises(ValueError, match="unknown quantizer 'sighn'.*binary"):
        quant.get("sighn")
    with pytest.raises(ValueError, match="takes no argument"):
        quant.get("approx_sign", beta=3.0)
    with pytest.raises(ValueError, match="beta must be positive"):
        quant.get("swish_sign", beta=0)(jnp.zeros(3))
    with pytest.raises(ValueError, match="positive integer"):
        quant.levels(jnp.zeros(3), 0)
    with pytest.raises(ValueError, match="already registered"):
        quant.register("binary", quant.binary)
