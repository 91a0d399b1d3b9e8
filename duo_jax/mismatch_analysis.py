"""Gradient-mismatch analysis of small networks (BinaryDuo, section 2 of the method).

For each (network, dataset) pair of the config, each activation and each seed:

1. train the network briefly (Adam, BatchNorm in training mode) *in its own
   activation mode*, so that the weights are not at initialization;
2. freeze it: BatchNorm in inference mode with the running statistics, one
   fixed batch of training examples;
3. per layer kernel, cosine similarity between the STE gradient and the
   coordinate discrete gradient (CDG) and the Gaussian-smoothed gradient
   (:mod:`duo_jax.mismatch`), on the same random subset of coordinates.

Finite-difference steps are in units of each layer's pre-activation spread
(see :func:`probe_scales`): ``eps = eps_rel * std(z) / rms(x)`` moves a unit's
pre-activation ``z`` by ``eps_rel`` of its standard deviation for an input
``x_i`` of typical size, which is what sets how many examples of the batch
cross a quantizer threshold; ``sigma`` likewise, divided by the square root of
the number of perturbed weights per unit.

The networks are deliberately small (a 3-hidden-layer MLP and a 3-conv CNN)
and use float weights, so that only the activations are quantized, as in the
authors' CIFAR-10 VGG-7. Run it with::

    python -m duo_jax.mismatch --config=configs/mismatch.py --workdir=DIR
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from duo_jax import mismatch, quant
from duo_jax.errors import UserError

Array = jax.Array

BINARY_SURROGATES = ("clipped", "identity", "approx_sign", "swish_sign", "tanh")
ACTIVATIONS = ("float",) + BINARY_SURROGATES + ("ternary", "uniform2")


def activation(name: str, swish_beta: float = 5.0, tanh_beta: float = 2.0) -> Callable[[Array], Array]:
    """The activation ``name``: ``'float'`` (ReLU), a binary surrogate, ``'ternary'``, ``'uniform2'``."""
    if name == "float":
        return nn.relu
    if name in BINARY_SURROGATES:
        kw = {"swish_sign": {"beta": swish_beta}, "tanh": {"beta": tanh_beta}}.get(name, {})
        return quant.get(name, **kw)
    if name == "ternary":
        return quant.ternary
    if name == "uniform2":
        return quant.get("uniform", bits=2)
    raise UserError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------
# The activation is picked at run time by an integer ``which`` (``lax.switch``
# over ``acts``), so one compiled function serves every activation: compiling
# dominates the cost of these small networks on a CPU.


def _act(acts: Sequence[Callable[[Array], Array]], x: Array, which: Array) -> Array:
    return acts[0](x) if len(acts) == 1 else jax.lax.switch(which, list(acts), x)


def _probe(module: nn.Module, name: str, x: Array, z: Array) -> None:
    """Sows ``(rms(x), mean over units of std(z))`` of a layer into ``'probe'``.

    A no-op unless the ``'probe'`` collection is mutable (see
    :func:`probe_scales`).
    """
    z = z.reshape(-1, z.shape[-1])
    module.sow("probe", f"{name}_scale", jnp.stack([jnp.sqrt(jnp.mean(x**2)), jnp.mean(jnp.std(z, axis=0))]))


class PatchConv(nn.Module):
    """3x3 SAME convolution without bias, as patches @ kernel.

    The same function and kernel layout (``(3, 3, in, out)``) as ``nn.Conv``,
    written as 9 shifted slices and one matrix product: when the estimators
    ``vmap`` over perturbed kernels this becomes a batched matmul, where a
    batched-kernel convolution is very slow on a CPU.
    """

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        h, w = x.shape[1:3]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
        return patches @ kernel.reshape(-1, self.features)


class MLP(nn.Module):
    """Dense -> BN -> act per hidden layer, then a float Dense classifier."""

    widths: Sequence[int]
    acts: Sequence[Callable[[Array], Array]]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, which: Array, train: bool = False) -> Array:
        x = x.reshape(x.shape[0], -1)
        for i, w in enumerate(self.widths):
            z = nn.Dense(w, use_bias=False, name=f"dense{i + 1}")(x)
            _probe(self, f"dense{i + 1}", x, z)
            x = z
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i + 1}")(x)
            x = _act(self.acts, x, which)
        z = nn.Dense(self.num_classes, name=f"dense{len(self.widths) + 1}")(x)
        _probe(self, f"dense{len(self.widths) + 1}", x, z)
        return z


class CNN(nn.Module):
    """3x3 conv -> BN -> act per layer (2x2 max-pool after the first conv), float classifier."""

    features: Sequence[int]
    acts: Sequence[Callable[[Array], Array]]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, which: Array, train: bool = False) -> Array:
        for i, f in enumerate(self.features):
            z = PatchConv(f, name=f"conv{i + 1}")(x)
            _probe(self, f"conv{i + 1}", x, z)
            x = z
            if i == 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i + 1}")(x)
            x = _act(self.acts, x, which)
        x = x.reshape(x.shape[0], -1)
        z = nn.Dense(self.num_classes, name=f"dense{len(self.features) + 1}")(x)
        _probe(self, f"dense{len(self.features) + 1}", x, z)
        return z


def build(net: str, acts: Sequence[Callable[[Array], Array]], cfg: ml_collections.ConfigDict) -> nn.Module:
    """The network ``'mlp'`` or ``'cnn'`` switching between activations ``acts``."""
    if net == "mlp":
        return MLP(widths=tuple(cfg.mlp_widths), acts=tuple(acts))
    if net == "cnn":
        return CNN(features=tuple(cfg.cnn_features), acts=tuple(acts))
    raise UserError(f"unknown network {net!r}; known: mlp, cnn")


def kernel_paths(params: Any) -> list[str]:
    """The paths of every layer's kernel, input to output."""
    return [p for p in mismatch.leaf_paths(params) if p.endswith("/kernel")]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def load_data(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) of a bundled dataset, images float32 in [0, 1].

    ``name`` is ``'mnist5k'`` (28x28, 4,000 / 1,000) or ``'digits'`` (8x8,
    1,437 / 360), read by :func:`duo_jax.input_pipeline.load_bundled`.
    """
    from duo_jax.input_pipeline import load_bundled

    tx, ty, vx, vy = load_bundled(name)
    to_float = lambda a: np.asarray(a, np.float32) / 255.0
    return to_float(tx), np.asarray(ty, np.int32), to_float(vx), np.asarray(vy, np.int32)


# ---------------------------------------------------------------------------
# Training and measuring
# ---------------------------------------------------------------------------


def _xent(logits: Array, labels: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train(model: nn.Module, cfg: ml_collections.ConfigDict) -> Callable:
    """A jitted ``train(which, key, x, y, order) -> variables``.

    Adam on the cross-entropy, BatchNorm in training mode, one ``lax.scan``
    over the steps; ``order`` is a ``(train_steps, batch_size)`` array of
    example indices.
    """
    opt = optax.adam(cfg.learning_rate)

    def train(which, key, x, y, order):
        variables = model.init(key, x[:2], which, train=False)
        params, stats = variables["params"], variables["batch_stats"]

        def step(carry, idx):
            params, stats, opt_state = carry

            def loss(p):
                logits, upd = model.apply({"params": p, "batch_stats": stats}, x[idx], which,
                                          train=True, mutable=["batch_stats"])
                return _xent(logits, y[idx]), upd["batch_stats"]

            (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), stats, opt_state), None

        (params, stats, _), _ = jax.lax.scan(step, (params, stats, opt.init(params)), order)
        return {"params": params, "batch_stats": stats}

    return jax.jit(train)


def batch_order(n: int, cfg: ml_collections.ConfigDict, seed: int) -> np.ndarray:
    """Example indices of every training step: epochs of fixed-seed permutations."""
    rng = np.random.default_rng(seed)
    epochs = -(-cfg.train_steps * cfg.batch_size // n)
    flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return flat[: cfg.train_steps * cfg.batch_size].reshape(cfg.train_steps, cfg.batch_size).astype(np.int32)


def make_accuracy(model: nn.Module) -> Callable:
    """A jitted ``accuracy(variables, which, x, y)`` in inference mode."""

    def accuracy(variables, which, x, y):
        return jnp.mean(jnp.argmax(model.apply(variables, x, which, train=False), -1) == y)

    return jax.jit(accuracy)


def probe_scales(model: nn.Module, variables: Any, which: Array, x: Array) -> dict[str, Array]:
    """Per layer ``'<name>/kernel'``: ``std(z) / rms(x)`` on the batch ``x``, inference mode.

    ``z`` is the layer's pre-activation (its output before BatchNorm), ``x`` its
    input; ``std`` is per unit over the batch (and positions), averaged over
    units. A step ``eps`` on one weight moves ``z`` by ``eps * x_i``, so
    ``eps = eps_rel * std(z) / rms(x)`` moves it by about ``eps_rel`` standard
    deviations. This holds for a 9-input conv on correlated pixels as for a
    784-input dense layer, where ``rms(w) * sqrt(fan_in)`` does not.
    """
    _, state = model.apply(variables, x, which, train=False, mutable=["probe"])
    return {f"{name.removesuffix('_scale')}/kernel": v[0][1] / v[0][0] for name, v in state["probe"].items()}


def make_measure(model: nn.Module, paths: Sequence[str], cfg: ml_collections.ConfigDict) -> Callable:
    """A jitted ``measure(variables, which, x, y, key, eps_rel, sigma_rel) -> dict``.

    Per-layer similarities of the STE gradient with CDG and with the smoothed
    gradient. The loss is the network in inference mode (BatchNorm with its
    running statistics): one fixed function of the kernels. Per kernel ``w``,
    both estimators use the same random ``cfg.num_coords`` coordinates (all of
    a smaller kernel); with ``scale`` from :func:`probe_scales`, the CDG step is
    ``eps_rel * scale`` and the smoothing scale ``sigma_rel * scale / sqrt(m)``,
    ``m`` the number of perturbed weights per output unit (at least 1), so that
    a unit's pre-activation moves by about ``sigma_rel`` standard deviations
    whatever ``m``. ``eps_rel`` and ``sigma_rel`` are traced: a sweep compiles
    once.
    """

    def measure(variables, which, x, y, key, eps_rel, sigma_rel):
        stats = variables["batch_stats"]

        def loss_fn(params, batch):
            logits = model.apply({"params": params, "batch_stats": stats}, batch[0], which, train=False)
            return _xent(logits, batch[1])

        params, batch = variables["params"], (x, y)
        ste = mismatch.ste_gradient(loss_fn, params, batch)
        scales = probe_scales(model, variables, which, x)
        out = {"cdg": {}, "smoothed": {}, "cdg_nonzero": {}, "eps": {}}
        for path, k in zip(paths, jax.random.split(key, len(paths))):
            w = mismatch.get_leaf(params, path)
            scale = scales[path]
            n = cfg.num_coords if cfg.num_coords and cfg.num_coords < w.size else None
            k_idx, k_s = jax.random.split(k)
            idx = mismatch.sample_coords(w.size, n, k_idx)
            per_unit = max(1.0, idx.shape[0] / w.shape[-1])
            _, cdg = mismatch.coordinate_discrete_gradient(
                loss_fn, params, batch, path=path, eps=eps_rel * scale,
                indices=idx, chunk_size=cfg.chunk_size)
            _, sm = mismatch.smoothed_gradient(
                loss_fn, params, batch, path=path, sigma=sigma_rel * scale / per_unit**0.5,
                num_samples=cfg.num_samples, key=k_s, indices=idx, chunk_size=cfg.chunk_size)
            g = mismatch.get_leaf(ste, path).reshape(-1)[idx]
            out["cdg"][path] = mismatch.cosine_similarity(g, cdg)
            out["smoothed"][path] = mismatch.cosine_similarity(g, sm)
            out["cdg_nonzero"][path] = jnp.mean(cdg != 0)
            out["eps"][path] = eps_rel * scale
        return out

    return jax.jit(measure)


# ---------------------------------------------------------------------------
# The whole analysis
# ---------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "values": [float(a) for a in v]}


def analyze(cfg: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every (network, dataset) x activation x seed; returns the results dict."""
    acts = [activation(a, cfg.swish_beta, cfg.tanh_beta) for a in cfg.activations]
    results: dict[str, Any] = {}
    for spec in cfg.nets:
        net, _, dataset = spec.partition(":")
        tx, ty, vx, vy = (jnp.asarray(a) for a in load_data(dataset))
        x, y = tx[: cfg.measure_batch], ty[: cfg.measure_batch]
        model = build(net, acts, cfg)
        train, accuracy = make_train(model, cfg), make_accuracy(model)
        orders = {seed: jnp.asarray(batch_order(len(ty), cfg, seed)) for seed in cfg.seeds}
        entry: dict[str, Any] = {"net": net, "dataset": dataset, "activations": {}}
        measure = None
        for which, name in enumerate(cfg.activations):
            t0 = time.time()
            per_seed: list[dict[str, Any]] = []
            for seed in cfg.seeds:
                variables = train(which, jax.random.PRNGKey(seed), tx, ty, orders[seed])
                if measure is None:
                    entry["layers"] = kernel_paths(variables["params"])
                    measure = make_measure(model, entry["layers"], cfg)
                out = jax.device_get(measure(variables, which, x, y, jax.random.PRNGKey(1000 + seed),
                                              cfg.eps_rel, cfg.sigma_rel))
                per_seed.append({"test_accuracy": float(accuracy(variables, which, vx, vy)), **out})
            act = {"test_accuracy": _stats([r["test_accuracy"] for r in per_seed])}
            for method in ("cdg", "smoothed", "cdg_nonzero", "eps"):
                act[method] = {p: _stats([r[method][p] for r in per_seed]) for p in entry["layers"]}
            entry["activations"][name] = act
            cells = {m: " ".join(f"{act[m][p]['mean']:.2f}" for p in entry["layers"]) for m in ("cdg", "smoothed")}
            log(f"{spec} {name:12s} acc {act['test_accuracy']['mean']:.3f}  cdg {cells['cdg']}  "
                f"smoothed {cells['smoothed']}  ({time.time() - t0:.0f} s)")
        results[spec] = entry
    return results


def finding(results: dict[str, Any]) -> dict[str, Any]:
    """Per net, method and layer: the paper's finding, checked on the seed means.

    ``gap`` is ternary minus the best binary surrogate, ``surrogate_spread``
    the best minus the worst binary surrogate, ``gap_vs_clipped`` ternary minus
    binary with the same clipped STE. The finding holds for a layer
    (``holds``) when ``gap > 0`` and ``gap > surrogate_spread``: ternary beats
    every surrogate, by more than the surrogate choice moves binary. The
    classifier (the last kernel) is left out: no quantized activation follows
    it, so every activation's STE gradient is exact there.
    """
    out: dict[str, Any] = {}
    for spec, entry in results.items():
        acts = entry["activations"]
        binaries = [a for a in BINARY_SURROGATES if a in acts]
        if "ternary" not in acts or not binaries:
            continue
        for method in ("cdg", "smoothed"):
            for p in entry["layers"][:-1]:
                b = {a: acts[a][method][p]["mean"] for a in binaries}
                t = acts["ternary"][method][p]["mean"]
                best, worst = max(b.values()), min(b.values())
                cell = {"ternary": t, "best_binary": best, "best_surrogate": max(b, key=b.get),
                        "worst_binary": worst, "gap": t - best, "surrogate_spread": best - worst,
                        "holds": bool(t - best > 0 and t - best > best - worst)}
                if "clipped" in b:
                    cell["gap_vs_clipped"] = t - b["clipped"]
                out[f"{spec} {method} {p}"] = cell
    return out


def finding_text(cells: dict[str, Any]) -> str:
    """One line per (net, method, layer) of :func:`finding`, and the counts."""
    lines = [f"\nHidden layers: {'net method layer':21s} {'ternary':>8s} {'best bin':>8s} {'(surrogate)':>13s} "
             f"{'gap':>6s} {'spread':>6s} {'t - clipped':>11s}  holds"]
    for k, c in cells.items():
        lines.append(f"{k:36s} {c['ternary']:8.3f} {c['best_binary']:8.3f} {c['best_surrogate']:>13s} "
                     f"{c['gap']:6.3f} {c['surrogate_spread']:6.3f} {c.get('gap_vs_clipped', float('nan')):11.3f}  "
                     f"{'yes' if c['holds'] else 'no'}")
    holds = sum(c["holds"] for c in cells.values())
    clipped = [c["gap_vs_clipped"] > 0 for c in cells.values() if "gap_vs_clipped" in c]
    lines.append(f"ternary > every binary surrogate by more than their spread: {holds}/{len(cells)} cells; "
                 f"ternary > binary with the clipped STE: {sum(clipped)}/{len(clipped)} cells")
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    """The results as text: one block per (net, method), rows activations, columns layers."""
    lines = []
    for spec, entry in results.items():
        layers = entry["layers"]
        for method in ("cdg", "smoothed"):
            lines.append(f"\n{spec}  STE vs {method}  (cosine, mean +- std over seeds)")
            head = f"{'activation':12s} {'test acc':>9s} " + " ".join(f"{p.split('/')[0]:>13s}" for p in layers)
            lines.append(head)
            lines.append("-" * len(head))
            for name, act in entry["activations"].items():
                cells = " ".join(f"{act[method][p]['mean']:6.3f}+-{act[method][p]['std']:.3f}" for p in layers)
                lines.append(f"{name:12s} {act['test_accuracy']['mean']:9.3f} {cells}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Similarity per layer, one series per activation, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(results)
    fig, axes = plt.subplots(2, len(specs), figsize=(5.5 * len(specs), 7), squeeze=False)
    for j, spec in enumerate(specs):
        entry = results[spec]
        layers = entry["layers"]
        xs = np.arange(len(layers))
        names = list(entry["activations"])
        for i, method in enumerate(("cdg", "smoothed")):
            ax = axes[i, j]
            for k, name in enumerate(names):
                act = entry["activations"][name][method]
                shift = (k - (len(names) - 1) / 2) * 0.04
                style = "--" if name in BINARY_SURROGATES else "-"
                ax.errorbar(xs + shift, [act[p]["mean"] for p in layers], yerr=[act[p]["std"] for p in layers],
                            fmt="o" + style, capsize=3, label=name, markersize=4)
            ax.set_xticks(xs, [p.split("/")[0] for p in layers])
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
            ax.set_title(f"{spec}: STE vs {method}")
            ax.set_ylabel("cosine similarity")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The analysis command: writes ``workdir/mismatch.json`` and ``workdir/mismatch.png``."""
    unknown = [a for a in cfg.activations if a not in ACTIVATIONS]
    if unknown:
        raise UserError(f"unknown activation(s) {', '.join(unknown)}; known: {', '.join(ACTIVATIONS)}")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    results = analyze(cfg, log)
    report = {"config": cfg.to_dict(), "results": results, "finding": finding(results),
              "runtime_s": time.time() - t0}
    with open(os.path.join(workdir, "mismatch.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(results, os.path.join(workdir, "mismatch.png"))
    log(table(results))
    if report["finding"]:
        log(finding_text(report["finding"]))
    log(f"wrote {os.path.join(workdir, 'mismatch.json')} and mismatch.png in {report['runtime_s']:.0f} s")
    return report
