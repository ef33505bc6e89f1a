"""Optax transforms for binarized networks: weight clipping, Bop, binary/other labels, flip ratio.

Binary kernels are found by their ``QuantParam`` tag (set by the quantized layers), never by name.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from bnnjax.layers import QuantParam, is_binary

__all__ = [
    "weight_clip", "WeightClipState", "bop", "BopState", "binary_labels", "case_optimizer",
    "flip_ratio", "warn_if_unclipped", "sign_kernels",
]

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]


def _map_binary(fn, tree, *rest):
    """Apply ``fn`` to the value of every binary kernel box in ``tree`` (boxes of ``rest`` aligned)."""

    def visit(x, *ys):
        if is_binary(x):
            return x.replace_boxed(fn(x.value, *(y.value if isinstance(y, QuantParam) else y for y in ys)))
        return x

    return jax.tree.map(visit, tree, *rest, is_leaf=lambda x: isinstance(x, QuantParam))


class WeightClipState(NamedTuple):
    """Empty state; its presence in an optimizer state marks that binary kernels are clipped."""


def weight_clip(clip_value: float = 1.0) -> optax.GradientTransformation:
    """Keep latent binary kernels in ``[-clip_value, clip_value]`` after each update.

    Chain it last: ``optax.chain(optax.adam(1e-3), weight_clip())``. For a binary kernel ``w`` with
    proposed update ``u`` the update becomes ``clip(w + u, -c, c) - w``; every other parameter's update
    passes unchanged. Without it, latent weights drift past the STE's clip range where their gradient
    is zero forever ("starved" weights).

    Args:
      clip_value: ``c > 0``.

    Returns:
      An optax ``GradientTransformation`` whose ``update`` needs ``params``.

    Raises:
      ValueError: ``clip_value`` is not positive; ``update`` called without ``params``.

    Reference: Courbariaux et al., "BinaryConnect", 2015; Larq's ``weight_clip`` constraint.
    """
    if not clip_value > 0:
        raise ValueError(f"clip_value must be positive, got {clip_value!r}.")

    def init_fn(params):
        del params
        return WeightClipState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight_clip needs params: call tx.update(grads, state, params).")
        new = _map_binary(lambda u, p: jnp.clip(p + u, -clip_value, clip_value) - p, updates, params)
        return new, state

    return optax.GradientTransformation(init_fn, update_fn)


class BopState(NamedTuple):
    """Bop's state: step count and the exponential moving average of gradients."""

    count: jax.Array
    momentum: Any


def bop(threshold: ScalarOrSchedule = 1e-8, gamma: ScalarOrSchedule = 1e-4) -> optax.GradientTransformation:
    """Bop, the latent-weight-free optimizer for binary kernels, as an optax transform.

    Per step: ``m <- m + gamma (g - m)``; the new binary weight is ``-sign(w)`` where
    ``w * m > threshold`` and ``sign(w)`` elsewhere (sign(0) = +1). The returned update is
    ``new_w - w``, exact when ``w`` is ±1: start from ``sign_kernels(params)`` and the kernels stay
    exactly in {-1, +1} (from a float init the first step lands within one ulp of ±1). Apply it only
    to binary kernels: ``case_optimizer(bop(), optax.adam(1e-3))``.

    Args:
      threshold: flip threshold tau, a float or a schedule ``f(step)``.
      gamma: adaptivity rate, a float or a schedule ``f(step)``.

    Returns:
      An optax ``GradientTransformation`` whose ``update`` needs ``params``.

    Reference: Helwegen et al., "Latent Weights Do Not Exist: Rethinking Binarized Neural Network
    Optimization", NeurIPS 2019 (arXiv:1906.02107).
    """

    def init_fn(params):
        return BopState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("bop needs params: call tx.update(grads, state, params).")
        g_ = gamma(state.count) if callable(gamma) else gamma
        t_ = threshold(state.count) if callable(threshold) else threshold
        m = jax.tree.map(lambda m, g: m + g_ * (g - m), state.momentum, updates)

        def step(w, m):
            s = jnp.where(w >= 0, 1, -1).astype(w.dtype)
            return jnp.where(w * m > t_, -s, s) - w

        new_updates = jax.tree.map(step, params, m)
        return new_updates, BopState(optax.safe_increment(state.count), m)

    return optax.GradientTransformation(init_fn, update_fn)


def sign_kernels(params):
    """Replace every binary kernel's latent value by its sign (sign(0) = +1): Bop's starting point."""
    return _map_binary(lambda w: jnp.where(w >= 0, 1, -1).astype(w.dtype), params)


def binary_labels(params) -> Any:
    """Label each parameter ``"binary"`` (a 1-bit kernel by its tag) or ``"other"``.

    The result is a prefix of ``params`` (a label stands where a ``QuantParam`` box stands), as
    ``optax.multi_transform`` takes it.
    """
    return jax.tree.map(lambda x: "binary" if is_binary(x) else "other", params,
                        is_leaf=lambda x: isinstance(x, QuantParam))


def case_optimizer(binary_tx: optax.GradientTransformation,
                   other_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """One transform for binary kernels, another for everything else (Larq's ``CaseOptimizer``).

    Example: ``case_optimizer(bop(), optax.adam(1e-2))``.
    """
    return optax.multi_transform({"binary": binary_tx, "other": other_tx}, binary_labels)


def flip_ratio(old_params, new_params) -> jax.Array:
    """Fraction of binary kernel entries whose sign (sign(0) = +1) differs between two param trees.

    Returns 0.0 when the model has no binary kernels.
    """
    flips, total = [], 0
    is_box = lambda x: isinstance(x, QuantParam)
    for a, b in zip(jax.tree.leaves(old_params, is_leaf=is_box), jax.tree.leaves(new_params, is_leaf=is_box)):
        if is_binary(a):
            flips.append(jnp.sum((a.value >= 0) != (b.value >= 0)))
            total += a.value.size
    if not total:
        return jnp.asarray(0.0, jnp.float32)
    return (sum(flips) / total).astype(jnp.float32)


_warned_unclipped = False


def warn_if_unclipped(params, opt_state) -> bool:
    """Warn (once per process) when binary kernels are trained without ``weight_clip`` or ``bop``.

    Returns:
      True when the warning condition holds.
    """
    global _warned_unclipped
    has_binary = any(is_binary(x) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantParam)))
    guarded = any(isinstance(s, (WeightClipState, BopState))
                  for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, (WeightClipState, BopState))))
    unclipped = has_binary and not guarded
    if unclipped and not _warned_unclipped:
        _warned_unclipped = True
        warnings.warn("binary kernels are trained without weight clipping: latent weights can leave the "
                      "straight-through estimator's range and stop learning. Use "
                      "optax.chain(tx, bnnjax.weight_clip()) or bnnjax.case_optimizer(bnnjax.bop(), tx).",
                      UserWarning, stacklevel=2)
    return unclipped
