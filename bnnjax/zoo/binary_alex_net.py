"""BinaryAlexNet (larq-zoo ``literature``), layer for layer as larq-zoo builds it.

AlexNet with binary kernels everywhere (ste_sign) and binary inputs everywhere but the first layer: five
convolutions, max-pooling after the first, second and fifth, each followed by a BatchNorm without scale;
the classifier is three binary 1x1 convolutions with BatchNorm on the flattened feature map, the last one
giving the logits. Train the latent binary kernels with ``bnnjax.weight_clip(1.0)`` (larq-zoo's
``weight_clip`` constraint).

Reference: Hubara et al., "Binarized Neural Networks", NeurIPS 2016.
"""

from __future__ import annotations

from flax import linen as nn

from bnnjax.layers import QuantConv, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, release

__all__ = ["BinaryAlexNet"]

CLIP_VALUE = 1.0
_glorot = nn.initializers.glorot_uniform()


class BinaryAlexNet(nn.Module):
    """Binary AlexNet: 36.30 % top-1 / 61.53 % top-5 on ImageNet (larq-zoo's released weights).

    The top reshapes the last feature map (6x6 at 224x224) to 1x1, so the first classifier kernel's
    shape follows the input size.

    Attributes:
      num_classes: classes of the last binary 1x1 convolution.
      include_top: the three binary 1x1 convolutions with BatchNorm and the softmax; without it the model
        returns the last pooled feature map.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      inflation_ratio: width multiplier of every convolution but the last.
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    inflation_ratio: int = 1

    def _conv_block(self, x, features: int, kernel_size: int, train: bool, strides: int = 1, pool: bool = False,
                    first_layer: bool = False):
        x = QuantConv(features, (kernel_size, kernel_size), strides=strides, padding="SAME",
                      input_quantizer=None if first_layer else "ste_sign", kernel_quantizer="ste_sign",
                      use_bias=False, kernel_init=_glorot)(x)
        if pool:
            x = nn.max_pool(x, (3, 3), (2, 2))
        return keras_batch_norm(train, use_scale=False, momentum=0.9)(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        r = self.inflation_ratio
        x = self._conv_block(x, 64 * r, 11, train, strides=4, pool=True, first_layer=True)
        x = self._conv_block(x, 192 * r, 5, train, pool=True)
        x = self._conv_block(x, 384 * r, 3, train)
        x = self._conv_block(x, 384 * r, 3, train)
        x = self._conv_block(x, 256, 3, train, pool=True)
        if not self.include_top:
            return x
        x = x.reshape((x.shape[0], 1, 1, -1))
        x = self._conv_block(x, 4096, 1, train)
        x = self._conv_block(x, 4096, 1, train)
        x = self._conv_block(x, self.num_classes, 1, train)
        x = x.reshape((x.shape[0], -1))
        return classifier_activation(x, self.classifier_activation)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "BinaryAlexNet": {
        True: release("binary_alexnet", "v0.3.0", "binary_alexnet_weights.h5",
                      "7fc065c47c5c1d92389e0bb988ce6df6a4fa09d803b866e2ba648069d6652d63"),
        False: release("binary_alexnet", "v0.2.1", "binary_alexnet_weights_notop.h5",
                       "1d41b33ff39cd28d13679392641bf7711174a96d182417f91df45d0548f5bb47"),
    },
}
MODELS = {"BinaryAlexNet": BinaryAlexNet}
