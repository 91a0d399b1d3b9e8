"""Model families: shapes per mode against method.md's tables, options, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duo_jax import layers
from duo_jax.models import create_model


def shapes(name, mode, size, **opts):
    """(variables, output) shapes, by tracing only (no FLOPs, no memory)."""
    model = create_model(name, mode=mode, num_classes=10, **opts)
    x = jnp.zeros((2, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    return variables, out


def conv_io(variables, order):
    """(in, out) channels of each kernel, in ``order`` (parameter names)."""
    p = variables["params"]
    return [(p[k]["kernel"].shape[-2], p[k]["kernel"].shape[-1]) for k in order]


VGG_ORDER = ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "classifier"]
ALEX_ORDER = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "classifier"]

# method.md, "Widths (from the authors' code)"; classifier outputs 10 here.
EXPECTED = {
    ("vgg7", "binary"): [(3, 64), (64, 64), (64, 128), (128, 128), (128, 512), (512, 512), (512, 10)],
    ("vgg7", "coupled"): [(3, 45), (45, 45), (45, 90), (90, 90), (90, 336), (336, 512), (512, 10)],
    ("vgg7", "decoupled"): [(3, 45), (90, 45), (90, 90), (180, 90), (180, 336), (672, 512), (512, 10)],
    ("alexnet", "binary"): [(3, 96), (96, 256), (256, 384), (384, 384), (384, 256), (256, 4096), (4096, 4096), (4096, 10)],
    ("alexnet", "coupled"): [(3, 88), (88, 192), (192, 256), (256, 256), (256, 192), (192, 2400), (2400, 4096), (4096, 10)],
    ("alexnet", "decoupled"): [(3, 88), (176, 192), (384, 256), (512, 256), (512, 192), (384, 2400), (4800, 4096), (4096, 10)],
}


@pytest.mark.parametrize("name,mode", sorted(EXPECTED))
def test_vgg_alexnet_widths_match_the_authors(name, mode):
    size = 32 if name == "vgg7" else 224
    variables, out = shapes(name, mode, size)
    order = VGG_ORDER if name == "vgg7" else ALEX_ORDER
    got = conv_io(variables, order)
    print(f"\n{name} {mode}: " + ", ".join(f"{k} {i}-{o}" for k, (i, o) in zip(order, got)))
    assert got == EXPECTED[(name, mode)]
    assert out.shape == (2, 10)
    params = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(variables["params"]))
    print(f"{name} {mode}: {params:,} parameters")


def resnet_block_convs(variables):
    p = variables["params"]
    names = sorted(k for k in p if "_conv" in k)
    return {k: p[k]["kernel"].shape[-2:] for k in names}


def test_resnet18_widths():
    coupled, _ = shapes("resnet18", "coupled", 64)
    decoupled, out = shapes("resnet18", "decoupled", 64)
    binary, _ = shapes("resnet18", "binary", 64)
    assert out.shape == (2, 10)
    c, d, b = resnet_block_convs(coupled), resnet_block_convs(decoupled), resnet_block_convs(binary)
    for k in sorted(c):
        print(f"\n{k}: baseline {b[k][0]}-{b[k][1]}, coupled {c[k][0]}-{c[k][1]}, decoupled {d[k][0]}-{d[k][1]}", end="")
        # every block conv reads 2x its coupled input channels, writes the same
        assert d[k] == (2 * c[k][0], c[k][1])
    # stages 64, 90, 180, 360 (coupled) / 64, 128, 256, 512 (baseline); last conv -> 512
    assert [c[f"stage{s}_block1_conv1"][1] for s in range(1, 5)] == [64, 90, 180, 360]
    assert [b[f"stage{s}_block1_conv1"][1] for s in range(1, 5)] == [64, 128, 256, 512]
    assert c["stage4_block2_conv2"][1] == 512 and b["stage4_block2_conv2"][1] == 512
    p = decoupled["params"]
    assert p["stem"]["kernel"].shape == (7, 7, 3, 64)
    assert p["stage2_block1_down"]["kernel"].shape == (1, 1, 64, 90)  # reads the mean of the copies
    assert p["classifier"]["kernel"].shape == (512, 10)
    assert decoupled["batch_stats"]["stem_bn"]["mean"].shape == (128,)
    assert decoupled["batch_stats"]["stage4_block2_bn2"]["mean"].shape == (512,)


@pytest.mark.parametrize("name,size", [("vgg7", 32), ("vgg7", 28), ("alexnet", 224), ("resnet18", 224),
                                       ("resnet18", 32), ("resnet18", 28)])
@pytest.mark.parametrize("mode", layers.MODES)
def test_every_family_and_mode_traces(name, size, mode):
    _, out = shapes(name, mode, size, width_mult=0.25)
    assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_fp_mode_never_binarizes_weights():
    assert create_model("resnet18", mode="fp", num_classes=10).kernel_quantizer() is None
    assert create_model("resnet18", mode="binary", num_classes=10).kernel_quantizer() is not None
    assert create_model("vgg7", mode="binary", num_classes=10).kernel_quantizer() is None


def test_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg8'.*alexnet, resnet18, vgg7"):
        create_model("vgg8", mode="binary", num_classes=10)
    with pytest.raises(ValueError, match="unknown mode 'ternary'.*fp, binary, coupled, decoupled"):
        create_model("vgg7", mode="ternary", num_classes=10)
    with pytest.raises(ValueError, match="no option.*widht_mult"):
        create_model("vgg7", mode="binary", num_classes=10, widht_mult=0.5)
    with pytest.raises(ValueError, match="unknown quantizer"):
        create_model("vgg7", mode="binary", num_classes=10, surrogate="nope")
    with pytest.raises(ValueError, match="zero channels"):
        shapes("vgg7", "binary", 32, width_mult=0.001)
    with pytest.raises(ValueError, match="two copies"):
        layers.merge(jnp.zeros((1, 3)), "decoupled")


def test_bfloat16_compute():
    model = create_model("vgg7", mode="decoupled", num_classes=10, width_mult=0.125, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(variables))
    y = model.apply(variables, x)
    assert y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 8, 8, 3), (2, 2), None, "VALID"),     # VGG-7's pool: the fast path
    ((2, 9, 7, 3), (2, 2), (2, 2), "VALID"),   # a partial last window is dropped
    ((1, 9, 9, 2), (3, 3), (3, 3), "VALID"),
    ((1, 1, 4, 2), (2, 2), None, "VALID"),     # smaller than the window: no output rows
    ((1, 9, 9, 2), (3, 3), (2, 2), "VALID"),   # overlapping: nn.max_pool itself
    ((1, 8, 8, 2), (2, 2), None, "SAME"),
])
def test_max_pool_equals_flax_max_pool_values_and_gradients(shape, window, strides, padding):
    """Values from {0, 1, 2} tie often inside a window: the gradient must go where flax sends it."""
    import flax.linen as nn

    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), jnp.float32)
    ref = nn.max_pool(x, window, strides or window, padding)
    out = layers.max_pool(x, window, strides, padding)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)
    if ref.size == 0:
        return
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(ref.shape), jnp.float32)
    g_ref = jax.grad(lambda v: jnp.sum(nn.max_pool(v, window, strides or window, padding) * weights))(x)
    g = jax.grad(lambda v: jnp.sum(layers.max_pool(v, window, strides, padding) * weights))(x)
    np.testing.assert_array_equal(g, g_ref)
    if strides in (None, window) and padding == "VALID":  # each window passes its gradient to one input
        assert int(jnp.sum(g != 0)) == int(jnp.sum(weights != 0))


def test_max_pool_forward_mode_equals_flax():
    """``jax.jvp`` (and so ``jacfwd``, Hessian-vector products) works through the fast path."""
    import flax.linen as nn

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.integers(0, 3, (2, 6, 6, 3)), jnp.float32)
    t = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    y, dy = jax.jvp(lambda v: layers.max_pool(v, (2, 2)), (x,), (t,))
    y_ref, dy_ref = jax.jvp(lambda v: nn.max_pool(v, (2, 2), (2, 2)), (x,), (t,))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dy, dy_ref)
