"""Optax transforms for binarized networks: weight clipping, Bop, binary/other labels, flip ratio.

Binary kernels are found by their tag (set by the quantized layers), never by name: a linen
:class:`bnnjax.layers.QuantParam` box or an NNX :class:`bnnjax.nnx.QuantParam` variable. The transforms
read the tags when they are initialized and keep the binary kernels' positions in their (static) state,
so ``update`` also works on untagged arrays — what ``flax.nnx.Optimizer`` passes to optax.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from flax import struct

from bnnjax.layers import is_binary, is_tag

__all__ = [
    "weight_clip", "WeightClipState", "bop", "BopState", "binary_labels", "case_optimizer",
    "flip_ratio", "warn_if_unclipped", "sign_kernels", "binary_paths", "CaseOptimizerState",
]

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]


def _value(x):
    """The array a tag holds (a linen box's or an NNX variable's value), or ``x`` itself."""
    if hasattr(x, "get_value"):
        return x.get_value()
    return x.unbox() if hasattr(x, "unbox") else x


def _with_value(x, value):
    if hasattr(x, "get_value"):
        return x.replace(value)
    return x.replace_boxed(value) if hasattr(x, "replace_boxed") else value


def _paths(tree):
    """``(key path string, leaf)`` for every tag or array of ``tree`` (a tag is one leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_tag)
    return [(jax.tree_util.keystr(p), x) for p, x in flat]


def binary_paths(params) -> frozenset[str]:
    """The key paths (``jax.tree_util.keystr``) of the 1-bit kernels in ``params``, read from their tags.

    The same strings address the kernels in the untagged (``nnx.as_pure``) tree of the same model."""
    return frozenset(p for p, x in _paths(params) if is_binary(x))


def _map_binary(fn, paths: frozenset[str], tree, *rest):
    """Apply ``fn`` to the value of every binary kernel (at ``paths``) of ``tree``, the values of the
    aligned leaves of ``rest`` passed along."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_tag)
    others = [treedef.flatten_up_to(r) for r in rest]
    out = []
    for i, (p, x) in enumerate(flat):
        if jax.tree_util.keystr(p) in paths:
            x = _with_value(x, fn(_value(x), *(_value(o[i]) for o in others)))
        out.append(x)
    return treedef.unflatten(out)


@struct.dataclass
class WeightClipState:
    """Where the binary kernels are (static); its presence in an optimizer state marks that binary
    kernels are clipped."""

    binary: frozenset = struct.field(pytree_node=False, default=frozenset())


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
        return WeightClipState(binary_paths(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight_clip needs params: call tx.update(grads, state, params).")
        new = _map_binary(lambda u, p: jnp.clip(p + u, -clip_value, clip_value) - p, state.binary, updates, params)
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

        new_updates = jax.tree.map(step, params, m)  # a tag's value is its one leaf: tags pass through
        return new_updates, BopState(optax.safe_increment(state.count), m)

    return optax.GradientTransformation(init_fn, update_fn)


def sign_kernels(params):
    """Replace every binary kernel's latent value by its sign (sign(0) = +1): Bop's starting point.

    ``params``: linen params, an NNX ``State``, or an NNX model (whose kernels are set in place; the
    model is returned)."""
    from flax import nnx

    sign = lambda w: jnp.where(w >= 0, 1, -1).astype(w.dtype)
    if isinstance(params, nnx.Module):
        nnx.update(params, sign_kernels(nnx.state(params, nnx.Param)))
        return params
    return _map_binary(sign, binary_paths(params), params)


def binary_labels(params) -> Any:
    """Label each parameter ``"binary"`` (a 1-bit kernel by its tag) or ``"other"``.

    The result is a prefix of ``params`` (a label stands where a tag stands), as
    ``optax.multi_transform`` takes it.
    """
    return jax.tree.map(lambda x: "binary" if is_binary(x) else "other", params, is_leaf=is_tag)


@struct.dataclass
class CaseOptimizerState:
    """The two transforms' states and where the binary kernels are (static)."""

    binary_state: Any
    other_state: Any
    binary: frozenset = struct.field(pytree_node=False, default=frozenset())


def _mask(tree, paths: frozenset[str], binary: bool):
    """A boolean prefix of ``tree``: True at the binary kernels (``binary=True``) or everywhere else."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_tag)
    return treedef.unflatten([(jax.tree_util.keystr(p) in paths) == binary for p, _ in flat])


def case_optimizer(binary_tx: optax.GradientTransformation,
                   other_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """One transform for binary kernels, another for everything else (Larq's ``CaseOptimizer``).

    Each transform sees only its own parameters (``optax.masked``). The binary kernels are read from the
    tags at ``init``, so ``update`` works on untagged trees too (``nnx.Optimizer``).

    Example: ``case_optimizer(bop(), optax.adam(1e-2))``.
    """

    def parts(tree, paths):
        return (optax.masked(binary_tx, _mask(tree, paths, True)), optax.masked(other_tx, _mask(tree, paths, False)))

    def init_fn(params):
        paths = binary_paths(params)
        b, o = parts(params, paths)
        return CaseOptimizerState(b.init(params), o.init(params), paths)

    def update_fn(updates, state, params=None):
        b, o = parts(updates, state.binary)
        updates, bs = b.update(updates, state.binary_state, params)
        updates, os_ = o.update(updates, state.other_state, params)
        return updates, CaseOptimizerState(bs, os_, state.binary)

    return optax.GradientTransformation(init_fn, update_fn)


def flip_ratio(old_params, new_params) -> jax.Array:
    """Fraction of binary kernel entries whose sign (sign(0) = +1) differs between two param trees.

    Returns 0.0 when the model has no binary kernels.
    """
    flips, total = [], 0
    for a, b in zip(jax.tree.leaves(old_params, is_leaf=is_tag), jax.tree.leaves(new_params, is_leaf=is_tag)):
        if is_binary(a):
            a, b = _value(a), _value(b)
            flips.append(jnp.sum((a >= 0) != (b >= 0)))
            total += a.size
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
    has_binary = any(is_binary(x) for x in jax.tree.leaves(params, is_leaf=is_tag))
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
