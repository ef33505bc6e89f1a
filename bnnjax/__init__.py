"""bnnjax: binarized neural networks in JAX/Flax.

Quantizers with straight-through gradients, quantized Flax linen layers, optax transforms for binary
kernels, and a Larq-style summary.
"""

from bnnjax import layers, models, optim, quantizers
from bnnjax.layers import (ABCConv, ABCDense, QuantConv, QuantDense, QuantDepthwiseConv2D, QuantParam,
                           abc_from_float, is_binary, is_quantized)
from bnnjax.optim import bop, binary_labels, case_optimizer, flip_ratio, warn_if_unclipped, weight_clip
from bnnjax.quantizers import (approx_sign, dorefa, magnitude_aware_sign, ste_heaviside, ste_sign, ste_tern,
                               stochastic_sign, swish_sign, xnor_weight_scale)
from bnnjax.summary import summary

__version__ = "0.1.0"
