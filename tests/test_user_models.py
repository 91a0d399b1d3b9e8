"""duo_jax.quant inside models written by a user, in Linen and in NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from duo_jax import quant
from duo_jax.input_pipeline import load_bundled


def digits_batch(n=256):
    x, y, _, _ = load_bundled("digits")
    x = x[:n].reshape(n, -1).astype(np.float32) / 255.0
    return jnp.asarray(x), jnp.asarray(y[:n])


class LinenBNN(nn.Module):
    """Binary activations (ApproxSign STE) and binarized weights in the hidden layer."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(64, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = quant.get("approx_sign")(x)
        w = self.param("w", nn.initializers.lecun_normal(), (64, 32))
        x = x @ quant.binarize_weight(w)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = quant.ternary(x)
        return nn.Dense(10)(x)


def test_linen_model_with_quantizers_learns():
    x, y = digits_batch()
    model = LinenBNN()
    variables = model.init(jax.random.key(0), x)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    def loss_fn(params, stats):
        logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

    @jax.jit
    def step(params, stats, opt):
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), stats, opt, loss

    # the first layer sits below two quantizers: only the STE gives it a gradient
    g_first = jax.grad(lambda p: loss_fn(p, stats)[0])(params)["Dense_0"]["kernel"]
    assert float(jnp.linalg.norm(g_first)) > 1e-3
    losses = []
    for _ in range(30):
        params, stats, opt, loss = step(params, stats, opt)
        losses.append(float(loss))
    # the STE gradients reach the latent weights: the loss falls well below chance (log 10 = 2.30)
    assert losses[-1] < 0.5 * losses[0], losses


class NNXBNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 64, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (64, 10)) * 0.1)

    def __call__(self, x):
        h = quant.binary(self.bn(self.l1(x)))
        return h @ quant.binarize_weight(self.w2[...], per_channel=True)


def test_nnx_model_with_quantizers_learns():
    x, y = digits_batch()
    model = NNXBNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    first = np.asarray(model.l1.kernel[...]).copy()
    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.abs(np.asarray(model.l1.kernel[...]) - first).max() > 1e-3  # learnt through the STE
