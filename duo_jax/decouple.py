"""Coupled (ternary) -> decoupled (binary) variables transform.

A ternary activation is the mean of two binary ones,
``t(x) = (b(x - 1/4) + b(x + 1/4)) / 2``, so a layer ``W`` reading ``t`` computes
the same as a layer ``[W/2, W/2]`` reading the two binary copies. With
:mod:`duo_jax.layers` the decoupled model has the coupled model's parameter
paths, and only two kinds of leaves change shape:

* a kernel whose input-feature axis (second to last, for Linen Conv and Dense
  alike) doubled reads both binary copies: it becomes ``[W/2, W/2]`` along that
  axis (with ``sign(w) * mean|w|`` binarization, sign and scale halve exactly);
* a 1-D leaf that doubled (BatchNorm scale, bias, mean, var) belongs to a
  BatchNorm over the two copies of a duplicated tensor: it becomes ``[p, p]``.

Everything else keeps its shape and is copied. The transform is driven by
shapes alone, so it works for any model built from these layers, not only the
families in :mod:`duo_jax.models`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _split_leaf(path, src, shape: tuple[int, ...]):
    name = _path_str(path)
    src_shape = tuple(np.shape(src))
    if src_shape == shape:
        return src
    if len(shape) == 1 and shape[0] == 2 * src_shape[0]:
        return jnp.concatenate([src, src], axis=0)
    if (
        len(shape) >= 2
        and len(shape) == len(src_shape)
        and shape[-2] == 2 * src_shape[-2]
        and shape[:-2] == src_shape[:-2]
        and shape[-1] == src_shape[-1]
    ):
        half = jnp.asarray(src) * jnp.asarray(0.5, jnp.asarray(src).dtype)
        return jnp.concatenate([half, half], axis=-2)
    raise ValueError(
        f"cannot decouple {name}: coupled shape {src_shape} does not map onto decoupled shape "
        f"{shape} (expected equal shapes, a 1-D leaf that doubles, or a kernel whose input "
        "axis doubles)"
    )


def decouple(coupled_variables: PyTree, decoupled_template: PyTree) -> PyTree:
    """Turns a coupled model's variables into the equivalent decoupled ones.

    Args:
      coupled_variables: variables of the ternary model (e.g.
        ``{'params': ..., 'batch_stats': ...}``).
      decoupled_template: variables of the decoupled model, or their
        ``jax.eval_shape``; only structure and shapes are read.

    Returns:
      Decoupled variables with the template's structure, such that the
      decoupled model computes exactly what the coupled model computes (up to
      float rounding), in inference and in training mode.

    Raises:
      ValueError: if the trees differ in structure, or a leaf's shapes do not
        fit one of the rules (the message names the path and both shapes).
    """
    src_paths = dict(jax.tree_util.tree_flatten_with_path(coupled_variables)[0])
    dst_leaves, treedef = jax.tree_util.tree_flatten_with_path(decoupled_template)
    dst_paths = [p for p, _ in dst_leaves]
    missing = [_path_str(p) for p in dst_paths if p not in src_paths]
    extra = sorted(set(map(_path_str, src_paths)) - set(map(_path_str, dst_paths)))
    if missing or extra:
        raise ValueError(
            "coupled and decoupled variables differ in structure: "
            f"only in decoupled: {missing[:5]}; only in coupled: {extra[:5]}"
        )
    out = [_split_leaf(p, src_paths[p], tuple(t.shape)) for p, t in dst_leaves]
    return jax.tree_util.tree_unflatten(treedef, out)
