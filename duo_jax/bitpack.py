"""Bit-packed binary layers: packing, integer thresholds, and an XNOR-popcount forward.

A binary layer reads activations ``x`` in ``{0, 1}`` with a 1-bit kernel
``wq = s_n * (+-1)`` (one scale per output channel ``n``, or per layer). With
the signs as bits ``b`` (1 for ``+1``)::

    sum_i x_i * wq_in = s_n * k_n,   k_n = 2 * popcount(x AND b_n) - popcount(x)

so the layer is an integer GEMM on packed words (im2col over packed pixels
for a conv), 32 inputs per ``uint32`` word. It is computed word-major: both
operands ``(words, rows)``, a ``lax.fori_loop`` over words (unrolled 8)
accumulating ``population_count(a[w][:, None] & b[w][None, :])`` into a
block of rows that stays in cache (the broadcast-and-reduce form is several
times slower than float on CPU).

A BatchNorm that reads such a layer (through max pooling, reshapes or
:func:`duo_jax.layers.duplicate` only) and feeds the binary activation of the
next binary layer folds into an integer threshold per feature: the float model
fires iff ``act(BN(fl(k * s)))``, which is monotone in the integer ``k``, so it
fires iff ``sign * k >= threshold``. The threshold is found by bisection on
that very float computation (BatchNorm module and activation, float32), so the
fold is exact for every ``k`` (whatever the sign of the BatchNorm scale).

:func:`pack` makes a :class:`PackedModel` (binary kernels as bits, their
scales, thresholds, the float layers as they are); :func:`forward` runs the
model's own definition with the binary layers on packed bits and the folded
BatchNorms as integer comparisons. It equals the float forward up to the float
rounding of the float convolution's sums (``fl(k * s)`` here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from duo_jax import walk
from duo_jax.errors import UserError

Array = jax.Array
WORD = 32

# ---------------------------------------------------------------------------
# Bits and words
# ---------------------------------------------------------------------------


def pack_bits(bits: Array) -> Array:
    """Packs the last axis (non-zero = 1) into ``uint32`` words, bit ``j`` of word ``w`` = entry ``32 w + j``.

    The axis is zero-padded to a multiple of 32.
    """
    c = bits.shape[-1]
    words = -(-c // WORD)
    b = (bits != 0).astype(jnp.uint32)
    b = jnp.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, words * WORD - c)])
    b = b.reshape(*b.shape[:-1], words, WORD) << jnp.arange(WORD, dtype=jnp.uint32)
    return jnp.sum(b, axis=-1, dtype=jnp.uint32)  # distinct bits: the sum is an OR


def pack_bits_np(bits: np.ndarray) -> np.ndarray:
    """All of ``bits`` (C order, non-zero = 1) tightly into little-endian ``uint32`` words."""
    raw = np.packbits(np.asarray(bits).reshape(-1) != 0, bitorder="little")
    raw = np.pad(raw, (0, -len(raw) % 4))
    return raw.view("<u4").astype(np.uint32)


def unpack_bits_np(words: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits_np`: the first ``count`` bits as ``uint8`` 0/1."""
    raw = np.asarray(words, np.uint32).astype("<u4").view(np.uint8)
    return np.unpackbits(raw, bitorder="little")[:count]


def kernel_words(signs: np.ndarray) -> np.ndarray:
    """A kernel's sign bits ``(..., C, N)`` in the GEMM layout ``(prod(...) * ceil(C/32), N)`` uint32.

    Words run over input channels at each kernel position (``(kh, kw, C)``
    order), as :func:`pack_bits` packs :func:`binary_conv`'s patches.
    """
    signs = np.swapaxes(np.asarray(signs) != 0, -1, -2)  # (..., N, C)
    c = signs.shape[-1]
    signs = np.pad(signs, [(0, 0)] * (signs.ndim - 1) + [(0, -c % WORD)])
    words = np.ascontiguousarray(np.packbits(signs, axis=-1, bitorder="little")).view("<u4").astype(np.uint32)
    return np.swapaxes(words, -1, -2).reshape(-1, words.shape[-2])


def _block_rows(n: int) -> int:
    """Rows per GEMM block: an int32 accumulator of about 128 KiB (in cache)."""
    return int(2 ** max(3, round(math.log2(max(1, 32768 // n)))))


def popcount_matmul(a: Array, b: Array, block_rows: int | None = None, unroll: int = 8, *,
                    signed: bool = False) -> Array:
    """``sum_w popcount(a[m, w] & b[w, n])`` as int32 ``(M, N)``, for ``a`` ``(M, W)`` and ``b`` ``(W, N)`` uint32.

    With ``signed``, ``2 * that - sum_w popcount(a[m, w])``: the sum of ``a``'s
    bits times ``+-1`` (``b``'s bits: 1 for ``+1``), computed per block of
    rows while the block is in cache. The columns are padded to a multiple of
    8 (one AVX2 vector of int32) and the padding dropped at the end.
    """
    m, w = a.shape
    n = b.shape[1]
    n8 = -(-n // 8) * 8
    b = jnp.pad(b, ((0, 0), (0, n8 - n)))
    rows = min(block_rows or _block_rows(n8), m)
    blocks = -(-m // rows)
    a = jnp.pad(a, ((0, blocks * rows - m), (0, 0)))
    a = a.reshape(blocks, rows, w).transpose(0, 2, 1)  # word-major within each block

    def block(ab):
        def body(i, acc):
            return acc + lax.population_count(ab[i][:, None] & b[i][None, :]).astype(jnp.int32)

        acc = lax.fori_loop(0, w, body, jnp.zeros((rows, n8), jnp.int32), unroll=max(1, min(unroll, w)))
        if signed:
            acc = 2 * acc - jnp.sum(lax.population_count(ab).astype(jnp.int32), axis=0)[:, None]
        return acc[:, :n]

    out = block(a[0])[None] if blocks == 1 else lax.map(block, a)
    return out.reshape(blocks * rows, n)[:m]


def _signed_sum(patches: Array, words: Array) -> Array:
    """``k = sum x * (+-1)`` per row and output: ``2 popcount(x & b) - popcount(x)``."""
    return popcount_matmul(patches, words, signed=True)


def binary_conv(x: Array, words: Array, *, kernel_size: Sequence[int], strides: Sequence[int],
                padding: Any) -> Array:
    """The integer conv ``k`` (int32, NHWC) of ``x`` in ``{0, 1}`` with packed sign bits.

    Args:
      x: ``(B, H, W, C)``, values 0 or 1.
      words: :func:`kernel_words` of the ``(kh, kw, C, N)`` signs.
      kernel_size, strides: ``(kh, kw)``, ``(sh, sw)``.
      padding: ``'SAME'``, ``'VALID'`` or ``((top, bottom), (left, right))``, as ``lax.conv``.
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    b, h, w, _ = x.shape
    pads = lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), padding) if isinstance(padding, str) else padding
    xp = jnp.pad(pack_bits(x), ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))  # zero bits = zero inputs
    ho = (h + sum(pads[0]) - kh) // sh + 1
    wo = (w + sum(pads[1]) - kw) // sw + 1
    cols = [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1).reshape(b * ho * wo, -1)
    return _signed_sum(patches, words).reshape(b, ho, wo, -1)


def binary_dense(x: Array, words: Array) -> Array:
    """The integer product ``k`` (int32) of ``x`` ``(..., C)`` in ``{0, 1}`` with packed sign bits."""
    packed = pack_bits(x)
    k = _signed_sum(packed.reshape(-1, packed.shape[-1]), words)
    return k.reshape(*x.shape[:-1], -1)


# ---------------------------------------------------------------------------
# Packing a model
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class PackedModel:
    """A model's binary layers as bits, folded BatchNorms as thresholds, the rest as it is.

    Attributes:
      arrays: ``'{collection}/{module path}/{name}'`` -> array. Collections:
        ``params``/``batch_stats`` (float variables, as in the model),
        ``binary`` (``bits``: the kernel's sign bits, C order, packed by
        :func:`pack_bits_np`; ``scale``: float32, one per output channel or one),
        ``folded`` (``threshold`` int32 and ``sign`` int8 per feature: the
        activation fires iff ``sign * k >= threshold``).
      layers: per binary layer and folded BatchNorm, its description (JSON):
        kind, kernel shape, strides, padding; source layer of a fold.
    """

    arrays: dict[str, np.ndarray]
    layers: dict[str, dict[str, Any]]


def _check_binary_layer(call: walk.Call) -> None:
    n = walk.levels(call.x)
    if walk.weight_scales(call.kernel) is None:
        raise UserError(
            f"layer {call.path} reads binary activations but has float weights; only binarized weights "
            "pack into bits: train with the model option binarize_weights=True "
            "(--config.model.options.binarize_weights=True)")
    if n != 1:
        raise UserError(f"layer {call.path} reads {n + 1}-level activations; only binary (0/1) inputs pack: "
                        "decouple the coupled model first")
    if call.kernel.ndim not in (2, 4) or not hasattr(call.module, "kernel_quantizer"):
        raise UserError(f"layer {call.path} ({type(call.module).__name__}) is not a duo_jax QConv or QDense")


def _layer_spec(call: walk.Call) -> dict[str, Any]:
    spec = {"kind": "binary", "type": type(call.module).__name__, "kernel_shape": list(call.kernel.shape)}
    if call.kernel.ndim == 4:
        st = call.module.strides
        padding = call.module.padding
        spec.update(strides=[st, st] if isinstance(st, int) else list(st),
                    padding=padding if isinstance(padding, str) else [list(p) for p in padding])
    return spec


def _scales(kernel: np.ndarray) -> np.ndarray:
    s = walk.weight_scales(kernel)
    return s[:1].copy() if np.all(s == s[0]) else s


def _thresholds(folds: Sequence[tuple[walk.Call, np.ndarray, int]],
                activation: Callable[[Array], Array]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact ``(threshold, sign)`` per feature of each folded BatchNorm (see the module docstring).

    Args:
      folds: ``(BatchNorm call, its source layer's scales, the source's fan-in)``.
      activation: the binary activation after the BatchNorms.

    Returns:
      Per BatchNorm ``(threshold, sign)``, or None where the activation does
      not map +1 to 1 and -1 to 0 on every feature (what a folded BatchNorm
      returns to it in :func:`forward`).
    """
    scales = []
    for bn, scale, _ in folds:
        f = bn.y.shape[-1]
        scales.append(jnp.asarray(np.resize(np.broadcast_to(scale, (f,) if scale.size == 1 else scale.shape), f)))

    @jax.jit
    def evaluate(ks):
        """The float model's decision at integer k (as float32 k * s) per feature; and the
        activation of +1 and of -1 (a folded BatchNorm hands it one of these in forward())."""
        decisions = [activation(bn.module.apply(bn.variables, (k.astype(jnp.float32) * s)[None]))[0] > 0.5
                     for (bn, _, _), k, s in zip(folds, ks, scales)]
        return decisions, [(activation(jnp.ones((1, len(s)))), activation(-jnp.ones((1, len(s))))) for s in scales]

    def fires(ks):
        return [np.asarray(d) for d in evaluate(ks)[0]]

    fan = [np.full(bn.y.shape[-1], fan_in) for bn, _, fan_in in folds]
    lo, hi = [-f for f in fan], [f.copy() for f in fan]
    at_lo, signs = evaluate(lo)
    ok = [bool(np.all(np.asarray(p) == 1) and np.all(np.asarray(m) == 0)) for p, m in signs]
    at_lo, at_hi = [np.asarray(d) for d in at_lo], fires(hi)
    active = [a != b for a, b in zip(at_lo, at_hi)]
    while any(np.any(a & (h - l > 1)) for a, l, h in zip(active, lo, hi)):  # bisect where the decision changes
        mids = [(l + h) // 2 for l, h in zip(lo, hi)]
        for i, got in enumerate(fires(mids)):
            same = got == at_lo[i]
            lo[i] = np.where(active[i] & same, mids[i], lo[i])
            hi[i] = np.where(active[i] & ~same, mids[i], hi[i])
    out = []
    for a, b, l, h, f, good in zip(at_lo, at_hi, lo, hi, fan, ok):
        sign = np.where(a & ~b, -1, 1).astype(np.int8)
        threshold = np.where(~a & b, h, -l)  # rising: fires iff k >= h; falling: iff k <= l
        threshold = np.where(a & b, -f, np.where(~a & ~b, f + 1, threshold))  # always / never
        out.append((threshold.astype(np.int32), sign) if good else None)
    return out


def pack(model: nn.Module, variables: Any, sample: Array,
         activation: Callable[[Array], Array] | None = None) -> PackedModel:
    """Packs every binary layer of ``model`` and folds the BatchNorms that can fold.

    Args:
      model: a Linen model built from duo_jax layers, run as
        ``model.apply(variables, x, train=False)``.
      variables: its variables.
      sample: a few inputs like the model's data (say 8 images): the model
        runs on them once to find its binary layers and foldable BatchNorms
        (:func:`duo_jax.walk.trace`), which needs activations that are
        not all 0 or all 1.
      activation: the binary activation after its BatchNorms; None: the one of
        ``model.mode``.

    Returns:
      The packed model.

    Raises:
      UserError: a layer reads binary activations with float weights (train
        with ``binarize_weights=True``), or reads ternary ones, or the model has
        no binary layer.
    """
    activation = activation or walk.default_activation(model)
    variables = jax.device_get(variables)
    calls = walk.trace(model, variables, jnp.asarray(sample), activation, train=False)
    binary = [c for c in calls if c.kernel is not None and walk.levels(c.x) is not None]
    if not binary:
        raise UserError("the model has no layer that reads binary activations: nothing to pack")
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, dict[str, Any]] = {}
    by_path = {}
    for call in binary:
        _check_binary_layer(call)
        arrays[f"binary/{call.path}/bits"] = pack_bits_np(call.kernel >= 0)
        arrays[f"binary/{call.path}/scale"] = _scales(call.kernel)
        layers[call.path] = _layer_spec(call)
        by_path[call.path] = call
    folds = {bn: src for bn, src in walk.folded_norms(calls).items() if src in by_path}
    todo = [(bn, by_path[folds[bn.path]]) for bn in calls if bn.path in folds]
    found = _thresholds([(bn, arrays[f"binary/{src.path}/scale"], int(np.prod(src.kernel.shape[:-1])))
                         for bn, src in todo], activation) if todo else []
    for (bn, src), fold in zip(todo, found):
        if fold is None:
            continue
        arrays[f"folded/{bn.path}/threshold"], arrays[f"folded/{bn.path}/sign"] = fold
        layers[bn.path] = {"kind": "folded", "source": src.path, "source_channels": int(src.kernel.shape[-1]),
                           "features": int(bn.y.shape[-1])}
    skip = {("params", p, "kernel") for p in by_path} | {(c, p) for p in layers if layers[p]["kind"] == "folded"
                                                          for c in ("params", "batch_stats")}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        collection, module, name = keys[0], "/".join(keys[1:-1]), keys[-1]
        if (collection, module, name) in skip or (collection, module) in skip:
            continue
        arrays[f"{collection}/{module}/{name}"] = np.asarray(leaf)
    return PackedModel(arrays, layers)


# ---------------------------------------------------------------------------
# The packed forward
# ---------------------------------------------------------------------------


def _compute_arrays(packed: PackedModel) -> dict[str, Any]:
    """Float variables (nested, for ``model.apply``) and per-layer GEMM operands."""
    variables: dict[str, Any] = {}
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, value in packed.arrays.items():
        collection, rest = key.split("/", 1)
        module, name = rest.rsplit("/", 1)
        if collection in ("binary", "folded"):
            layers.setdefault(module, {})[name] = value
            continue
        node = variables.setdefault(collection, {})
        for part in module.split("/"):
            node = node.setdefault(part, {})
        node[name] = value
    for path, spec in packed.layers.items():
        if spec["kind"] == "binary":
            shape = spec["kernel_shape"]
            bits = unpack_bits_np(layers[path].pop("bits"), int(np.prod(shape))).reshape(shape)
            layers[path]["words"] = kernel_words(bits)
    return {"variables": variables, "layers": layers}


def _folded_norm(y: Array, lay: dict, spec: dict, source_scale: Array) -> Array:
    """+1 where the folded BatchNorm's activation fires, else -1.

    ``y`` holds ``fl(k * s)`` of the source layer (after max pooling, copies);
    ``k`` is recovered exactly (``|k| < 2**21``) and compared with the threshold.
    """
    s = jnp.tile(jnp.broadcast_to(source_scale, (spec["source_channels"],)),
                 spec["features"] // spec["source_channels"])
    k = jnp.where(s > 0, jnp.round(y / jnp.where(s > 0, s, 1.0)), 0.0).astype(jnp.int32)
    fire = lay["sign"].astype(jnp.int32) * k >= lay["threshold"]
    return jnp.where(fire, 1.0, -1.0).astype(y.dtype)


def _binary_layer(x: Array, lay: dict, spec: dict, bias: Array | None) -> Array:
    """``fl(k * s)`` (+ bias) of a binary conv or dense layer, on packed bits."""
    if len(spec["kernel_shape"]) == 4:
        padding = spec["padding"]
        k = binary_conv(x, lay["words"], kernel_size=spec["kernel_shape"][:2], strides=spec["strides"],
                        padding=padding if isinstance(padding, str) else tuple(map(tuple, padding)))
    else:
        k = binary_dense(x, lay["words"])
    y = k.astype(jnp.float32) * lay["scale"]
    return y if bias is None else y + bias


def forward(model: nn.Module, packed: PackedModel) -> Callable[[Array], Array]:
    """A jitted ``x -> logits`` computing ``model``'s binary layers on packed bits.

    The model's own definition runs (``train=False``); every binary layer of
    ``packed`` is computed by :func:`binary_conv` / :func:`binary_dense` and
    returns ``fl(k * s)`` (plus its bias, if any); every folded BatchNorm
    recovers ``k`` from its input, compares it with its integer threshold and
    returns +1 or -1, which the model's binary activation turns into 1 or 0.
    """
    compute = _compute_arrays(packed)
    specs = packed.layers

    def run(arrays, x):
        layers = arrays["layers"]

        def interceptor(next_fun, args, kwargs, context):
            path = "/".join(context.module.path)
            spec = specs.get(path) if context.method_name == "__call__" else None
            if spec is None:
                return next_fun(*args, **kwargs)
            if spec["kind"] == "folded":
                return _folded_norm(args[0], layers[path], spec, layers[spec["source"]]["scale"])
            params = arrays["variables"].get("params", {})
            for part in context.module.path:
                params = params.get(part, {})
            return _binary_layer(args[0], layers[path], spec, params.get("bias"))

        with nn.intercept_methods(interceptor):
            return model.apply(arrays["variables"], x, train=False)

    compiled = jax.jit(run)
    device_arrays = jax.device_put(compute)
    return lambda x: compiled(device_arrays, x)
