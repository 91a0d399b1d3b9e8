"""The two training steps that ``train_throughput.py`` times, as ``run(n)`` callables.

``JaxStep``: duo_jax's ``train.train_step`` as ``duo_jax.phases`` runs it
(``sharding.jit_train_step``: replicated state, donated; batch split over the
devices), compiled ahead of time so that XLA's cost analysis gives its FLOPs.
``TorchStep``: the PyTorch twin's step (``torch_twin.py``). Both train on one
synthetic batch that stays on the device; ``case`` is a
``train_throughput.Case`` (family, mode, num_classes).
"""

from __future__ import annotations

import time
from typing import Any


class JaxStep:
    """duo_jax's jitted ``train_step`` on a synthetic batch, state donated."""

    def __init__(self, case, *, batch: int, image: tuple, width_mult: float, dtype: str):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from duo_jax import config_lib, models, sharding, train

        opts: dict[str, Any] = {"width_mult": width_mult}
        if dtype != "float32":
            opts["dtype"] = jnp.dtype(dtype)
        self.model = models.create_model(case.family, mode=case.mode, num_classes=case.num_classes, **opts)
        mesh = sharding.make_mesh()
        self.put = lambda x: sharding.put_batch(x, sharding.batch_sharding(mesh))
        rng = np.random.default_rng(0)
        self.host_batch = {"image": rng.standard_normal((batch, *image), np.float32),
                           "label": rng.integers(0, case.num_classes, batch).astype(np.int32)}
        self.batch = {k: self.put(v) for k, v in self.host_batch.items()}
        key = jax.random.key(0, impl="rbg")
        variables = jax.jit(lambda k, x: self.model.init(k, x, train=False))(key, self.host_batch["image"][:1])
        tx = train.make_optimizer(config_lib.sgd(0.1), steps_per_epoch=1000, total_steps=100_000)
        self.state = sharding.put_replicated(train.create_state(self.model.apply, variables, tx, seed=0), mesh)
        # As duo_jax.phases runs it: replicated state (donated), batch split over the devices.
        self.step_fn = sharding.jit_train_step(train.train_step, mesh)
        t0 = time.perf_counter()
        self.compiled = self.step_fn.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.xla_flops = _xla_flops(self.compiled)
        self.model_flops = 3 * forward_matmul_flops(self.model, variables, self.batch["image"])
        self._jax = jax

    def __call__(self, n: int) -> None:
        state, metrics = self.state, None
        for _ in range(n):
            state, metrics = self.compiled(state, self.batch)
        self._jax.block_until_ready((state, metrics))
        self.state, self.metrics = state, metrics

    def loss(self) -> float:
        """Mean loss of the last step (``train_step`` returns sums)."""
        return float(self.metrics["loss"]) / float(self.metrics["count"])


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  # some backends have none
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def forward_matmul_flops(model, variables, images) -> float:
    """2 x multiply-adds of every convolution and dot of one training-mode forward pass.

    Counted from the jaxpr (``conv_general_dilated``, ``dot_general``), so it is
    independent of the backend; ``3 x`` this is the usual "model FLOPs" of a
    training step (the backward pass does twice the forward's work).
    """
    import jax
    import numpy as np

    def fwd(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})

    return _jaxpr_flops(jax.make_jaxpr(fwd)(variables, images).jaxpr, np)


def _jaxpr_flops(jaxpr, np) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            out = eqn.outvars[0].aval
            dn = eqn.params["dimension_numbers"]
            kernel_in = rhs.shape[dn.rhs_spec[1]]
            window = np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]])
            total += 2.0 * np.prod(out.shape) * kernel_in * window
        elif name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs.shape[d] for d in lc])
        for sub in _subjaxprs(eqn.params):
            total += _jaxpr_flops(sub, np)
    return total


def _subjaxprs(params):
    for v in params.values():
        for item in (v if isinstance(v, (list, tuple)) else (v,)):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


# ---------------------------------------------------------------------------
# PyTorch twin
# ---------------------------------------------------------------------------


def torch_or_reason() -> tuple[Any, str]:
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install -e '.[torch]')"
    return torch, ""


class TorchStep:
    """The twin's training step on a synthetic batch, NHWC (channels_last) memory."""

    def __init__(self, case, *, batch: int, image: tuple, width_mult: float, dtype: str, device: str):
        import torch
        import torch_twin

        self.torch = torch
        self.device = "cuda" if device == "gpu" else "cpu"
        torch.manual_seed(0)
        model = torch_twin.create_model(case.family, mode=case.mode, num_classes=case.num_classes,
                                        width_mult=width_mult, in_channels=image[2])
        self.model = model.to(self.device, memory_format=torch.channels_last)
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        self.step = torch_twin.make_train_step(self.model, autocast_dtype=autocast)
        g = torch.Generator().manual_seed(0)
        h, w, c = image
        self.images = torch.randn(batch, c, h, w, generator=g).to(self.device, memory_format=torch.channels_last)
        self.labels = torch.randint(0, case.num_classes, (batch,), generator=g).to(self.device)

    def __call__(self, n: int) -> None:
        metrics = None
        for _ in range(n):
            metrics = self.step(self.images, self.labels)
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        self.metrics = {k: float(v) for k, v in metrics.items()}
