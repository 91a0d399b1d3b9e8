"""Decoupling is exact: the decoupled binary network computes the coupled ternary one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duo_jax import layers, quant
from duo_jax.decouple import decouple
from duo_jax.models import alexnet, create_model, resnet, vgg

TOL = 1e-5


def randomize(variables, key):
    """Random BN parameters and statistics, so that every activation level occurs."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        k, name = jax.random.fold_in(key, i), str(path[-1].key)
        if name == "var":
            leaf = jax.random.uniform(k, leaf.shape, minval=0.05, maxval=0.5)
        elif name == "mean":
            leaf = 0.3 * jax.random.normal(k, leaf.shape)
        elif name == "scale":
            leaf = jax.random.uniform(k, leaf.shape, minval=0.2, maxval=0.6)
        elif name == "bias" and len(path) >= 2 and "classifier" not in str(path[-2].key):
            leaf = jax.random.uniform(k, leaf.shape, minval=0.0, maxval=1.0)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


DUO_WIDTHS = {"vgg7": vgg.WIDTHS["duo"], "alexnet": alexnet.WIDTHS["duo"], "resnet18": resnet.WIDTHS["duo"]}
FAMILIES = {"vgg7": (32, 0.25), "alexnet": (224, 1 / 16), "resnet18": (64, 1 / 8)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    name = request.param
    size, wm = FAMILIES[name]
    x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    return name, wm, x


@pytest.mark.parametrize("binarize_weights", [False, True])
def test_decoupled_equals_coupled(family, binarize_weights):
    name, wm, x = family
    opts = dict(num_classes=10, width_mult=wm, binarize_weights=binarize_weights)
    coupled = create_model(name, mode="coupled", **opts)
    decoupled = create_model(name, mode="decoupled", **opts)
    vc = randomize(coupled.init(jax.random.key(0), x), jax.random.key(2))
    vd = decouple(vc, jax.eval_shape(lambda: decoupled.init(jax.random.key(0), x)))

    # inference mode (running statistics)
    yc, yd = coupled.apply(vc, x), decoupled.apply(vd, x)
    assert rel(yc, yd) <= TOL, rel(yc, yd)

    # training mode (batch statistics; same dropout rng), and the updated statistics
    rngs = {"dropout": jax.random.key(5)}
    yc_t, sc = coupled.apply(vc, x, train=True, mutable=["batch_stats"], rngs=rngs)
    yd_t, sd = decoupled.apply(vd, x, train=True, mutable=["batch_stats"], rngs=rngs)
    assert rel(yc_t, yd_t) <= TOL, rel(yc_t, yd_t)
    expect = decouple({"batch_stats": sc["batch_stats"]}, {"batch_stats": sd["batch_stats"]})
    # Batch variances (E[x^2] - E[x]^2) magnify the rounding of the split convolutions.
    for a, b in zip(jax.tree_util.tree_leaves(expect), jax.tree_util.tree_leaves(sd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    # Not vacuous: the same weights with binary activations compute something else.
    binary = create_model(name, mode="binary", widths=DUO_WIDTHS[name], **opts)
    assert rel(yc, binary.apply(vc, x)) > 1e-2


class TinyDuoNet(nn.Module):
    """A model outside duo_jax.models: Dense layers with biases, a float side branch."""

    mode: str

    @nn.compact
    def __call__(self, x, train=False):
        x = layers.QDense(12, name="in")(x)
        x = layers.duplicate(x, self.mode)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn0")(x)
        a = layers.duo_activation(x, self.mode)
        h = layers.QDense(7, kernel_quantizer=quant.binarize_weight, name="hidden")(a)
        side = nn.Dense(7, name="side")(layers.merge(x, self.mode))  # float branch reads the mean
        h = layers.duplicate(h + side, self.mode)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(h)
        a = layers.duo_activation(h, self.mode)
        return nn.Dense(3, name="out")(a)  # float head with bias reading both copies


def test_decouple_a_model_outside_the_families():
    x = jax.random.normal(jax.random.key(3), (16, 5))
    coupled, decoupled = TinyDuoNet("coupled"), TinyDuoNet("decoupled")
    vc = randomize(coupled.init(jax.random.key(0), x), jax.random.key(4))
    vd = decouple(vc, decoupled.init(jax.random.key(9), x))
    assert vd["params"]["out"]["kernel"].shape == (14, 3)
    assert vd["params"]["side"]["kernel"].shape == (12, 7)
    assert rel(coupled.apply(vc, x), decoupled.apply(vd, x)) <= TOL
    yc, _ = coupled.apply(vc, x, train=True, mutable=["batch_stats"])
    yd, _ = decoupled.apply(vd, x, train=True, mutable=["batch_stats"])
    assert rel(yc, yd) <= TOL


def test_decouple_rules_and_errors():
    src = {"params": {"a": {"kernel": jnp.arange(6.0).reshape(3, 2)}, "bn": {"scale": jnp.array([1.0, 2.0])}}}
    tmpl = {"params": {"a": {"kernel": jnp.zeros((6, 2))}, "bn": {"scale": jnp.zeros(4)}}}
    out = decouple(src, tmpl)
    k = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(out["params"]["a"]["kernel"], np.concatenate([k / 2, k / 2], 0))
    np.testing.assert_array_equal(out["params"]["bn"]["scale"], [1, 2, 1, 2])
    bad = {"params": {"a": {"kernel": jnp.zeros((3, 4))}, "bn": {"scale": jnp.zeros(2)}}}
    with pytest.raises(ValueError, match=r"params/a/kernel.*\(3, 2\).*\(3, 4\)"):
        decouple(src, bad)
    with pytest.raises(ValueError, match="differ in structure"):
        decouple(src, {"params": {"a": {"kernel": jnp.zeros((6, 2))}}})
