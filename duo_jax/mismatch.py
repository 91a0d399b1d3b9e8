"""Gradient-mismatch estimators: STE gradient vs finite-difference gradients.

BinaryDuo (Kim et al., ICLR 2020, section 2 of ``method.md``) measures how far
the straight-through-estimator (STE) gradient of a quantized-activation network
is from the gradient the loss really has. The loss of such a network is
piecewise constant in the weights, so it is compared with finite-difference
estimates taken at a finite scale:

* coordinate discrete gradient (CDG), one coordinate ``i`` of one weight leaf::

      g_i = (L(w + eps e_i) - L(w - eps e_i)) / (2 eps)

* antithetic Gaussian smoothing (evolution-strategies form), ``u_k ~ N(0, I)``::

      g = mean_k [L(w + s u_k) - L(w - s u_k)] u_k / (2 s)

and the mismatch of a layer is the cosine similarity between the STE gradient
(``jax.grad`` through the quantizers' custom VJPs) and the estimate, restricted
to the same coordinates.

Everything here is a pure function of ``loss_fn(params, batch) -> scalar``, a
params pytree and a batch; nothing knows about Flax. **The caller's**
``loss_fn`` **must evaluate the network in one fixed state**: BatchNorm in
inference mode (running statistics) or with frozen batch statistics, no
dropout, no mutable collections. Otherwise ``L(w + eps e_i)`` and
``L(w - eps e_i)`` are losses of different functions and the estimate means
nothing.

A leaf is named by its *path*: either a tuple of keys (``('dense1',
'kernel')``; integers for list/tuple positions) or the same keys joined by
``'/'`` (``'dense1/kernel'``). :func:`leaf_paths` lists the paths of a tree.
Estimates over a leaf are returned as ``(indices, values)``: flat (row-major)
indices into the leaf and the estimate at those coordinates, so
``ste.reshape(-1)[indices]`` is the matching part of the STE gradient. Draw a
subset once with :func:`sample_coords` and pass it as ``indices=`` to compare
both estimators on the same coordinates.

Perturbed losses are evaluated ``chunk_size`` at a time with ``jax.vmap``
inside ``jax.lax.map`` (CDG) or ``jax.lax.scan`` (smoothing, which accumulates
a sum instead of storing every sample), so a whole estimate is one traced
computation; wrap it in ``jax.jit`` with ``loss_fn``, ``path``,
``num_coords``, ``num_samples`` and ``chunk_size`` static (``eps``, ``sigma``
and the arrays may be traced).

The analysis (small networks, training, tables, plots) lives in
:mod:`duo_jax.mismatch_analysis`; its command is this module's :func:`main`::

    python -m duo_jax.mismatch --config=configs/mismatch.py --workdir=DIR
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp

from duo_jax.errors import UserError

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Any], Array]
Path = str | Sequence[Hashable]

__all__ = [
    "ste_gradient",
    "coordinate_discrete_gradient",
    "smoothed_gradient",
    "cosine_similarity",
    "layer_similarities",
    "leaf_paths",
    "get_leaf",
    "sample_coords",
]


# ---------------------------------------------------------------------------
# Leaves by path
# ---------------------------------------------------------------------------


def _key_str(entry: Any) -> str:
    """One entry of a ``jax.tree_util`` key path as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _normalize(path: Path) -> tuple[str, ...]:
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(str(p) for p in path)


def leaf_paths(params: PyTree) -> list[str]:
    """The ``'/'``-joined paths of every leaf of ``params``, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return ["/".join(_key_str(e) for e in kp) for kp, _ in flat]


def _locate(params: PyTree, path: Path) -> tuple[Array, Callable[[Array], PyTree]]:
    """The leaf at ``path`` and a function putting a replacement leaf in its place."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    want = _normalize(path)
    keys = [tuple(_key_str(e) for e in kp) for kp, _ in flat]
    if want not in keys:
        raise UserError(
            f"no leaf at path {'/'.join(want)!r}; leaves: {', '.join('/'.join(k) for k in keys)}"
        )
    pos = keys.index(want)
    leaves = [leaf for _, leaf in flat]

    def replace(new_leaf: Array) -> PyTree:
        new = list(leaves)
        new[pos] = new_leaf
        return jax.tree_util.tree_unflatten(treedef, new)

    return leaves[pos], replace


def get_leaf(params: PyTree, path: Path) -> Array:
    """The leaf of ``params`` at ``path`` (tuple of keys or ``'/'``-joined)."""
    return _locate(params, path)[0]


def _chunked(n: int, chunk_size: int) -> tuple[int, int]:
    """(number of chunks, padded length) for ``n`` items in chunks of ``chunk_size``."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk = min(chunk_size, max(n, 1))
    num = -(-n // chunk)
    return num, num * chunk


def sample_coords(size: int, num_coords: int | None = None, key: Array | None = None) -> Array:
    """All flat indices ``arange(size)``, or a sorted random subset of ``num_coords``.

    The subset is drawn without replacement from ``key``; pass the result as
    ``indices`` to both estimators to compare them on the same coordinates.
    """
    if num_coords is None or num_coords >= size:
        return jnp.arange(size)
    if num_coords < 1:
        raise ValueError(f"num_coords must be positive, got {num_coords}")
    if key is None:
        raise ValueError("a random subset of coordinates (num_coords) needs a key")
    return jnp.sort(jax.random.choice(key, size, (num_coords,), replace=False))


# ---------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------


def ste_gradient(loss_fn: LossFn, params: PyTree, batch: Any) -> PyTree:
    """The STE gradient: ``jax.grad`` of ``loss_fn`` through the quantizers.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, network in one fixed state.
      params: the parameters (any pytree).
      batch: whatever ``loss_fn`` takes.

    Returns:
      A pytree like ``params``.
    """
    return jax.grad(loss_fn)(params, batch)


def coordinate_discrete_gradient(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    path: Path,
    eps: float | Array,
    num_coords: int | None = None,
    key: Array | None = None,
    indices: Array | None = None,
    chunk_size: int = 64,
) -> tuple[Array, Array]:
    """Central differences ``(L(w + eps e_i) - L(w - eps e_i)) / (2 eps)`` over one leaf.

    The denominator is the actual float distance between the two perturbed
    weights, ``(w_i + eps) - (w_i - eps)`` as rounded, so a small ``eps`` in
    float32 is not biased by rounding of the step.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, network in one fixed state.
      params: the parameters.
      batch: the fixed batch.
      path: the leaf (tuple of keys or ``'/'``-joined).
      eps: step (may be traced).
      num_coords: None for every coordinate, else a random subset of this size
        (without replacement, drawn from ``key``).
      key: PRNG key, needed only with ``num_coords``.
      indices: explicit flat indices (overrides ``num_coords`` and ``key``).
      chunk_size: perturbed losses evaluated together in one ``vmap``.

    Returns:
      ``(indices, values)``: the flat indices into the leaf (sorted, unless
      given), and the estimate at those coordinates (the leaf's dtype).
    """
    leaf, replace = _locate(params, path)
    flat = leaf.reshape(-1)
    idx = sample_coords(flat.size, num_coords, key) if indices is None else jnp.asarray(indices)
    n = idx.shape[0]
    num_chunks, padded = _chunked(n, chunk_size)
    eps = jnp.asarray(eps, flat.dtype)

    def one(i: Array) -> Array:
        w_plus, w_minus = flat[i] + eps, flat[i] - eps
        l_plus = loss_fn(replace(flat.at[i].set(w_plus).reshape(leaf.shape)), batch)
        l_minus = loss_fn(replace(flat.at[i].set(w_minus).reshape(leaf.shape)), batch)
        return (l_plus - l_minus) / (w_plus - w_minus)

    chunks = jnp.pad(idx, (0, padded - n)).reshape(num_chunks, -1)
    values = jax.lax.map(jax.vmap(one), chunks).reshape(-1)[:n]
    return idx, values.astype(flat.dtype)


def smoothed_gradient(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    path: Path,
    sigma: float | Array,
    num_samples: int,
    key: Array,
    num_coords: int | None = None,
    indices: Array | None = None,
    chunk_size: int = 64,
) -> tuple[Array, Array]:
    """Antithetic Gaussian-smoothing gradient over one leaf.

    ``g = mean_k [L(w + s u_k) - L(w - s u_k)] u_k / (2 s)``, ``u_k ~ N(0, I)``:
    an unbiased estimate of the gradient of the smoothed loss
    ``E_u L(w + s u)``. Its variance grows with the number ``d`` of perturbed
    coordinates: on a linear loss the cosine with the true gradient is about
    ``1 / sqrt(1 + (d + 1) / num_samples)``. With ``num_coords`` only a random
    subset of ``d = num_coords`` coordinates is perturbed (the others stay at
    ``w``), which estimates that part of the gradient with far less noise.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, network in one fixed state.
      params: the parameters.
      batch: the fixed batch.
      path: the leaf (tuple of keys or ``'/'``-joined).
      sigma: smoothing scale ``s`` (may be traced).
      num_samples: number of antithetic pairs ``K``.
      key: PRNG key, split into ``(key_coords, key_u)``; sample ``k`` uses
        ``split(key_u, num_samples)[k]`` whatever ``chunk_size``, so chunking
        does not change the samples.
      num_coords: None to perturb the whole leaf, else a random subset.
      indices: explicit flat indices to perturb (overrides ``num_coords``).
      chunk_size: antithetic pairs evaluated together in one ``vmap``.

    Returns:
      ``(indices, values)`` as in :func:`coordinate_discrete_gradient`.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    leaf, replace = _locate(params, path)
    flat = leaf.reshape(-1)
    key_idx, key_u = jax.random.split(key)
    if indices is None:
        idx = sample_coords(flat.size, num_coords, key_idx)
        full = num_coords is None or num_coords >= flat.size
    else:
        idx, full = jnp.asarray(indices), False
    d = idx.shape[0]
    sigma = jnp.asarray(sigma, flat.dtype)
    num_chunks, padded = _chunked(num_samples, chunk_size)
    keys = jax.random.split(key_u, num_samples)
    keys = jnp.concatenate([keys, jnp.repeat(keys[:1], padded - num_samples, axis=0)])
    mask = (jnp.arange(padded) < num_samples).astype(flat.dtype)

    def one(k: Array, m: Array) -> Array:
        u = jax.random.normal(k, (d,), flat.dtype)
        delta = sigma * u if full else jnp.zeros_like(flat).at[idx].set(sigma * u)
        l_plus = loss_fn(replace((flat + delta).reshape(leaf.shape)), batch)
        l_minus = loss_fn(replace((flat - delta).reshape(leaf.shape)), batch)
        return m * (l_plus - l_minus) * u

    def step(total: Array, xs: tuple[Array, Array]) -> tuple[Array, None]:
        return total + jax.vmap(one)(*xs).sum(axis=0), None

    xs = (keys.reshape(num_chunks, -1, *keys.shape[1:]), mask.reshape(num_chunks, -1))
    total, _ = jax.lax.scan(step, jnp.zeros((d,), flat.dtype), xs)
    return idx, total / (2.0 * sigma * num_samples)


# ---------------------------------------------------------------------------
# Similarities
# ---------------------------------------------------------------------------


def cosine_similarity(a: Array, b: Array, tiny: float = 1e-30) -> Array:
    """``<a, b> / (|a| |b|)`` of the flattened arrays, clipped to [-1, 1]; 0 when either is zero."""
    a = jnp.ravel(a).astype(jnp.promote_types(a.dtype, jnp.float32))
    b = jnp.ravel(b).astype(a.dtype)
    denom = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(denom > tiny, jnp.clip(jnp.vdot(a, b) / jnp.maximum(denom, tiny), -1.0, 1.0), 0.0)


def layer_similarities(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    paths: Sequence[Path],
    method: str = "cdg",
    key: Array | None = None,
    eps: float | Sequence[float] | Array = 1e-3,
    sigma: float | Sequence[float] | Array = 1e-3,
    num_samples: int = 256,
    num_coords: int | None = None,
    chunk_size: int = 64,
) -> dict[str, Array]:
    """Per-leaf cosine between the STE gradient and a finite-difference estimate.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, network in one fixed state
        (BatchNorm in inference mode or with frozen statistics).
      params: the parameters.
      batch: the fixed batch.
      paths: the leaves to compare (typically each layer's kernel).
      method: ``'cdg'`` (:func:`coordinate_discrete_gradient`) or
        ``'smoothed'`` (:func:`smoothed_gradient`).
      key: PRNG key (split per path); needed for ``'smoothed'`` and for
        ``num_coords``.
      eps: CDG step, one for all paths or one per path.
      sigma: smoothing scale, one for all paths or one per path.
      num_samples: antithetic pairs for ``'smoothed'``.
      num_coords: None for every coordinate, else a random subset per leaf.
      chunk_size: perturbed losses per ``vmap``.

    Returns:
      ``{path as '/'-joined string: cosine similarity}`` (scalar arrays).
    """
    if method not in ("cdg", "smoothed"):
        raise ValueError(f"method must be 'cdg' or 'smoothed', got {method!r}")
    if key is None and (method == "smoothed" or num_coords is not None):
        raise ValueError(f"method={method!r} with num_coords={num_coords} needs a key")
    paths = list(paths)
    ste = ste_gradient(loss_fn, params, batch)
    keys = jax.random.split(key, len(paths)) if key is not None else [None] * len(paths)

    def per_path(value: Any, j: int) -> Any:
        if isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and value.ndim > 0):
            return value[j]
        return value

    out = {}
    for j, (path, k) in enumerate(zip(paths, keys)):
        if method == "cdg":
            idx, est = coordinate_discrete_gradient(
                loss_fn, params, batch, path=path, eps=per_path(eps, j),
                num_coords=num_coords, key=k, chunk_size=chunk_size)
        else:
            idx, est = smoothed_gradient(
                loss_fn, params, batch, path=path, sigma=per_path(sigma, j),
                num_samples=num_samples, key=k, num_coords=num_coords, chunk_size=chunk_size)
        out["/".join(_normalize(path))] = cosine_similarity(get_leaf(ste, path).reshape(-1)[idx], est)
    return out


# ---------------------------------------------------------------------------
# The analysis command
# ---------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    """absl entry point of ``python -m duo_jax.mismatch --config=... --workdir=...``.

    Trains the small networks of :mod:`duo_jax.mismatch_analysis` briefly in
    each activation mode, measures the per-layer similarities and writes
    ``workdir/mismatch.json`` and ``workdir/mismatch.png``. A
    :class:`~duo_jax.errors.UserError` is printed as one line (exit status 2, as in duo_jax.main).
    """
    import sys

    from absl import flags

    from duo_jax import mismatch_analysis

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        if cfg is None:
            raise UserError("--config is required, e.g. --config=configs/mismatch.py")
        if not workdir:
            raise UserError("--workdir is required, e.g. --workdir=runs/mismatch")
        mismatch_analysis.run(cfg, workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _define_flags() -> None:
    """Command-line flags; defined only when run as a program (no import side effects)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "analysis config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "where mismatch.json and mismatch.png go")


if __name__ == "__main__":  # pragma: no cover - exercised by the command-line test
    from absl import app

    _define_flags()
    app.run(main)
