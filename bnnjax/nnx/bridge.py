"""A linen module and its variables as an NNX module, with bnnjax's tags (``flax.nnx.bridge.ToNNX``'s idea).

The zoo's 14 architectures are written once, in linen; ``bnnjax.zoo.load(..., api="nnx")`` returns them
as :class:`LinenModel`. Its variables are NNX variables of the right types — a linen
:class:`bnnjax.layers.QuantParam` kernel becomes a :class:`bnnjax.nnx.QuantParam`, ``batch_stats`` an
``nnx.BatchStat``, ``constants`` a :class:`bnnjax.nnx.Constant` — so ``nnx.state(model, QuantParam)``,
``nnx.Optimizer(..., wrt=nnx.Param)``, ``model.train()`` / ``model.eval()``, ``bnnjax.summary``,
``bnnjax.export.pack`` and ``bnnjax.train.fit`` work on it as on a model written in NNX. Flax's own
``ToNNX`` maps variables by collection name only, which would drop the quantization tags.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn
from flax import nnx
from flax import traverse_util

from bnnjax import layers as L
from bnnjax.nnx.layers import Constant, QuantParam

__all__ = ["LinenModel", "to_nnx_variables", "to_linen_variables"]

_TYPES = {"params": nnx.Param, "batch_stats": nnx.BatchStat, "constants": Constant}


def _to_variable(collection: str, leaf):
    if isinstance(leaf, L.QuantParam):
        return QuantParam(leaf.value, precision=leaf.precision, quantizer=leaf.quantizer, packable=leaf.packable)
    vtype = _TYPES.get(collection) or nnx.variablelib.variable_type_from_name(collection, allow_register=True)
    return vtype(leaf)


def _collection(var) -> str:
    if isinstance(var, QuantParam) or isinstance(var, nnx.Param):
        return "params"
    for name, t in _TYPES.items():
        if type(var) is t:
            return name
    return nnx.variablelib.variable_name_from_type(type(var), allow_register=True)


def to_nnx_variables(variables: dict) -> dict:
    """Linen variables (``{"params": ..., "batch_stats": ...}``) as one nested dict of NNX variables by
    module path; collections become variable types and linen ``QuantParam`` boxes ``QuantParam`` variables.

    Raises:
      ValueError: two collections hold a variable at the same path (NNX has one namespace).
    """
    flat = {}
    for collection, tree in variables.items():
        for path, leaf in traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, x: not isinstance(x, dict)).items():
            if path in flat:
                raise ValueError(f"the variable {'/'.join(path)} is in two collections; NNX holds one variable per path.")
            flat[path] = _to_variable(collection, leaf)
    return traverse_util.unflatten_dict(flat)


def to_linen_variables(tree: dict) -> dict:
    """The inverse of :func:`to_nnx_variables`: NNX variables by path to linen collections."""
    out = {}
    for path, var in traverse_util.flatten_dict(tree).items():
        value = var.get_value()
        if isinstance(var, QuantParam):
            value = L.QuantParam(value, var.precision, var.quantizer, var.get_metadata().get("packable", False))
        out[(_collection(var),) + path] = value
    return traverse_util.unflatten_dict(out)


class LinenModel(nnx.Module):
    """A linen module with its variables, as a stateful NNX module.

    ``model(x)`` runs ``module.apply(variables, x, train=...)``: in evaluation mode (``model.eval()``, the
    state it starts in) with the running BatchNorm statistics; in training mode (``model.train()``) with
    batch statistics, which it stores back, and with fresh keys from ``rngs`` for the ``"dropout"`` and
    ``"quantizer"`` streams.

    Args:
      module: the linen module; its ``__call__`` takes ``train`` as a keyword (``train_kwarg``) unless
        ``train_kwarg=None``.
      variables: its variables (``module.init(...)``, a weights file, ``bnnjax.export.pack``).
      rngs: ``nnx.Rngs`` for stochastic layers in training mode (default ``nnx.Rngs(0)``).
      train_kwarg: the name of the module's training flag.
    """

    def __init__(self, module: nn.Module, variables: dict, *, rngs: nnx.Rngs | None = None,
                 train_kwarg: str | None = "train"):
        self.linen_module = module
        self.train_kwarg = train_kwarg
        self.deterministic = True
        self.rngs = (rngs or nnx.Rngs(0)).fork()
        self.vars = nnx.data(to_nnx_variables(variables))

    def linen_variables(self) -> dict:
        """The current variables in linen's layout, for ``self.linen_module.apply``."""
        return to_linen_variables(self.vars)

    def set_view(self, deterministic: bool | None = None):
        """For ``nnx.view``: ``deterministic=False`` is training mode."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, *args, **kwargs) -> Any:
        variables = self.linen_variables()
        kw = dict(kwargs)
        if self.train_kwarg is not None:
            kw[self.train_kwarg] = not self.deterministic
        if self.deterministic:
            return self.linen_module.apply(variables, *args, **kw)
        rngs = {"dropout": self.rngs.dropout(), "quantizer": self.rngs.quantizer()}
        out, updates = self.linen_module.apply(variables, *args, mutable=["batch_stats"], rngs=rngs, **kw)
        stats = traverse_util.flatten_dict(dict(updates.get("batch_stats", {})))
        flat = traverse_util.flatten_dict(self.vars)
        for path, value in stats.items():
            flat[path].set_value(value)
        return out
