"""Quantizers: pure functions of arrays with straight-through-estimator (STE) gradients.

Every quantizer is a plain function ``q(x, **params) -> array`` whose backward pass is written with
``jax.custom_vjp`` (or composed from such pieces), so it works under ``jit``, ``grad`` and ``vmap`` and
keeps the input dtype (float32, bfloat16, float16). Binary quantizers map 0 to +1, never to 0 (and,
as XLA flushes subnormals to zero on CPU, a negative subnormal to +1 as well).

Names and keyword parameters follow Larq (``larq.quantizers``) so code ports by name. ``get`` resolves a
name, ``None`` or a callable to a :class:`Quantizer`, the thin hashable wrapper that layers store.
This module knows nothing about Flax.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from bnnjax import packing

__all__ = [
    "ste_sign", "approx_sign", "swish_sign", "ste_heaviside", "ste_tern", "magnitude_aware_sign",
    "dorefa", "stochastic_sign", "xnor_weight_scale", "magnitude_aware_sign_unclipped", "Quantizer", "get", "names",
    "SteSign", "ApproxSign", "SwishSign", "SteHeaviside", "SteTern", "MagnitudeAwareSign",
    "DoReFa", "StochasticSign", "XnorWeightScale",
]


def _sign(x):
    """sign with sign(0) = +1, in x's dtype."""
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def _check_clip(clip_value):
    if clip_value is not None and not clip_value > 0:
        raise ValueError(f"clip_value must be a positive number or None (no clipping), got {clip_value!r}.")


def _clip_mask(g, x, clip_value):
    if clip_value is None:
        return g
    return jnp.where(jnp.abs(x) <= clip_value, g, jnp.zeros_like(g))


def _mask_residual(x, clip_value):
    """What a clipped STE's backward needs of ``x``: ``|x| <= clip_value``, 1 bit per element (packed
    along the last axis into uint32 words, :func:`bnnjax.packing.pack_bits`' layout), named
    ``"bnnjax_bits"`` for ``jax.checkpoint`` policies. None without clipping."""
    if clip_value is None:
        return None
    inside = jnp.abs(x) <= clip_value
    bits = packing.pack_bits(inside) if x.ndim else inside  # True packs as a set bit
    return checkpoint_name(bits, "bnnjax_bits")


def _apply_mask(g, mask, clip_value):
    if clip_value is None:
        return g
    inside = packing.unpack_bits(mask, g.shape[-1], g.dtype) < 0 if g.ndim else mask
    return jnp.where(inside, g, jnp.zeros_like(g))


def _as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantizers take floating-point arrays, got dtype {x.dtype}; cast with .astype(jnp.float32).")
    return x


# --- ste_sign -------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_sign(x, clip_value):
    return _sign(x)


def _ste_sign_fwd(x, clip_value):
    return _sign(x), _mask_residual(x, clip_value)


def _ste_sign_bwd(clip_value, mask, g):
    return (_apply_mask(g, mask, clip_value),)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def ste_sign(x, clip_value: float | None = 1.0):
    """Binarize with the sign function and a clipped straight-through gradient.

    Forward ``q(x) = +1 if x >= 0 else -1``; backward ``dq/dx = 1 if |x| <= clip_value else 0``
    (identity when ``clip_value`` is None).

    Args:
      x: floating-point array.
      clip_value: threshold of the STE; ``None`` passes every gradient through.

    Returns:
      Array of ±1 in ``x``'s dtype.

    Raises:
      ValueError: ``clip_value`` is not positive.

    Reference: Courbariaux et al., "Binarized Neural Networks", 2016 (arXiv:1602.02830).
    """
    _check_clip(clip_value)
    return _ste_sign(_as_float(x), clip_value)


# --- approx_sign ----------------------------------------------------------------------------------

@jax.custom_vjp
def approx_sign(x):
    """Binarize with sign; the gradient is the derivative of a piecewise-quadratic sign approximation.

    Forward ``q(x) = sign(x)`` (sign(0) = +1); backward ``dq/dx = 2 - 2|x|`` for ``|x| <= 1``, else 0.

    Args:
      x: floating-point array.

    Returns:
      Array of ±1 in ``x``'s dtype.

    Reference: Liu et al., "Bi-Real Net", ECCV 2018 (arXiv:1808.00278).
    """
    return _sign(x)


def _approx_sign_fwd(x):
    return _sign(x), x


def _approx_sign_bwd(x, g):
    ax = jnp.abs(x)
    return (jnp.where(ax <= 1, (2 - 2 * ax).astype(g.dtype) * g, jnp.zeros_like(g)),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


# --- swish_sign -----------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _swish_sign(x, beta):
    return _sign(x)


def _swish_sign_fwd(x, beta):
    return _sign(x), x


def _swish_sign_bwd(beta, x, g):
    # float32 keeps cosh from overflowing in half precision before the division sends it to 0
    bx = beta * x.astype(jnp.float32)
    d = beta * (2 - bx * jnp.tanh(bx / 2)) / (1 + jnp.cosh(bx))
    return ((d * g.astype(jnp.float32)).astype(g.dtype),)


_swish_sign.defvjp(_swish_sign_fwd, _swish_sign_bwd)


def swish_sign(x, beta: float = 5.0):
    """Binarize with sign; the gradient is that of the SignSwish function.

    Forward ``q(x) = sign(x)``; backward
    ``dq/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``.

    Args:
      x: floating-point array.
      beta: steepness of the SignSwish surrogate (> 0).

    Returns:
      Array of ±1 in ``x``'s dtype.

    Raises:
      ValueError: ``beta`` is not positive.

    Reference: Darabi et al., "BNN+: Improved Binary Network Training", 2018 (arXiv:1812.11800).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}.")
    return _swish_sign(_as_float(x), float(beta))


# --- ste_heaviside --------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_heaviside(x, clip_value):
    return jnp.where(x > 0, 1, 0).astype(x.dtype)


def _ste_heaviside_fwd(x, clip_value):
    return _ste_heaviside(x, clip_value), _mask_residual(x, clip_value)


_ste_heaviside.defvjp(_ste_heaviside_fwd, _ste_sign_bwd)


def ste_heaviside(x, clip_value: float | None = 1.0):
    """Binarize to {0, 1} with the Heaviside step and a clipped straight-through gradient.

    Forward ``q(x) = 1 if x > 0 else 0``; backward ``dq/dx = 1 if |x| <= clip_value else 0``.

    Args:
      x: floating-point array.
      clip_value: threshold of the STE; ``None`` passes every gradient through.

    Returns:
      Array of {0, 1} in ``x``'s dtype.

    Reference: Larq's ``SteHeaviside`` (Geiger & Team, JOSS 2020).
    """
    _check_clip(clip_value)
    return _ste_heaviside(_as_float(x), clip_value)


# --- ste_tern -------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste_tern(x, threshold, clip_value):
    return jnp.where(jnp.abs(x) > threshold, _sign(x), jnp.zeros_like(x))


def _ste_tern_fwd(x, threshold, clip_value):
    return _ste_tern(x, threshold, clip_value), (x, threshold)


def _ste_tern_bwd(clip_value, res, g):
    x, threshold = res
    return _clip_mask(g, x, clip_value), jnp.zeros_like(threshold)


_ste_tern.defvjp(_ste_tern_fwd, _ste_tern_bwd)


def ste_tern(x, threshold_value: float = 0.05, ternary_weight_networks: bool = False,
             clip_value: float | None = 1.0):
    """Ternarize to {-1, 0, +1} with a clipped straight-through gradient.

    Forward ``q(x) = sign(x) if |x| > t else 0`` with ``t = threshold_value``, or with
    ``ternary_weight_networks=True`` the TWN threshold ``t = 0.7 * mean(|x|)``; backward
    ``dq/dx = 1 if |x| <= clip_value else 0``.

    Args:
      x: floating-point array.
      threshold_value: fixed threshold ``t`` (ignored in TWN mode).
      ternary_weight_networks: use the data-dependent TWN threshold.
      clip_value: threshold of the STE; ``None`` passes every gradient through.

    Returns:
      Array of {-1, 0, +1} in ``x``'s dtype.

    Reference: Li & Liu, "Ternary Weight Networks", 2016 (arXiv:1605.04711).
    """
    _check_clip(clip_value)
    x = _as_float(x)
    if ternary_weight_networks:
        threshold = jax.lax.stop_gradient(0.7 * jnp.mean(jnp.abs(x)))
    else:
        if not threshold_value >= 0:
            raise ValueError(f"threshold_value must be >= 0, got {threshold_value!r}.")
        threshold = jnp.asarray(threshold_value, x.dtype)
    return _ste_tern(x, threshold.astype(x.dtype), clip_value)


# --- magnitude_aware_sign / xnor_weight_scale -----------------------------------------------------

def _channel_mean_abs(x):
    return jnp.mean(jnp.abs(x), axis=tuple(range(x.ndim - 1)), keepdims=True)


def magnitude_aware_sign(x, clip_value: float | None = 1.0):
    """Sign scaled by the per-channel mean magnitude, which is treated as a constant.

    Forward ``q(x) = a * sign(x)``, ``a = mean(|x|)`` over every axis but the last; backward
    ``dq/dx = a * 1(|x| <= clip_value)`` (``a`` is behind ``stop_gradient``).

    Args:
      x: floating-point array (a kernel: output channels on the last axis).
      clip_value: threshold of the STE.

    Returns:
      ``a * sign(x)`` in ``x``'s dtype.

    Reference: Liu et al., "Bi-Real Net", ECCV 2018 (arXiv:1808.00278).
    """
    x = _as_float(x)
    return jax.lax.stop_gradient(_channel_mean_abs(x)) * ste_sign(x, clip_value)


def _tf_abs(x):
    # TensorFlow's |x| has gradient sign(x), 0 at x = 0 (JAX's gives +1 there): match Larq's gradients.
    return x * jax.lax.stop_gradient(jnp.sign(x))


def _clip_pass_through(x, clip_value):
    """``clip(x, -c, c)`` whose gradient is 1 on ``[-c, c]`` (ends included, as ``tf.clip_by_value``), else 0."""
    inside = jnp.abs(x) <= clip_value
    return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, -clip_value, clip_value)))


def xnor_weight_scale(w, clip_value: float | None = 1.0):
    """XNOR-Net weight binarization (larq-zoo's ``xnor_weight_scale``): ``mean|w_c| * sign(w_c)``, w clipped.

    Forward ``q(w) = a * sign(w_c)`` with ``w_c = clip(w, -clip_value, clip_value)`` and ``a = mean(|w_c|)``
    over every axis but the last. Unlike ``magnitude_aware_sign`` the gradient also flows through ``a``:
    ``dL/dw_j = 1(|w_j| <= clip) (g_j a + sign(w_j)/n * sum_i g_i sign(w_i))`` over the channel of ``n``
    entries (TensorFlow's ``sign(0) = 0`` in the scale term). ``clip_value=None`` clips nothing.

    Args:
      w: floating-point kernel, output channels on the last axis.
      clip_value: the clipping range of ``w`` and the STE threshold of the sign (larq-zoo: 1).

    Returns:
      The scaled binary kernel in ``w``'s dtype.

    Reference: Rastegari et al., "XNOR-Net", ECCV 2016 (arXiv:1603.05279); larq-zoo's XNORNet.
    """
    _check_clip(clip_value)
    w = _as_float(w)
    if clip_value is not None:
        w = _clip_pass_through(w, clip_value)
    a = jnp.mean(_tf_abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)
    return a * ste_sign(w, clip_value)


@jax.custom_vjp
def _scaled_sign_identity_grad(x, a):
    return a * _sign(x)


# The STE passes g itself, unscaled by a: Larq's custom gradient wraps the product a * sign(x).
_scaled_sign_identity_grad.defvjp(lambda x, a: (a * _sign(x), None), lambda _, g: (g, None))


def magnitude_aware_sign_unclipped(x):
    """DoReFa-Net's weight binarization (larq-zoo's ``magnitude_aware_sign_unclipped``).

    Forward ``q(x) = a * sign(x)`` with one scale for the whole tensor, ``a = mean(|x|)``; backward
    ``dq/dx = 1``: an unclipped straight-through gradient, not scaled by ``a``, with ``a`` a constant.

    Args:
      x: floating-point array (a kernel).

    Returns:
      ``a * sign(x)`` in ``x``'s dtype.

    Reference: Zhou et al., "DoReFa-Net", 2016 (arXiv:1606.06160); larq-zoo's DoReFaNet.
    """
    x = _as_float(x)
    return _scaled_sign_identity_grad(x, jax.lax.stop_gradient(jnp.mean(jnp.abs(x))))


# --- dorefa ---------------------------------------------------------------------------------------

@jax.custom_vjp
def _round_ste(x):
    return jnp.round(x)


_round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dorefa_act(x, levels):
    return jnp.round(jnp.clip(x, 0, 1) * levels) / levels


def _dorefa_act_fwd(x, levels):
    return _dorefa_act(x, levels), x


def _dorefa_act_bwd(levels, x, g):
    return (jnp.where((x >= 0) & (x <= 1), g, jnp.zeros_like(g)),)


_dorefa_act.defvjp(_dorefa_act_fwd, _dorefa_act_bwd)


def dorefa(x, k_bit: int = 2, mode: str = "activations"):
    """DoReFa-Net k-bit quantizer for activations or weights.

    ``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` with an identity gradient for ``round``.
    ``mode="activations"``: forward ``quantize_k(clip(x, 0, 1))``, backward ``1(0 <= x <= 1)``.
    ``mode="weights"``: forward ``2 quantize_k(tanh(x) / (2 M) + 1/2) - 1`` with ``M = max|tanh(x)|``
    (``M = 0``, an all-zero ``x``, gives ``2 quantize_k(1/2) - 1``); backward, as Larq, the derivative of
    that expression with ``round`` replaced by the identity and ``M`` held constant:
    ``(1 - tanh(x)^2) / M`` (0 when ``M = 0``).

    Args:
      x: floating-point array.
      k_bit: number of bits (>= 1).
      mode: ``"activations"`` or ``"weights"``.

    Returns:
      The quantized array in ``x``'s dtype: values in [0, 1] (activations) or [-1, 1] (weights).

    Raises:
      ValueError: unknown ``mode`` or ``k_bit < 1``.

    Reference: Zhou et al., "DoReFa-Net", 2016 (arXiv:1606.06160).
    """
    if not (isinstance(k_bit, int) and k_bit >= 1):
        raise ValueError(f"k_bit must be an integer >= 1, got {k_bit!r}.")
    levels = float(2 ** k_bit - 1)
    x = _as_float(x)
    if mode == "activations":
        return _dorefa_act(x, levels)
    if mode == "weights":
        t = jnp.tanh(x)
        # Larq holds the normalizer constant (stop_gradient), so no gradient flows through the max, and
        # divides with divide_no_nan: an all-zero kernel maps to quantize_k(1/2), not NaN.
        m = jax.lax.stop_gradient(jnp.max(jnp.abs(t)))
        nonzero = m > 0
        t = jnp.where(nonzero, t / (2 * jnp.where(nonzero, m, 1)), 0) + 0.5
        return 2 * _round_ste(t * levels) / levels - 1
    raise ValueError(f"dorefa mode must be 'activations' or 'weights', got {mode!r}.")


# --- stochastic_sign ------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste_replace(x, value, clip_value):
    return value


def _ste_replace_fwd(x, value, clip_value):
    return value, x


def _ste_replace_bwd(clip_value, x, g):
    return _clip_mask(g, x, clip_value), jnp.zeros_like(g)


_ste_replace.defvjp(_ste_replace_fwd, _ste_replace_bwd)


def stochastic_sign(x, key, clip_value: float | None = 1.0):
    """BinaryConnect stochastic binarization with a clipped straight-through gradient.

    Forward ``q(x) = +1`` with probability ``p = hard_sigmoid(x) = clip((x + 1) / 2, 0, 1)``, else -1;
    backward ``dq/dx = 1 if |x| <= clip_value else 0``.

    Args:
      x: floating-point array.
      key: a ``jax.random`` key; the same key gives the same draw.
      clip_value: threshold of the STE.

    Returns:
      Array of ±1 in ``x``'s dtype.

    Reference: Courbariaux et al., "BinaryConnect", NeurIPS 2015 (arXiv:1511.00363).
    """
    _check_clip(clip_value)
    x = _as_float(x)
    p = jnp.clip((x.astype(jnp.float32) + 1) / 2, 0, 1)
    u = jax.random.uniform(key, x.shape, jnp.float32)
    value = jnp.where(u < p, 1, -1).astype(x.dtype)
    return _ste_replace(x, value, clip_value)


# --- registry -------------------------------------------------------------------------------------

def _fixed(bits):
    return lambda kw: bits


# name -> (function, precision from kwargs, needs a PRNG key, outputs: "signs" (exactly ±1),
# "scaled_signs" (a non-negative scale per last-axis channel times ±1) or None)
_REGISTRY: dict[str, tuple[Callable, Callable[[dict], int], bool, str | None]] = {
    "ste_sign": (ste_sign, _fixed(1), False, "signs"),
    "approx_sign": (approx_sign, _fixed(1), False, "signs"),
    "swish_sign": (swish_sign, _fixed(1), False, "signs"),
    "ste_heaviside": (ste_heaviside, _fixed(1), False, None),
    "ste_tern": (ste_tern, _fixed(2), False, None),
    "magnitude_aware_sign": (magnitude_aware_sign, _fixed(1), False, "scaled_signs"),
    "magnitude_aware_sign_unclipped": (magnitude_aware_sign_unclipped, _fixed(1), False, "scaled_signs"),
    "dorefa": (dorefa, lambda kw: kw.get("k_bit", 2), False, None),
    "stochastic_sign": (stochastic_sign, _fixed(1), True, "signs"),
    "xnor_weight_scale": (xnor_weight_scale, _fixed(1), False, "scaled_signs"),
}


def names() -> list[str]:
    """The quantizer names ``get`` accepts."""
    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """A quantizer function with bound keyword parameters, hashable so Flax modules can hold it.

    Attributes:
      name: registry name (or the callable's ``__name__``).
      fn: the pure function ``fn(x, **kwargs)`` (``fn(x, key, **kwargs)`` when ``needs_rng``).
      kwargs: bound keyword parameters as a sorted tuple of pairs.
      precision: bit width of the output (1 for binary), or None for full precision.
      needs_rng: whether ``__call__`` requires a PRNG key.
      values: what the outputs are known to be: ``"signs"`` (exactly -1 or +1), ``"scaled_signs"``
        (a non-negative scale per last-axis channel times ±1) or None. A layer with a "signs" input
        quantizer and a "signs" or "scaled_signs" kernel quantizer computes its forward pass on packed
        bits (``bnnjax.ops.xnor_product``).
    """

    name: str
    fn: Callable = dataclasses.field(repr=False)
    kwargs: tuple[tuple[str, Any], ...] = ()
    precision: int | None = None
    needs_rng: bool = False
    values: str | None = None

    def __call__(self, x, key=None):
        if self.needs_rng:
            if key is None:
                raise ValueError(f"quantizer {self.name!r} is stochastic: pass a PRNG key, q(x, key).")
            return self.fn(x, key, **dict(self.kwargs))
        return self.fn(x, **dict(self.kwargs))

    @property
    def is_binary(self) -> bool:
        return self.precision == 1


def _identity(x):
    return x


def _bind(name, fn, kwargs, skip):
    params = list(inspect.signature(fn).parameters)[skip:]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"quantizer {name!r} takes keyword parameters {params}, not {unknown}.")
    return tuple(sorted(kwargs.items()))


def get(identifier: str | Callable | Quantizer | None, **kwargs) -> Quantizer:
    """Resolve a quantizer name, callable, ``Quantizer`` or ``None`` to a ``Quantizer``.

    Args:
      identifier: a name from ``names()``, ``None`` (identity, full precision), a ``Quantizer``
        (returned as is, or re-bound with ``kwargs``), or any callable ``f(x)``; a callable's bit
        width is read from its ``precision`` attribute when it has one.
      **kwargs: keyword parameters bound to the function (e.g. ``clip_value=0.5``, ``k_bit=4``).

    Returns:
      A hashable ``Quantizer``.

    Raises:
      ValueError: unknown name (the message lists the valid names).
      TypeError: a keyword the quantizer does not take, or an identifier of another type.
    """
    if identifier is None:
        if kwargs:
            raise TypeError("the identity quantizer (None) takes no keyword parameters.")
        return Quantizer("identity", _identity)
    if isinstance(identifier, Quantizer):
        if not kwargs:
            return identifier
        identifier = identifier.name if identifier.name in _REGISTRY else identifier.fn
    if isinstance(identifier, str):
        key = identifier if identifier in _REGISTRY else _CLASS_NAMES.get(identifier)
        if key is None:
            raise ValueError(f"unknown quantizer {identifier!r}; valid names are {names()} "
                             "(or pass a callable or None).")
        fn, precision, needs_rng, values = _REGISTRY[key]
        bound = _bind(key, fn, kwargs, 2 if needs_rng else 1)
        return Quantizer(key, fn, bound, precision(kwargs), needs_rng, values)
    if callable(identifier):
        name = getattr(identifier, "__name__", type(identifier).__name__)
        return Quantizer(name, identifier, _bind(name, identifier, kwargs, 1),
                         getattr(identifier, "precision", None))
    raise TypeError(f"a quantizer is a name, a callable or None, got {type(identifier).__name__}.")


# Larq-style class names, so `lq.quantizers.SteSign(clip_value=0.5)` ports as `SteSign(clip_value=0.5)`.
_CLASS_NAMES = {
    "SteSign": "ste_sign", "ApproxSign": "approx_sign", "SwishSign": "swish_sign",
    "SteHeaviside": "ste_heaviside", "SteTern": "ste_tern", "MagnitudeAwareSign": "magnitude_aware_sign",
    "DoReFa": "dorefa", "DoReFaQuantizer": "dorefa", "StochasticSign": "stochastic_sign",
    "XnorWeightScale": "xnor_weight_scale",
}
SteSign = functools.partial(get, "ste_sign")
ApproxSign = functools.partial(get, "approx_sign")
SwishSign = functools.partial(get, "swish_sign")
SteHeaviside = functools.partial(get, "ste_heaviside")
SteTern = functools.partial(get, "ste_tern")
MagnitudeAwareSign = functools.partial(get, "magnitude_aware_sign")
DoReFa = functools.partial(get, "dorefa")
StochasticSign = functools.partial(get, "stochastic_sign")
XnorWeightScale = functools.partial(get, "xnor_weight_scale")
