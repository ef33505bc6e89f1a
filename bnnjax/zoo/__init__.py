"""larq-zoo's ImageNet BNNs in Flax, with larq-zoo's pretrained weights.

Every model of larq-zoo 2.4, built layer for layer as larq-zoo builds it and named as larq-zoo names it,
one module per family (``quicknet``, ``birealnet``, ``resnet_e``, ``densenet``, ``meliusnet``,
``real_to_bin_nets``, ``xnornet``, ``dorefanet``, ``binary_alex_net``). Each model is a Flax module with
``num_classes``, ``include_top`` and ``classifier_activation`` fields whose ``__call__(x, train=False)``
takes float NHWC images preprocessed by :func:`preprocess_input` and returns what larq-zoo's model
returns (softmax probabilities with the top).

``model, variables = bnnjax.zoo.load("QuickNet", weights="imagenet")`` builds a model and its variables:
random (``weights=None``), larq-zoo's released ImageNet weights (downloaded once, SHA-256 checked), or a
Keras ``.h5`` weights file. ``model = bnnjax.zoo.load("QuickNet", weights="imagenet", api="nnx")``
returns the same model as a Flax NNX module (:class:`bnnjax.nnx.LinenModel`: the architecture is
written once, in linen; its binary kernels are ``bnnjax.nnx.QuantParam`` variables).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import linen as nn

from bnnjax.zoo import (binary_alex_net, birealnet, densenet, dorefanet, meliusnet, quicknet, real_to_bin_nets,
                        resnet_e, xnornet)
from bnnjax.zoo._imagenet import decode_predictions, load_class_index, preprocess_input
from bnnjax.zoo._keras_h5 import WeightsFileError, assign, read_weights, record_layers

_FAMILIES = (quicknet, birealnet, resnet_e, densenet, meliusnet, real_to_bin_nets, xnornet, dorefanet,
             binary_alex_net)
MODELS: dict[str, type[nn.Module]] = {name: cls for fam in _FAMILIES for name, cls in fam.MODELS.items()}
WEIGHTS = {name: files for fam in _FAMILIES for name, files in fam.WEIGHTS.items()}
globals().update(MODELS)

__all__ = ["load", "names", "MODELS", "WEIGHTS", "WeightsFileError", "weights_path", "load_weights",
           "preprocess_input", "decode_predictions", "load_class_index", *MODELS]

DEFAULT_INPUT_SHAPE = (224, 224, 3)


def names() -> list[str]:
    """The zoo's model names (larq-zoo's class names)."""
    return sorted(MODELS)


def _model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {names()}.")
    return MODELS[name]


def weights_path(name: str, include_top: bool = True, *, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> Path:
    """The local copy of larq-zoo's released ImageNet weights of ``name``, downloaded on first use.

    The file comes from larq-zoo's GitHub release (or ``$BNNJAX_DATASET_MIRROR/zoo/<file name>``), is
    SHA-256 checked and cached under ``cache_dir`` (default ``$BNNJAX_DATA_DIR/zoo``, i.e.
    ``~/.cache/bnnjax/zoo``).

    Raises:
      ValueError: unknown model, or a model without released weights.
      bnnjax._download.DownloadError / ChecksumError: offline without a cached copy, unreachable
        mirror, corrupt download.
    """
    from bnnjax import _download, datasets

    _model_class(name)
    files = WEIGHTS.get(name, {})
    if include_top not in files:
        raise ValueError(f"larq-zoo releases no ImageNet weights for {name} with include_top={include_top}.")
    w = files[include_top]
    cache = Path(cache_dir) if cache_dir is not None else datasets.default_cache_dir() / "zoo"
    remote = _download.Remote(w.url, w.sha256, w.filename, mirror_path=f"zoo/{w.filename}")
    return _download.fetch(remote, cache, progress=progress)


def load_weights(model: nn.Module, path: str | os.PathLike, input_shape=DEFAULT_INPUT_SHAPE) -> dict:
    """The variables of ``model`` filled from a Keras ``.h5`` weights file (matched as Keras matches:
    layers with weights in order, then each layer's weights in Keras' order, shapes checked).

    Raises:
      FileNotFoundError, WeightsFileError: a missing, unreadable or non-fitting file (the message names
        the first layer and shapes that differ).
    """
    x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
    file_layers = read_weights(path)
    variables, layers = record_layers(lambda: jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x))
    return jax.tree.map(jnp.asarray, assign(variables, layers, file_layers, source=os.fspath(path)))


def load(name: str, weights: str | os.PathLike | None = None, include_top: bool = True, num_classes: int = 1000,
         input_shape: tuple[int, int, int] | None = None, *, seed: int = 0, api: str = "linen", **fields):
    """Build zoo model ``name`` and its variables, like larq-zoo's ``Model(weights=..., ...)``.

    Args:
      name: a larq-zoo class name (:func:`names`).
      weights: None (random initialization, seeded by ``seed``), ``"imagenet"`` (larq-zoo's released
        weights, downloaded on first use: :func:`weights_path`) or the path of a Keras ``.h5`` file.
      include_top: the classifier head; without it the model returns its last feature map.
      num_classes: classes of the head (1000 with ImageNet weights).
      input_shape: ``(height, width, 3)``; default ``(224, 224, 3)``.
      seed: PRNG seed of the random initialization.
      api: ``"linen"`` or ``"nnx"``.
      **fields: other fields of the model (``classifier_activation=None`` for logits).

    Returns:
      linen: ``(model, variables)``; ``model.apply(variables, x)`` evaluates in inference mode. NNX: the
      model, in evaluation mode (``model(x)``; ``model.train()`` to fine-tune).

    Raises:
      ValueError: unknown name or api, a ``weights`` that is neither None, "imagenet" nor an existing file,
        ImageNet weights with ``num_classes != 1000``, an input shape without 3 channels.
      WeightsFileError: a weights file that does not fit the model.
    """
    cls = _model_class(name)
    if api not in ("linen", "nnx"):
        raise ValueError(f"api must be 'linen' or 'nnx', got {api!r}.")
    if api == "nnx":
        from bnnjax.nnx import LinenModel
        from flax import nnx

        model, variables = load(name, weights, include_top, num_classes, input_shape, seed=seed, **fields)
        return LinenModel(model, variables, rngs=nnx.Rngs(seed))
    if not (weights is None or weights == "imagenet" or os.path.isfile(weights)):
        raise ValueError(f"weights must be None (random initialization), 'imagenet' (larq-zoo's ImageNet "
                         f"weights) or the path to a weights file; {weights!r} is none of these (no such file).")
    if weights == "imagenet" and include_top and num_classes != 1000:
        raise ValueError(f"ImageNet weights with include_top=True have 1000 classes, not num_classes={num_classes}; "
                         "pass include_top=False to put your own head on them.")
    input_shape = tuple(input_shape or DEFAULT_INPUT_SHAPE)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape}.")
    model = cls(num_classes=num_classes, include_top=include_top, **fields)
    if weights is None:
        x = jnp.zeros((1,) + input_shape, jnp.float32)
        return model, jax.jit(model.init)(jax.random.key(seed), x)
    path = weights_path(name, include_top) if weights == "imagenet" else weights
    return model, load_weights(model, path, input_shape)
