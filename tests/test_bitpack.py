"""duo_jax.bitpack: packing and the popcount GEMM against NumPy, exact threshold folding, packed = float forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duo_jax import bitpack, layers, quant, summary, walk
from duo_jax.errors import UserError
from duo_jax.models import create_model

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------
# Bits, words, GEMM, conv
# ---------------------------------------------------------------------------


def test_pack_bits_layout_and_round_trip():
    bits = RNG.integers(0, 2, (3, 5, 70))
    words = np.asarray(bitpack.pack_bits(jnp.asarray(bits, jnp.float32)))
    assert words.shape == (3, 5, 3) and words.dtype == np.uint32
    for j in range(96):  # bit j % 32 of word j // 32 is entry j (zero past the 70 entries)
        expect = bits[..., j] if j < 70 else 0
        assert np.array_equal((words[..., j // 32] >> np.uint32(j % 32)) & 1, np.broadcast_to(expect, (3, 5)))
    flat = RNG.integers(0, 2, 1001)
    packed = bitpack.pack_bits_np(flat)
    assert packed.dtype == np.uint32 and packed.size == 32  # ceil(1001 / 32) words
    assert np.array_equal(bitpack.unpack_bits_np(packed, 1001), flat)
    signs = RNG.integers(0, 2, (3, 3, 40, 7))  # (kh, kw, C, N) -> (kh * kw * ceil(C/32), N)
    kw = bitpack.kernel_words(signs)
    assert kw.shape == (18, 7)
    cols = np.asarray(bitpack.pack_bits(jnp.asarray(np.moveaxis(signs, -1, 0))))  # (N, kh, kw, Cw)
    assert np.array_equal(kw, cols.reshape(7, -1).T)


def test_popcount_matmul_matches_numpy():
    a = RNG.integers(0, 2**32, (300, 5), dtype=np.uint32)
    b = RNG.integers(0, 2**32, (5, 7), dtype=np.uint32)
    expect = np.bitwise_count(a[:, :, None] & b[None, :, :]).sum(axis=1)
    for block_rows in (None, 64, 1000):  # uneven blocks, one block
        got = jax.jit(bitpack.popcount_matmul, static_argnums=2)(a, b, block_rows)
        assert np.array_equal(np.asarray(got), expect)


def same_pads(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def numpy_conv(x, w, strides, pads):
    """Integer conv of 0/1 inputs with +-1 weights, straight from the definition."""
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = w.shape[:2]
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[-1]), np.int64)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :]
            out[:, i, j] = np.einsum("bhwc,hwcn->bn", patch, w)
    return out


@pytest.mark.parametrize("shape,k,s,padding", [
    ((2, 7, 6, 37), 3, 1, "SAME"),
    ((1, 8, 7, 64), 3, 2, ((1, 0), (2, 1))),
    ((2, 4, 4, 33), 4, 4, "SAME"),  # VGG-7's conv5
])
def test_binary_conv_matches_integer_conv(shape, k, s, padding):
    x = RNG.integers(0, 2, shape)
    signs = RNG.integers(0, 2, (k, k, shape[-1], 5))
    got = bitpack.binary_conv(jnp.asarray(x, jnp.float32), jnp.asarray(bitpack.kernel_words(signs)),
                              kernel_size=(k, k), strides=(s, s), padding=padding)
    pads = padding if not isinstance(padding, str) else (
        ((0, 0), (0, 0)) if padding == "VALID" else (same_pads(shape[1], k, s), same_pads(shape[2], k, s)))
    assert np.array_equal(np.asarray(got), numpy_conv(x, 2 * signs - 1, (s, s), pads))


def test_binary_dense_matches_numpy():
    x = RNG.integers(0, 2, (3, 2, 70))
    signs = RNG.integers(0, 2, (70, 9))
    got = bitpack.binary_dense(jnp.asarray(x, jnp.float32), jnp.asarray(bitpack.kernel_words(signs)))
    assert np.array_equal(np.asarray(got), x @ (2 * signs - 1))


# ---------------------------------------------------------------------------
# Threshold folding: exact for every k, near ties and negative BatchNorm scales included
# ---------------------------------------------------------------------------

MODE = "decoupled"
ACT = lambda o: layers.duo_activation(o, MODE)  # noqa: E731


class Tiny(nn.Module):
    """float conv -> BN -> act -> binary conv (K = 3*3*12) -> pool -> BN -> act -> binary 1x1 conv -> BN."""

    @nn.compact
    def __call__(self, x, train=False):
        bq = quant.binarize_weight
        x = layers.QConv(6, 3, name="conv1")(x)
        x = ACT(layers.batch_norm(train, name="bn1")(layers.duplicate(x, MODE)))
        x = layers.QConv(16, 3, kernel_quantizer=bq, name="conv2")(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = ACT(layers.batch_norm(train, name="bn2")(layers.duplicate(x, MODE)))
        x = layers.QConv(4, 1, kernel_quantizer=bq, name="conv3")(x)
        return layers.batch_norm(train, name="bn3")(x).mean(axis=(1, 2))


def test_folded_thresholds_equal_the_float_decision_for_every_k():
    model = Tiny()
    x = jnp.asarray(RNG.standard_normal((4, 8, 8, 3)), jnp.float32)
    v = jax.device_get(jax.jit(model.init)(jax.random.key(0, impl="rbg"), x))
    s = np.abs(np.asarray(quant.binarize_weight(v["params"]["conv2"]["kernel"]))).max()  # conv2's weight scale
    fan_in = 3 * 3 * 12
    f = 32  # bn2 features: two copies of 16 channels; copy 1 fires at >= 0.75, copy 2 at >= 0.25
    target = np.where(np.arange(f) < 16, 0.75, 0.25).astype(np.float32)
    gamma = (RNG.uniform(0.3, 3.0, f) * RNG.choice([-1, 1], f)).astype(np.float32)
    gamma[:4] = -np.abs(gamma[:4])
    gamma[4] = 0.0  # constant decision
    mean = RNG.normal(0, 2 * s, f).astype(np.float32)
    var = RNG.uniform(0.5, 4.0, f).astype(np.float32)
    k0 = RNG.integers(-40, 41, f)
    # bias such that the BatchNorm output at k0 lands on the threshold, give or take a few ulps
    bn = layers.batch_norm(False)
    no_bias = {"params": {"scale": gamma, "bias": np.zeros(f, np.float32)}, "batch_stats": {"mean": mean, "var": var}}
    at_k0 = np.asarray(bn.apply(no_bias, (k0 * s).astype(np.float32)[None]))[0]
    bias = target - at_k0
    for i, ulps in enumerate(RNG.integers(-2, 3, f)):
        for _ in range(abs(int(ulps))):
            bias[i] = np.nextafter(bias[i], np.float32(np.inf if ulps > 0 else -np.inf))
    bias[5], bias[6] = 50.0, -50.0  # always, never
    v["params"]["bn2"] = {"scale": gamma, "bias": bias}
    v["batch_stats"]["bn2"] = {"mean": mean, "var": var}

    packed = bitpack.pack(model, v, x, activation=ACT)
    assert packed.layers["bn2"] == {"kind": "folded", "source": "conv2", "source_channels": 16, "features": f}
    assert "bn3" not in packed.layers  # feeds no binary activation
    threshold = packed.arrays["folded/bn2/threshold"].astype(np.int64)
    sign = packed.arrays["folded/bn2/sign"].astype(np.int64)
    assert np.any(sign == -1)

    ks = np.arange(-fan_in, fan_in + 1)
    y = np.broadcast_to((ks.astype(np.float32) * s)[:, None], (len(ks), f))  # what the conv outputs: fl(k s)
    variables = {"params": v["params"]["bn2"], "batch_stats": v["batch_stats"]["bn2"]}
    out = np.asarray(jax.jit(lambda y: bn.apply(variables, y))(y))
    float_fires = np.asarray(jax.jit(ACT)(out)) == 1
    folded_fires = sign[None, :] * ks[:, None] >= threshold[None, :]
    assert np.array_equal(folded_fires, float_fires)
    at_k0 = out[k0 + fan_in, np.arange(f)]
    near = np.abs(at_k0 - target) <= 2 * np.spacing(target)
    assert near.sum() >= 10 and np.sum(at_k0 == target) >= 2  # the test does probe ties, exact ones too
    assert float_fires.all(axis=0)[5] and not float_fires.any(axis=0)[6]


# ---------------------------------------------------------------------------
# The packed forward equals the float eval forward
# ---------------------------------------------------------------------------


def lively_variables(model, x, seed):
    """Random variables with random BatchNorm scale signs, and statistics of the batch each BatchNorm sees."""
    v = summary._random_variables(model, x[:1], seed)  # kernels N(0, 1), BatchNorms as initialized
    rng = np.random.default_rng(seed)
    for p in v["params"].values():
        if "scale" in p:
            p["scale"] = rng.uniform(0.5, 1.5, p["scale"].shape) * rng.choice([-1, 1], p["scale"].shape)
            p["bias"] = rng.normal(0.3, 0.4, p["bias"].shape)
    for call in walk.trace(model, v, x, calibrate=True, train=False):
        if walk.is_norm(call):
            axes = tuple(range(call.x.ndim - 1))
            v["batch_stats"][call.path] = {"mean": call.x.mean(axes),
                                           "var": call.x.var(axes) * rng.uniform(0.8, 1.25, call.x.shape[-1])}
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)


def test_packed_resnet18_equals_float_forward():
    """ResNet-18 (per-layer weight scales); VGG-7 (per-channel scales) is checked by test_export.py."""
    model = create_model("resnet18", mode="decoupled", num_classes=10, width_mult=1 / 16)
    x = jnp.asarray(RNG.standard_normal((32, 32, 32, 3)), jnp.float32)
    v = lively_variables(model, x, seed=1)
    packed = bitpack.pack(model, v, x[:8])
    kinds = [spec["kind"] for spec in packed.layers.values()]
    assert kinds.count("binary") == 16  # every block conv
    assert kinds.count("folded") == 8  # the BatchNorm inside each block; the ones before a residual sum stay float
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x))
    got = np.asarray(bitpack.forward(model, packed)(x))
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_pack_refuses_float_weights():
    x = jnp.asarray(RNG.standard_normal((2, 32, 32, 3)), jnp.float32)
    model = create_model("vgg7", mode="decoupled", num_classes=10, width_mult=0.125)  # the CIFAR-10 setting
    v = summary._random_variables(model, x, 0)
    with pytest.raises(UserError, match="conv2 reads binary activations but has float weights.*binarize_weights=True"):
        bitpack.pack(model, v, x)
