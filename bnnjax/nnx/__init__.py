"""bnnjax for Flax NNX: 1-bit layers that drop in beside ``nnx.Linear`` / ``nnx.Conv``, the seed models,
and linen models (the zoo's) as NNX modules.

Every layer calls the same pure function as its linen twin in :mod:`bnnjax.layers` (see
:mod:`bnnjax.ops`); ``bnnjax.summary``, ``bnnjax.export.pack`` / ``save_artifact``, the optax transforms
(``weight_clip``, ``bop``, ``case_optimizer``) and ``bnnjax.train.fit`` take NNX models and states.

Example::

    from flax import nnx
    import bnnjax

    class BNN(nnx.Module):
        def __init__(self, rngs):
            self.dense1 = bnnjax.nnx.QuantLinear(16, 256, kernel_quantizer="ste_sign", use_bias=False, rngs=rngs)
            self.bn1 = bnnjax.nnx.BatchNorm(256, rngs=rngs)
            self.dense2 = bnnjax.nnx.QuantLinear(256, 2, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                                 use_bias=False, rngs=rngs)

        def __call__(self, x):
            return self.dense2(self.bn1(self.dense1(x)))
"""

from bnnjax.nnx.bridge import LinenModel, to_linen_variables, to_nnx_variables
from bnnjax.nnx.layers import (ABCConv, ABCLinear, Activation, BatchNorm, Constant, FixedDepthwiseConv, Flatten,
                               GlobalAvgPool, MaxPool, PReLU, QuantConv, QuantDepthwiseConv, QuantLinear, QuantParam,
                               keras_batch_norm)
from bnnjax.nnx import models

__all__ = ["QuantParam", "Constant", "QuantLinear", "QuantConv", "QuantDepthwiseConv", "ABCLinear", "ABCConv",
           "BatchNorm", "keras_batch_norm", "PReLU", "FixedDepthwiseConv", "MaxPool", "Flatten", "GlobalAvgPool",
           "Activation", "LinenModel", "to_nnx_variables", "to_linen_variables", "models"]
