"""Pure-functional quantizers with straight-through estimators (STEs).

Every quantizer is a plain function of a JAX array: no Flax, no state. Each is
a ``jax.custom_vjp``, so it composes with ``jit``, ``vmap`` and ``grad`` and can
be dropped into any Linen or NNX model.

Activation quantizers map the real line onto ``n + 1`` levels of ``[0, 1]``
(BinaryDuo, Kim et al., ICLR 2020, section 3)::

    q_n(x) = floor(n * clip(x, 0, 1) + 1/2) / n        (round half up)

so the binary activation (n = 1) fires at ``x >= 0.5`` and the ternary one
(n = 2) takes ``{0, 1/2, 1}`` with thresholds ``0.25`` and ``0.75``. The forward
pass is computed with comparisons against the exact thresholds
``(k - 1/2) / n`` rather than with ``floor``: it is the same function on the
reals, and it keeps the thresholds exact in float32 and bfloat16 (``2x + 1/2``
can round across a threshold).

Activation quantizers take a static ``offset`` and compute ``q(x + offset)``
without rounding ``x + offset`` (the threshold moves instead). The decoupled
binary activation of BinaryDuo uses ``offset = -0.25`` and ``+0.25``:
``ternary(x) == (binary(x, offset=-0.25) + binary(x, offset=0.25)) / 2``
holds exactly for every float ``x``.

Binary activations come with several backward surrogates (the STE derivative
``dq/dx`` used in place of the true derivative, zero almost everywhere). With
``u = 2 (x + offset) - 1`` (the clip window ``[0, 1]`` mapped to ``[-1, 1]``)
each surrogate integrates to 1, the height of the step:

===================  ==========================================================
name                 backward ``dq/dx``
===================  ==========================================================
``binary``           ``1`` on ``0 < x < 1`` else ``0`` (clipped STE, default)
``binary_identity``  ``1`` everywhere (plain STE)
``binary_approx_sign``  ``2 - 2|u|`` on ``|u| < 1`` (ApproxSign, Bi-Real Net)
``binary_swish_sign``   ``beta (2 - beta u tanh(beta u / 2)) / (1 + cosh(beta u))``
                     (SwishSign, BNN+, Darabi et al. 2018)
``binary_tanh``      ``beta (1 - tanh(beta u)^2)`` (tanh/EDE-style surrogate,
                     as in DSQ and IR-Net)
===================  ==========================================================

``quant.get(name, **kwargs)`` returns any of them by name.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Quantizer = Callable[[Array], Array]

__all__ = [
    "levels",
    "binary",
    "ternary",
    "uniform",
    "binary_identity",
    "binary_approx_sign",
    "binary_swish_sign",
    "binary_tanh",
    "ste_sign",
    "binarize_weight",
    "get",
    "names",
    "register",
]


# ---------------------------------------------------------------------------
# n-level activation quantizer (the forward pass shared by all of them)
# ---------------------------------------------------------------------------


def _compute_dtype(x: Array):
    """float32 (or float64) for comparisons: every bfloat16/float16 is exact in it."""
    return x.dtype if x.dtype in (jnp.float32, jnp.float64) else jnp.float32


def _round_up(a: float, dtype) -> tuple[np.ndarray, bool]:
    """The smallest ``dtype`` value ``>= a`` and whether it equals ``a``.

    For a representable ``x``: ``x >= a`` iff ``x >= up`` and, when ``a`` is not
    representable, ``x > a`` iff ``x >= up`` and ``x < a`` iff ``x < up``; so
    thresholds like ``1/6`` (n = 3) are compared exactly on the reals.
    """
    up = np.asarray(a, dtype)
    if float(up) < a:
        up = np.nextafter(up, np.asarray(np.inf, dtype))
    return up, float(up) == a


def _levels_forward(x: Array, n: int, offset: float) -> Array:
    """``q_n(x + offset)`` by exact threshold comparisons."""
    cd = _compute_dtype(x)
    xc = x.astype(cd)
    count = jnp.zeros(x.shape, cd)
    for k in range(1, n + 1):
        t, _ = _round_up((k - 0.5) / n - offset, cd)
        count = count + (xc >= t).astype(cd)
    return (count / n if n > 1 else count).astype(x.dtype)


def _window(x: Array, offset: float) -> Array:
    """The clip window ``0 < x + offset < 1`` as a boolean mask, exact on the reals."""
    cd = _compute_dtype(x)
    xc = x.astype(cd)
    lo, lo_exact = _round_up(-offset, cd)
    hi, _ = _round_up(1.0 - offset, cd)
    return ((xc > lo) if lo_exact else (xc >= lo)) & (xc < hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _levels(x: Array, n: int, offset: float) -> Array:
    return _levels_forward(x, n, offset)


def _levels_fwd(x, n, offset):
    return _levels_forward(x, n, offset), x


def _levels_bwd(n, offset, x, g):
    return (jnp.where(_window(x, offset), g, jnp.zeros_like(g)),)


_levels.defvjp(_levels_fwd, _levels_bwd)


def _check_levels(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of steps n must be a positive integer, got {n!r}")
    return n


def levels(x: Array, n: int, offset: float = 0.0) -> Array:
    """Quantizes to ``n + 1`` uniform levels in ``[0, 1]`` with a clipped STE.

    Forward: ``q(x) = floor(n * clip(x + offset, 0, 1) + 1/2) / n``.
    Backward: ``dq/dx = 1`` if ``0 < x + offset < 1`` else ``0``.

    Args:
      x: input array (any float dtype).
      n: number of steps (``n = 1`` binary, ``n = 2`` ternary, ``n = 2**b - 1``
        for a b-bit activation).
      offset: static shift added to ``x`` before quantizing (exact thresholds).

    Returns:
      Array of the same shape and dtype as ``x``.
    """
    return _levels(x, _check_levels(n), float(offset))


def binary(x: Array, offset: float = 0.0) -> Array:
    """Binary activation in ``{0, 1}`` with the clipped STE.

    Forward: ``b(x) = 1`` if ``clip(x + offset, 0, 1) >= 1/2`` else ``0``.
    Backward: ``db/dx = 1`` if ``0 < x + offset < 1`` else ``0``.
    """
    return _levels(x, 1, float(offset))


def ternary(x: Array, offset: float = 0.0) -> Array:
    """Ternary activation in ``{0, 1/2, 1}`` with the clipped STE.

    Forward: ``t(x) = floor(2 clip(x + offset, 0, 1) + 1/2) / 2`` (thresholds
    0.25 and 0.75, inclusive). Backward: ``1`` on ``0 < x + offset < 1``.
    Exactly ``t(x) = (b(x - 1/4) + b(x + 1/4)) / 2``.
    """
    return _levels(x, 2, float(offset))


def uniform(x: Array, bits: int = 2, offset: float = 0.0) -> Array:
    """DoReFa-style ``bits``-bit activation: ``levels`` with ``n = 2**bits - 1``.

    Forward: ``floor((2**bits - 1) clip(x + offset, 0, 1) + 1/2) / (2**bits - 1)``.
    Backward: clipped STE, ``1`` on ``0 < x + offset < 1``.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return _levels(x, 2**bits - 1, float(offset))


# ---------------------------------------------------------------------------
# Binary activations with other backward surrogates
# ---------------------------------------------------------------------------


def _u(x: Array, offset: float) -> Array:
    """Maps the clip window of ``x + offset`` onto ``[-1, 1]``."""
    return 2.0 * (x + jnp.asarray(offset, x.dtype)) - 1.0


def _surrogate_binary(grad_fn: Callable[..., Array]) -> Callable[..., Array]:
    """A binary activation whose backward pass is ``g * grad_fn(x, offset, *p)``."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
    def f(x, offset, params):
        return _levels_forward(x, 1, offset)

    def fwd(x, offset, params):
        return _levels_forward(x, 1, offset), x

    def bwd(offset, params, x, g):
        # The surrogate is evaluated in float32 for accuracy, then cast back.
        d = grad_fn(x.astype(jnp.float32), offset, *params)
        return ((g.astype(jnp.float32) * d).astype(g.dtype),)

    f.defvjp(fwd, bwd)
    return f


def _identity_grad(x, offset):
    return jnp.ones_like(x)


def _approx_sign_grad(x, offset):
    u = _u(x, offset)
    return jnp.where(jnp.abs(u) < 1.0, 2.0 - 2.0 * jnp.abs(u), 0.0)


def _swish_sign_grad(x, offset, beta):
    u = _u(x, offset)
    return beta * (2.0 - beta * u * jnp.tanh(beta * u / 2.0)) / (1.0 + jnp.cosh(beta * u))


def _tanh_grad(x, offset, beta):
    u = _u(x, offset)
    return beta * (1.0 - jnp.tanh(beta * u) ** 2)


_binary_identity = _surrogate_binary(_identity_grad)
_binary_approx_sign = _surrogate_binary(_approx_sign_grad)
_binary_swish_sign = _surrogate_binary(_swish_sign_grad)
_binary_tanh = _surrogate_binary(_tanh_grad)


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return beta


def binary_identity(x: Array, offset: float = 0.0) -> Array:
    """Binary activation (as :func:`binary`) with the plain identity STE.

    Backward: ``db/dx = 1`` everywhere (no clipping).
    """
    return _binary_identity(x, float(offset), ())


def binary_approx_sign(x: Array, offset: float = 0.0) -> Array:
    """Binary activation with the ApproxSign surrogate of Bi-Real Net (Liu et al. 2018).

    Backward, with ``u = 2 (x + offset) - 1``: ``db/dx = 2 - 2|u|`` for
    ``|u| < 1`` and ``0`` outside (the derivative of a piecewise-quadratic
    approximation of the step).
    """
    return _binary_approx_sign(x, float(offset), ())


def binary_swish_sign(x: Array, offset: float = 0.0, beta: float = 5.0) -> Array:
    """Binary activation with the SwishSign surrogate of BNN+ (Darabi et al. 2018).

    Backward, with ``u = 2 (x + offset) - 1``:
    ``db/dx = beta (2 - beta u tanh(beta u / 2)) / (1 + cosh(beta u))``,
    the derivative of ``SS(u) = 2 sigmoid(beta u) (1 + beta u (1 - sigmoid(beta u))) - 1``
    rescaled from ``[-1, 1]`` to ``[0, 1]``.
    """
    return _binary_swish_sign(x, float(offset), (_check_beta(beta),))


def binary_tanh(x: Array, offset: float = 0.0, beta: float = 2.0) -> Array:
    """Binary activation with a tanh surrogate (DSQ, Gong et al. 2019; IR-Net's EDE).

    Backward, with ``u = 2 (x + offset) - 1``: ``db/dx = beta (1 - tanh(beta u)^2)``,
    the derivative of ``(tanh(beta u) + 1) / 2``.
    """
    return _binary_tanh(x, float(offset), (_check_beta(beta),))


# ---------------------------------------------------------------------------
# Sign and weight binarization
# ---------------------------------------------------------------------------


def _sign(x: Array) -> Array:
    """``+1`` where ``x >= 0`` else ``-1`` (``jnp.sign(0)`` is 0: not used)."""
    return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


@jax.custom_vjp
def ste_sign(x: Array) -> Array:
    """Sign with ``sign(0) = +1`` and the hard-tanh STE (Courbariaux et al. 2016).

    Forward: ``s(x) = +1`` if ``x >= 0`` else ``-1``.
    Backward: ``ds/dx = 1`` if ``|x| <= 1`` else ``0``.
    """
    return _sign(x)


def _ste_sign_fwd(x):
    return _sign(x), x


def _ste_sign_bwd(x, g):
    return (jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def _binarize_forward(w: Array, per_channel: bool) -> Array:
    if per_channel:
        axes = tuple(range(w.ndim - 1))
        scale = jnp.mean(jnp.abs(w), axis=axes, keepdims=True)
    else:
        scale = jnp.mean(jnp.abs(w))
    return _sign(w) * scale.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _binarize(w, per_channel):
    return _binarize_forward(w, per_channel)


def _binarize_fwd(w, per_channel):
    return _binarize_forward(w, per_channel), None


def _binarize_bwd(per_channel, _, g):
    return (g,)


_binarize.defvjp(_binarize_fwd, _binarize_bwd)


def binarize_weight(w: Array, per_channel: bool = False) -> Array:
    """XNOR-Net style weight binarization with a straight-through gradient.

    Forward: ``wq = sign(w) * mean(|w|)`` with ``sign(0) = +1``; the mean is over
    the whole tensor (one scale per layer), or over every axis but the last
    (the output features of a Linen kernel) when ``per_channel``.
    Backward: ``dL/dw = dL/dwq`` (identity to the latent float weight).

    Splitting a kernel ``W`` into ``[W/2, W/2]`` along any axis halves both the
    signs' scale and the result exactly, which is what decoupling relies on.
    """
    return _binarize(w, bool(per_channel))


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Array]] = {
    "binary": binary,
    "binary_identity": binary_identity,
    "binary_approx_sign": binary_approx_sign,
    "binary_swish_sign": binary_swish_sign,
    "binary_tanh": binary_tanh,
    "ternary": ternary,
    "levels": levels,
    "uniform": uniform,
    "ste_sign": ste_sign,
    "binarize_weight": binarize_weight,
}

# Short aliases for the binary-activation surrogates (``surrogate='approx_sign'``).
SURROGATES = {
    "clipped": "binary",
    "identity": "binary_identity",
    "approx_sign": "binary_approx_sign",
    "swish_sign": "binary_swish_sign",
    "tanh": "binary_tanh",
}


def names() -> list[str]:
    """The names :func:`get` accepts, sorted."""
    return sorted(set(_REGISTRY) | set(SURROGATES))


def register(name: str, fn: Callable[..., Array]) -> None:
    """Adds a quantizer under ``name``; an existing name is an error."""
    if name in _REGISTRY or name in SURROGATES:
        raise ValueError(f"quantizer {name!r} is already registered")
    _REGISTRY[name] = fn


def get(name: str, **kwargs) -> Quantizer:
    """Returns the quantizer ``name`` with ``kwargs`` bound (e.g. ``beta=5.0``).

    Surrogate aliases (``'clipped'``, ``'approx_sign'``, ...) name the binary
    activation with that backward pass.

    Raises:
      ValueError: for an unknown name, listing the known ones, or for keyword
        arguments the quantizer does not take.
    """
    key = SURROGATES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown quantizer {name!r}; known: {', '.join(names())}")
    fn = _REGISTRY[key]
    if not kwargs:
        return fn
    import inspect

    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"quantizer {name!r} takes no argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(p for p in params if p not in ('x', 'w'))}"
        )
    return functools.partial(fn, **kwargs)
