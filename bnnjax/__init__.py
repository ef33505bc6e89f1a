"""bnnjax: binarized neural networks in JAX/Flax.

Quantizers with straight-through gradients, quantized Flax linen layers, optax transforms for binary
kernels, a Larq-style summary; the submodules ``datasets``, ``pipeline``, ``train``, ``export``,
``packing``, ``ops``, ``nnx`` (Flax NNX layers), ``zoo`` and ``experiment`` load on first use (``bnnjax.zoo.load(...)``).
"""

import importlib

from bnnjax import layers, models, optim, quantizers
from bnnjax.layers import (ABCConv, ABCDense, BatchNorm, QuantConv, QuantDense, QuantDepthwiseConv2D, QuantParam,
                           abc_from_float, is_binary, is_quantized)
from bnnjax.optim import bop, binary_labels, case_optimizer, flip_ratio, sign_kernels, warn_if_unclipped, weight_clip
from bnnjax.quantizers import (approx_sign, dorefa, magnitude_aware_sign, ste_heaviside, ste_sign, ste_tern,
                               stochastic_sign, swish_sign, xnor_weight_scale)
from bnnjax.summary import summary

__version__ = "0.1.0"

__all__ = ["layers", "models", "optim", "quantizers", "summary", "ABCConv", "ABCDense", "BatchNorm", "QuantConv",
           "QuantDense", "QuantDepthwiseConv2D", "QuantParam", "abc_from_float", "is_binary", "is_quantized", "bop",
           "binary_labels", "case_optimizer", "flip_ratio", "sign_kernels", "warn_if_unclipped", "weight_clip", "approx_sign",
           "dorefa", "magnitude_aware_sign", "ste_heaviside", "ste_sign", "ste_tern", "stochastic_sign",
           "swish_sign", "xnor_weight_scale"]

_LAZY = ("datasets", "experiment", "export", "nnx", "ops", "packing", "pipeline", "train", "zoo")


def __getattr__(name):
    # heavy dependencies (h5py, grain, orbax) load only when their module is used
    if name in _LAZY:
        return importlib.import_module(f"bnnjax.{name}")
    raise AttributeError(f"module 'bnnjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
