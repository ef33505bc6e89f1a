"""Keras ``.h5`` weight files into Flax variables, matched by layer order as Keras itself loads them.

A tf-keras weights file (``model.save_weights("x.h5")``, larq-zoo's releases) lists the model's layers in
``model.layers`` order (attribute ``layer_names``); each layer group lists its weights in Keras' order
(attribute ``weight_names``: kernel, bias; gamma, beta, moving_mean, moving_variance; ...). Keras'
``load_weights`` pairs the file's layers that have weights with the model's layers that have weights,
position by position, ignoring names — so does :func:`assign`, with the Flax model's layers taken in
the order of their first call. A Flax model meant to load such files calls its layers in Keras' layer
order (the zoo's models do). Read with h5py; no TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
from flax import linen as nn
from flax import traverse_util

from bnnjax import _trace, layers as L
from bnnjax._download import DataError

__all__ = ["WeightsFileError", "read_weights", "record_layers", "assign"]


class WeightsFileError(DataError, ValueError):
    """A weights file that cannot be read, or does not fit the model (the message says where)."""


def _attr_strings(group, name: str) -> list[str]:
    # Keras splits attributes over 64 KiB into name0, name1, ... (save_attributes_to_hdf5_group)
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values.extend(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_weights(path: str | os.PathLike) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The layers that have weights, in file order: ``[(layer name, [(weight name, array), ...]), ...]``.

    Reads tf-keras' HDF5 layout: weights files (``save_weights``) and whole-model files (``save``,
    weights under ``model_weights``).

    Raises:
      FileNotFoundError: no such file.
      WeightsFileError: not an HDF5 file (corrupt or truncated), or HDF5 without Keras' layout (e.g.
        Keras 3's ``.weights.h5``, which this reader does not support).
    """
    import h5py  # the zoo's weights reader; bnnjax's core does not need it

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path} does not exist.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsFileError(f"{path}: not a readable HDF5 file ({e}); it is corrupt or truncated — "
                               "download it again.") from e
    with f:
        root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        names = _attr_strings(root, "layer_names")
        if not names:
            hint = (" It looks like Keras 3's .weights.h5 format; save the weights with tf-keras "
                    "(TF_USE_LEGACY_KERAS=1) as larq-zoo does." if "layers" in f or "vars" in f else "")
            raise WeightsFileError(f"{path}: HDF5 file without Keras' layer_names attribute.{hint}")
        out = []
        for name in names:
            group = root[name]
            weights = [(w, np.asarray(group[w])) for w in _attr_strings(group, "weight_names")]
            if weights:
                out.append((name, weights))
        return out


# Keras' weight order for Flax's layers, as (collection, variable) pairs; absent variables are skipped
# (BatchNorm without center or scale, layers without bias).
_KERNEL_BIAS = (("params", "kernel"), ("params", "bias"))
_BATCH_NORM = (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))


def _keras_order(module: nn.Module) -> tuple[tuple[str, str], ...]:
    if isinstance(module, nn.BatchNorm):
        return _BATCH_NORM
    if isinstance(module, L.FixedDepthwiseConv2D):
        return (("constants", "kernel"),)
    if isinstance(module, L.PReLU):
        return (("params", "alpha"),)
    order = getattr(module, "keras_weights", None)  # a family's own layer names its order
    if order is not None:
        return tuple(order)
    return _KERNEL_BIAS


def _depthwise(module) -> bool:
    return isinstance(module, (L.QuantDepthwiseConv2D, L.FixedDepthwiseConv2D))


def record_layers(init: Callable[[], Any]) -> tuple[Any, list[tuple[tuple[str, ...], nn.Module]]]:
    """Run ``init`` (a thunk calling ``model.init``; under ``jax.eval_shape`` for shapes only) and
    return its variables and ``(path, module)`` of every submodule that owns variables directly, in
    order of first call."""
    variables, traced = _trace.linen_calls(init)
    seen, calls = set(), []
    for c in sorted(traced, key=lambda c: c.start):
        if c.path not in seen:
            seen.add(c.path)
            calls.append((c.path, c.module))
    flat = traverse_util.flatten_dict(variables, is_leaf=lambda k, v: not isinstance(v, dict))
    owners = {key[1:-1] for key in flat}
    return variables, [(p, m) for p, m in calls if p in owners]


def assign(variables, layers: list[tuple[tuple[str, ...], nn.Module]], file_layers, source: str = "file"):
    """Fill ``variables`` (arrays or ``ShapeDtypeStruct`` leaves) with the file's weights, layer by layer.

    Args:
      variables: the model's variables (their structure and shapes; boxes such as ``QuantParam`` kept).
      layers: ``(path, module)`` of the model's layers with variables, in Keras' layer order
        (:func:`record_layers`).
      file_layers: :func:`read_weights`'s result.
      source: the file's name, for error messages.

    Returns:
      The variables with every leaf replaced by the file's array (numpy float32).

    Raises:
      WeightsFileError: different numbers of layers, or the first layer whose weights differ in number
        or shape (named in the model and in the file, with both shapes).
    """
    flat = traverse_util.flatten_dict(variables, is_leaf=lambda k, v: not isinstance(v, dict))
    if len(layers) != len(file_layers):
        first = next((i for i, (a, b) in enumerate(zip(layers, file_layers)) if not _fits(flat, a, b)),
                     min(len(layers), len(file_layers)))
        where = (f"; they first differ at position {first}: model layer "
                 f"{_describe(flat, layers[first]) if first < len(layers) else '(none)'}, file layer "
                 f"{_describe_file(file_layers[first]) if first < len(file_layers) else '(none)'}")
        raise WeightsFileError(f"{source} has {len(file_layers)} layers with weights, the model has "
                               f"{len(layers)}{where}. Is it the weights file of this model (and of its "
                               "include_top/num_classes setting)?")
    out = dict(flat)
    for layer, (name, weights) in zip(layers, file_layers):
        keys = _keys(flat, layer)
        if not _fits(flat, layer, (name, weights)):
            raise WeightsFileError(f"{source}: model layer {_describe(flat, layer)} does not fit file layer "
                                   f"{_describe_file((name, weights))}.")
        for key, (_, array) in zip(keys, weights):
            value = _to_flax(layer[1], array)
            leaf = flat[key]
            out[key] = leaf.replace_boxed(value) if isinstance(leaf, L.QuantParam) else value
    return traverse_util.unflatten_dict(out)


def _keys(flat, layer):
    path, module = layer
    return [(col,) + path + (name,) for col, name in _keras_order(module) if (col,) + path + (name,) in flat]


def _shape(leaf) -> tuple[int, ...]:
    return tuple((leaf.value if isinstance(leaf, L.QuantParam) else leaf).shape)


def _to_flax(module, array):
    array = np.asarray(array, np.float32)
    if _depthwise(module) and array.ndim == 4:
        # Keras' depthwise kernel (kh, kw, C, m) is Flax's grouped kernel (kh, kw, 1, C*m): output c*m + j
        array = array.reshape(array.shape[:2] + (1, -1))
    return array


def _fits(flat, layer, file_layer) -> bool:
    keys, (_, weights) = _keys(flat, layer), file_layer
    return len(keys) == len(weights) and all(
        _to_flax(layer[1], a).shape == _shape(flat[k]) for k, (_, a) in zip(keys, weights))


def _describe(flat, layer) -> str:
    path, module = layer
    shapes = ", ".join(f"{k[-1]} {_shape(flat[k])}" for k in _keys(flat, layer))
    return f"{'/'.join(path)} ({type(module).__name__}: {shapes})"


def _describe_file(file_layer) -> str:
    name, weights = file_layer
    return f"{name} ({', '.join(f'{w.split(chr(47))[-1]} {tuple(a.shape)}' for w, a in weights)})"
