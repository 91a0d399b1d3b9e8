r"""Cost of a model built from duo_jax layers: parameters, binary ops, float ops, memory.

::

    python -m duo_jax.summary --config=configs/vgg7_cifar10.py [--json=costs.json]

prints, for the config's model as baseline BNN (``binary``), ``coupled`` and
``decoupled``, the totals side by side and the per-layer costs; any config
value can be overridden as in ``duo_jax.main`` (``--config.model.options.
binarize_weights=True``). :func:`totals` gives the same numbers to a program
(``results.json``).

The model is walked, not described (:mod:`duo_jax.walk`): it runs once on
two random images with every call of a leaf module that holds variables
(``QConv``, ``QDense``, ``BatchNorm``, also plain ``nn.Conv``/``nn.Dense``)
intercepted. A layer's input precision is read off the values it receives
(``{0, 1}``: binary; ``{0, 1/2, 1}``: ternary, two bit planes; else float),
its weight precision off the kernel its ``kernel_quantizer`` produces (one
magnitude per output channel: 1-bit).

Conventions (Bi-Real Net, ReActNet), per image:

* ``MACs`` of a conv or dense layer: output elements x kernel elements per
  output feature.
* ``BOPs``: ``MACs x activation bits`` of a layer that reads quantized
  activations with 1-bit weights. Every other conv or dense layer (float input,
  or float weights) counts its MACs as float MACs.
* ``OPs = BOPs / 64 + float MACs``. BatchNorm, pooling and activations are not
  counted (they fold into thresholds or are negligible).
* Parameters: the ``params`` collection; a 1-bit kernel's weights are 1-bit
  parameters, everything else is float.
* Memory as deployed (what :mod:`duo_jax.export` writes): a 1-bit kernel packed
  into 32-bit words plus its float32 scales (one, or one per output channel);
  a BatchNorm between a binary layer and the binary activation the next layer
  reads is folded into an int32 threshold and an int8 sign per feature and
  activation level; every other variable (float kernels, biases, other
  BatchNorms with their statistics) in float32.
* Float size: every variable (``params`` and ``batch_stats``) in float32.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from duo_jax import walk
from duo_jax.errors import UserError

Array = jax.Array

#: Bits a deployed folded BatchNorm stores per feature and activation level.
THRESHOLD_BITS = 32 + 8


# ---------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------


def _size(tree: Any) -> int:
    return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(tree))


def layer_costs(calls: Sequence[walk.Call], folded: dict[str, str],
                act_levels: int | None = None) -> list[dict[str, Any]]:
    """Per-call costs (see the module docstring), per image.

    Args:
      calls: from :func:`duo_jax.walk.trace`.
      folded: from :func:`duo_jax.walk.folded_norms`.
      act_levels: ``n`` of the model's quantized activation (see :func:`duo_jax.walk.input_levels`).
    """
    rows = []
    for i, call in enumerate(calls):
        batch = call.y.shape[0] if call.y.ndim else 1
        params = call.variables.get("params", {})
        a_bits = walk.bit_planes(walk.input_levels(call.x, act_levels)) if call.kernel is not None else None
        scales = walk.weight_scales(call.kernel)
        row = {"path": call.path, "type": type(call.module).__name__,
               "input": list(call.x.shape[1:]), "output": list(call.y.shape[1:]),
               "activation_bits": a_bits, "weight_bits": None, "params_1bit": 0,
               "params_float": _size(params), "bops": 0, "float_macs": 0, "memory_bits": 0,
               "float_bits": 32 * _size(call.variables), "folded": call.path in folded}
        if call.kernel is not None:
            kernel_size = int(np.size(call.kernel))
            macs = int(call.y.size // batch) * (kernel_size // call.kernel.shape[-1])
            row["weight_bits"] = 1 if scales is not None else 32
            other = 32 * (_size(call.variables) - kernel_size)
            if scales is not None:
                row["params_1bit"], row["params_float"] = kernel_size, _size(params) - kernel_size
                n_scales = 1 if np.all(scales == scales[0]) else len(scales)
                row["memory_bits"] = 32 * math.ceil(kernel_size / 32) + 32 * n_scales + other
            else:
                row["memory_bits"] = 32 * kernel_size + other
            if scales is not None and a_bits is not None:
                row["bops"] = macs * a_bits
            else:
                row["float_macs"] = macs
        elif call.path in folded:  # one threshold per feature and level of the activation it feeds
            n = walk.input_levels(calls[i + 1].x, act_levels)
            row["memory_bits"] = THRESHOLD_BITS * n * int(call.y.shape[-1])
        else:
            row["memory_bits"] = 32 * _size(call.variables)
        rows.append(row)
    return rows


def _random_variables(model: nn.Module, x: Array, seed: int) -> Any:
    """Variables of the model's shapes, filled by NumPy (an eager ``init`` is slow).

    Kernels N(0, 1); BatchNorm-like leaves as initialized (``scale`` 1,
    ``bias`` 0, ``mean`` 0, ``var`` 1); :func:`trace` calibrates the rest.
    """
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)
    fixed = {"scale": np.ones, "var": np.ones, "bias": np.zeros, "mean": np.zeros}

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in fixed:
            return fixed[name](leaf.shape, np.float32)
        return rng.standard_normal(leaf.shape, dtype=np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def summarize(model: nn.Module, input_shape: Sequence[int], variables: Any = None, *,
              activation: walk.Activation | None = None, seed: int = 0, batch: int = 2) -> dict[str, Any]:
    """Per-layer costs and totals of ``model`` per image of ``input_shape`` (H, W, C).

    Args:
      model: a Linen module whose ``apply(variables, x, train=False)`` runs it
        in inference mode (any model built from duo_jax layers).
      input_shape: one image's shape, without the batch axis.
      variables: the model's variables; None: random ones (costs depend only on
        shapes and on which layers quantize).
      activation: the quantized activation the model applies after a
        BatchNorm (to find foldable BatchNorms); None: the duo_jax activation
        of ``model.mode``, if it has one.
      seed: seed of the random images (and variables).
      batch: images run (BatchNorms normalize with their batch statistics,
        see :func:`trace`).

    Returns:
      ``{'layers': [...], 'totals': {...}}`` (see :func:`totals`).
    """
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *input_shape)), jnp.float32)
    if variables is None:
        variables = _random_variables(model, x, seed)
    variables = jax.device_get(variables)
    activation = activation or walk.default_activation(model)
    calls = walk.trace(model, variables, x, activation, calibrate=True, train=False)
    rows = layer_costs(calls, walk.folded_norms(calls), walk.activation_levels(activation))
    params = variables.get("params", {}) if hasattr(variables, "get") else {}
    other = _size(params) - sum(r["params_1bit"] + r["params_float"] for r in rows)
    if other:
        rows.append({"path": "(other parameters)", "type": "", "input": [], "output": [],
                     "activation_bits": None, "weight_bits": 32, "params_1bit": 0, "params_float": other,
                     "bops": 0, "float_macs": 0, "memory_bits": 32 * other, "float_bits": 32 * other,
                     "folded": False})
    return {"layers": rows, "totals": _totals(rows)}


def _totals(rows: Sequence[dict]) -> dict[str, Any]:
    t = {k: sum(r[k] for r in rows) for k in ("params_1bit", "params_float", "bops", "float_macs",
                                              "memory_bits", "float_bits")}
    return {
        "params_1bit": t["params_1bit"], "params_float": t["params_float"],
        "params": t["params_1bit"] + t["params_float"],
        "bops": t["bops"], "float_macs": t["float_macs"], "ops": t["bops"] / 64 + t["float_macs"],
        "memory_bytes": t["memory_bits"] / 8, "float_bytes": t["float_bits"] / 8,
    }


def totals(model: nn.Module, input_shape: Sequence[int], variables: Any = None) -> dict[str, Any]:
    """The model's cost totals per image (``summarize(...)['totals']``).

    Keys: ``params_1bit``, ``params_float``, ``params``, ``bops``,
    ``float_macs``, ``ops`` (``bops / 64 + float_macs``), ``memory_bytes``
    (as deployed), ``float_bytes`` (every variable in float32).
    """
    return summarize(model, input_shape, variables)["totals"]


# ---------------------------------------------------------------------------
# Tables and the command line
# ---------------------------------------------------------------------------

MODELS = (("binary", "baseline BNN"), ("coupled", "coupled (ternary)"), ("decoupled", "decoupled (binary)"))
_TOTAL_ROWS = (("params_1bit", "1-bit parameters"), ("params_float", "float parameters"), ("bops", "BOPs"),
               ("float_macs", "float MACs"), ("ops", "OPs = BOPs/64 + float MACs"),
               ("memory_bytes", "memory as deployed, bytes"), ("float_bytes", "float32 size, bytes"))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.1f}"
    return f"{int(v):,}"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def totals_table(results: dict[str, dict]) -> str:
    """The totals of several models side by side (``{label: summarize(...)}``), with ratios to the first."""
    labels = list(results)
    head = ["per image", *labels] + [f"{l} / {labels[0]}" for l in labels[1:]]
    rows = [head]
    for key, name in _TOTAL_ROWS:
        vals = [results[l]["totals"][key] for l in labels]
        rows.append([name, *map(_fmt, vals)] + [f"{v / vals[0]:.3f}" if vals[0] else "-" for v in vals[1:]])
    return _table(rows)


def layers_table(result: dict) -> str:
    """One model's per-layer costs."""
    rows = [["layer", "output", "a bits", "w bits", "1-bit params", "float params", "BOPs", "float MACs",
             "deployed bits"]]
    for r in result["layers"]:
        rows.append([r["path"] + (" (folded)" if r["folded"] else ""), "x".join(map(str, r["output"])),
                     _fmt(r["activation_bits"]), _fmt(r["weight_bits"]), _fmt(r["params_1bit"]),
                     _fmt(r["params_float"]), _fmt(r["bops"]), _fmt(r["float_macs"]), _fmt(r["memory_bits"])])
    return _table(rows)


def _data_shape(config, input_shape: str | None) -> tuple[tuple[int, ...], int]:
    """(image shape, classes) of the config's data, without reading it when possible."""
    from duo_jax import input_pipeline

    if input_shape:
        try:
            shape = tuple(int(v) for v in input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"--input_shape must be H,W,C (three positive integers), got {input_shape!r}")
        return shape, int(config.get("num_classes", 0) or 10)
    try:
        info = input_pipeline.create_dataset(config.data, global_batch_size=1, eval_batch_size=1, seed=0).info
    except UserError as e:
        raise UserError(f"cannot read the config's data to learn the image shape ({e}); "
                        "pass --input_shape=H,W,C") from None
    return tuple(info.image_shape), int(info.num_classes)


def compare(config, input_shape: str | None = None, num_classes: int | None = None) -> dict[str, dict]:
    """:func:`summarize` of the config's model as baseline BNN, coupled and decoupled."""
    from duo_jax import models

    shape, classes = _data_shape(config, input_shape)
    opts = dict(config.model.get("options", {}))
    if isinstance(opts.get("dtype"), str):
        opts["dtype"] = jnp.dtype(opts["dtype"])
    if opts.get("widths") is not None:
        opts["widths"] = tuple(opts["widths"])
    out = {}
    for mode, label in MODELS:
        try:
            model = models.create_model(config.model.name, mode=mode, num_classes=num_classes or classes, **opts)
            out[label] = summarize(model, shape)
        except ValueError as e:
            raise UserError(f"model {config.model.name!r} ({mode}) on images of shape {shape}: {e}") from None
        out[label]["model"] = {"name": config.model.name, "mode": mode, "input_shape": list(shape)}
    return out


def main() -> None:
    """``python -m duo_jax.summary --config=...``: bad input is one line on stderr, exit status 2."""
    from absl import flags
    from ml_collections import config_flags

    from duo_jax.main import _flag_error

    try:  # the --config.* overrides are applied while the flag is defined
        config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).", lock_config=True)
        flags.DEFINE_string("json", None, "Also write the per-layer costs and totals here.")
        flags.DEFINE_string("input_shape", None, "H,W,C of one image (default: from the config's data).")
        flags.DEFINE_integer("num_classes", None, "Classifier outputs (default: from the config's data).")
        flags.DEFINE_bool("layers", True, "Print the per-layer tables too.")
        argv = flags.FLAGS(sys.argv)
        config = flags.FLAGS.config
        if config is not None:
            config.get("model")  # loads the config file now, so that a bad path fails here
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
        print(f"error: bad flag or config: {_flag_error(e)}", file=sys.stderr)
        sys.exit(2)
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        if config is None:
            raise UserError("--config is required, e.g. --config=configs/vgg7_cifar10.py")
        results = compare(config, flags.FLAGS.input_shape, flags.FLAGS.num_classes)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    shape = next(iter(results.values()))["model"]["input_shape"]
    print(f"{config.model.name}, one {'x'.join(map(str, shape))} image:\n")
    print(totals_table(results))
    if flags.FLAGS.layers:
        for label, result in results.items():
            print(f"\n{label}:\n{layers_table(result)}")
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        print(f"\nwrote {flags.FLAGS.json}")


if __name__ == "__main__":
    main()
