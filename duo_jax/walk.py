"""Walking a model built from duo_jax layers: its leaf calls, what they read, what folds.

:func:`trace` runs the model once with every call of a leaf module that
holds variables intercepted (``flax.linen.intercept_methods``) and records
its input, output and variables. From these, without knowing the model's
family: whether a layer reads quantized activations (:func:`levels` of its
input: ``{0, 1}`` binary, ``{0, 1/2, 1}`` ternary, ...), whether its kernel
is 1-bit (:func:`weight_scales`: one magnitude per output channel), and which
BatchNorms sit between a binary layer and the binary activation of the next
one (:func:`folded_norms`). :mod:`duo_jax.summary` counts costs from this,
:mod:`duo_jax.bitpack` packs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Activation = Callable[[Array], Array]

#: Inputs with more levels than this (an 8-bit image, say) count as float.
MAX_LEVELS = 15


@dataclasses.dataclass
class Call:
    """One call of a leaf module that holds variables, as the model made it.

    Attributes:
      path: the module's path, ``'/'``-joined (``'stage1_block1_conv1'``).
      module: the module, unbound (its attributes: kernel size, strides, ...).
      variables: the module's variables as NumPy arrays, by collection.
      x: its first input. y: its output.
      kernel: the kernel as the layer uses it (after its ``kernel_quantizer``),
        or None for a module without a ``kernel`` parameter.
      activated: the quantized activation of ``y``, for a BatchNorm when
        :func:`trace` was given one, else None.
    """

    path: str
    module: nn.Module
    variables: dict[str, dict[str, np.ndarray]]
    x: np.ndarray
    y: np.ndarray
    kernel: np.ndarray | None
    activated: np.ndarray | None = None


def trace(model: nn.Module, variables: Any, x: Array, activation: Activation | None = None, *,
          calibrate: bool = False, **apply_kwargs) -> list[Call]:
    """Runs ``model.apply(variables, x, **apply_kwargs)`` once and records its leaf calls.

    A leaf is a module whose own variables are arrays (no submodules); calls
    are recorded in the order the model makes them. The model runs under one
    ``jax.jit`` (compiled once) that returns every leaf's input and output
    (and ``activation`` of every BatchNorm's output, when given).

    With ``calibrate``, every BatchNorm's output is replaced by its input
    normalized with the batch's statistics (then its own scale and bias), so
    that random variables give activations that are neither all 0 nor all 1.
    """
    variables = jax.device_get(variables)
    found: list[tuple[str, nn.Module, dict]] = []

    def run(traced, x):
        arrays = []

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not args or not hasattr(args[0], "shape"):
                return next_fun(*args, **kwargs)
            own = {c: _subtree(traced.get(c, {}), mod.path) for c in traced}
            own = {c: v for c, v in own.items() if v}
            if not own or not all(hasattr(a, "shape") for v in own.values() for a in v.values()):
                return next_fun(*args, **kwargs)
            out = next_fun(*args, **kwargs)
            if calibrate and "mean" in own.get("batch_stats", {}):
                out = _batch_normalized(args[0], own.get("params", {}))
            kernel = own.get("params", {}).get("kernel")
            quantizer = getattr(mod, "kernel_quantizer", None)
            if kernel is not None and quantizer is not None:
                kernel = quantizer(kernel)
            act = None
            if activation is not None and "mean" in own.get("batch_stats", {}):
                try:
                    act = activation(out)
                except ValueError:  # e.g. an odd channel count for the decoupled activation
                    act = None
            found.append(("/".join(mod.path), mod.clone(parent=None), tuple(mod.path)))
            arrays.append((args[0], out, kernel, act))
            return out

        with nn.intercept_methods(interceptor):
            model.apply(traced, x, **apply_kwargs)
        return arrays

    # One-off program: XLA's backend optimizations would take most of its time.
    compiled = jax.jit(run).lower(variables, x).compile({"xla_backend_optimization_level": 0})
    arrays = jax.device_get(compiled(variables, x))
    calls = []
    for (path, mod, scope), (xi, yi, k, act) in zip(found, arrays):
        own = {c: {n: np.asarray(a) for n, a in _subtree(variables[c], scope).items()} for c in variables}
        calls.append(Call(path, mod, {c: v for c, v in own.items() if v}, np.asarray(xi), np.asarray(yi),
                          None if k is None else np.asarray(k), None if act is None else np.asarray(act)))
    return calls


def _batch_normalized(x: Array, params: dict) -> Array:
    axes = tuple(range(x.ndim - 1))
    y = (x - x.mean(axes)) * jax.lax.rsqrt(x.var(axes) + 1e-5)
    return y * params.get("scale", 1.0) + params.get("bias", 0.0)


def _subtree(tree: Any, path: Sequence[str]) -> dict:
    for name in path:
        if not hasattr(tree, "get") or name not in tree:
            return {}
        tree = tree[name]
    return dict(tree) if hasattr(tree, "items") else {}


def levels(a: np.ndarray) -> int | None:
    """``n`` if every value of ``a`` is exactly one of ``k/n`` (float32), ``k = 0..n``, ``n <= MAX_LEVELS``.

    The smallest such ``n``; None for anything else (a float tensor).
    """
    a = np.asarray(a)
    if a.size == 0 or a.min() < 0 or a.max() > 1:
        return None
    values = np.unique(a).astype(np.float32)
    if len(values) > MAX_LEVELS + 1:
        return None
    for n in range(1, MAX_LEVELS + 1):
        if np.array_equal(np.round(values * np.float32(n)) / np.float32(n), values):
            return n
    return None


@functools.lru_cache(maxsize=32)
def activation_levels(activation: Activation | None) -> int | None:
    """The ``n`` of an ``n + 1``-level activation function (read off a fine grid), or None."""
    if activation is None:
        return None
    grid = jnp.linspace(-2.0, 3.0, 5001, dtype=jnp.float32)
    return levels(np.asarray(jax.jit(activation)(jnp.stack([grid, grid], axis=-1))))


def input_levels(x: np.ndarray, act_levels: int | None = None) -> int | None:
    """Levels ``n`` of a quantized input, None for a float one.

    ``act_levels``, the model's activation's ``n``, is taken when the values
    seen fit it (a ternary input that happens to hold only 0 and 1 is ternary).
    """
    n = levels(x)
    if n is not None and act_levels is not None and act_levels % n == 0:
        return act_levels
    return n


def bit_planes(n: int | None) -> int | None:
    """Bits of an ``n + 1``-level value (``ceil(log2(n + 1))``), None for float."""
    return None if n is None else max(1, math.ceil(math.log2(n + 1)))


def weight_scales(kernel: np.ndarray | None) -> np.ndarray | None:
    """The per-output-channel magnitude of a 1-bit kernel (every entry ``+-s_n``), else None."""
    if kernel is None or kernel.ndim < 2:
        return None
    k = np.abs(kernel.reshape(-1, kernel.shape[-1]))
    s = k.max(axis=0)
    return s.astype(np.float32) if np.array_equal(k, np.broadcast_to(s, k.shape)) else None


def is_norm(call: Call) -> bool:
    """A normalization layer with running statistics (BatchNorm)."""
    return "mean" in call.variables.get("batch_stats", {})


def is_binary_layer(call: Call) -> bool:
    """A conv/dense layer that reads quantized activations with 1-bit weights."""
    return call.kernel is not None and weight_scales(call.kernel) is not None and levels(call.x) is not None


def default_activation(model: nn.Module) -> Activation | None:
    """The quantized activation of a duo_jax model (its ``mode``), else None."""
    mode = getattr(model, "mode", None)
    return None if mode is None else _duo_activation(mode)


@functools.lru_cache(maxsize=None)
def _duo_activation(mode: str) -> Activation:
    from duo_jax import layers

    return lambda o: layers.duo_activation(jnp.asarray(o), mode)


def _values_subset(inner: np.ndarray, outer: np.ndarray) -> bool:
    """Every channel ``f`` of ``inner`` takes only values of channel ``f mod N`` of ``outer``."""
    n, f = outer.shape[-1], inner.shape[-1]
    if f % n:
        return False

    def keys(a: np.ndarray, channels: np.ndarray) -> np.ndarray:  # (channel, float32 bits) as one int64
        bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.int64)
        return (np.broadcast_to(channels, a.shape).astype(np.int64) << 32) | bits

    inner_keys = keys(inner.reshape(-1, f), np.arange(f) % n)
    return bool(np.isin(inner_keys, keys(outer.reshape(-1, n), np.arange(n))).all())


def folded_norms(calls: Sequence[Call]) -> dict[str, str]:
    """BatchNorms that fold, with the binary layer each reads: ``{norm path: layer path}``.

    A BatchNorm folds into thresholds when the call before it is a binary layer
    whose outputs reach it only through value-selecting steps (max pooling,
    reshapes, :func:`duo_jax.layers.duplicate`), and the next call's input is
    the quantized activation of its output, exactly (``Call.activated``, from
    :func:`trace` given the activation), and that activation is not constant.
    """
    out: dict[str, str] = {}
    for i in range(1, len(calls) - 1):
        prev, bn, nxt = calls[i - 1], calls[i], calls[i + 1]
        if not (is_norm(bn) and bn.activated is not None and is_binary_layer(prev)):
            continue
        if nxt.x.shape != bn.y.shape or not _values_subset(bn.x, prev.y):
            continue
        lively = bn.activated.min() != bn.activated.max()  # an all-0 (or all-1) probe proves nothing
        if lively and np.array_equal(bn.activated, nxt.x):
            out[bn.path] = prev.path
    return out
