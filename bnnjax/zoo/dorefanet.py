"""DoReFaNet (larq-zoo ``literature``), layer for layer as larq-zoo builds it.

An AlexNet-shaped network with 2-bit activations (``dorefa`` in activation mode on every quantized
layer's input) and binary kernels scaled by the layer's mean magnitude (``magnitude_aware_sign_unclipped``,
an unclipped straight-through gradient): a real 12x12 stem, four quantized convolutions each followed by
a BatchNorm without scale (max-pooling after three of them), two quantized dense layers with BatchNorm,
``clip_by_value_activation`` and a real dense classifier. larq-zoo puts no constraint on the kernels, so
train without ``bnnjax.weight_clip``.

Reference: Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
Gradients", 2016 (arXiv:1606.06160).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from bnnjax import quantizers
from bnnjax.layers import QuantConv, QuantDense, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, release

__all__ = ["DoReFaNet", "clip_by_value_activation"]

_glorot = nn.initializers.glorot_uniform()


def clip_by_value_activation(x):
    """larq-zoo's ``clip_by_value_activation``: ``clip(x, 0, 1)``, gradient 1 on ``[0, 1]`` (ends included,
    as ``tf.clip_by_value``) and 0 outside."""
    inside = (x >= 0) & (x <= 1)
    # jnp.clip would pass half the gradient at the ends (JAX splits max/min ties); TensorFlow passes all.
    return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, 0, 1)))


class DoReFaNet(nn.Module):
    """DoReFa-Net: 53.39 % top-1 / 76.50 % top-5 on ImageNet (larq-zoo's released weights).

    The top flattens the last feature map (6x6 at 224x224), so the first dense kernel's shape follows the
    input size.

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the quantized dense layers, the clipping activation, the dense classifier and softmax;
        without it the model returns the last pooled feature map.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      activations_k_bit: bits of the ``dorefa`` input quantizer.
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    activations_k_bit: int = 2

    def _quantized(self):
        return dict(input_quantizer=quantizers.DoReFa(k_bit=self.activations_k_bit),
                    kernel_quantizer="magnitude_aware_sign_unclipped", use_bias=False, kernel_init=_glorot)

    def _conv_block(self, x, filters: int, kernel_size: int, train: bool, pool: str | None = None):
        x = QuantConv(filters, (kernel_size, kernel_size), padding="SAME", **self._quantized())(x)
        x = keras_batch_norm(train, use_scale=False, momentum=0.9, epsilon=1e-4)(x)
        if pool is not None:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=pool)
        return x

    def _dense_block(self, x, units: int, train: bool):
        x = QuantDense(units, **self._quantized())(x)
        return keras_batch_norm(train, use_scale=False, momentum=0.9, epsilon=1e-4)(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantConv(96, (12, 12), strides=4, padding="VALID", kernel_init=_glorot)(x)
        x = self._conv_block(x, 256, 5, train, pool="SAME")
        x = self._conv_block(x, 384, 3, train, pool="SAME")
        x = self._conv_block(x, 384, 3, train)
        x = self._conv_block(x, 256, 3, train, pool="VALID")
        if not self.include_top:
            return x
        x = x.reshape((x.shape[0], -1))
        x = self._dense_block(x, 4096, train)
        x = self._dense_block(x, 4096, train)
        x = clip_by_value_activation(x)
        x = QuantDense(self.num_classes, kernel_init=_glorot)(x)
        return classifier_activation(x, self.classifier_activation)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "DoReFaNet": {
        True: release("dorefanet", "v0.1.0", "dorefanet_weights.h5",
                      "645d7839d574faa3eeeca28f3115773d75da3ab67ff6876b4de12d10245ecf6a"),
        False: release("dorefanet", "v0.1.1", "dorefanet_weights_notop.h5",
                       "8650e8a86d8d3968722cf5f20bcebe74d6d7bb45bbf03c4bb8c6486343f37e31"),
    },
}
MODELS = {"DoReFaNet": DoReFaNet}
