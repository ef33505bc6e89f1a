"""BiRealNet (larq-zoo ``literature``), layer for layer as larq-zoo builds it.

Bi-Real Net 18: every binary 3x3 convolution (approx_sign on inputs, magnitude_aware_sign on kernels,
zero-padding) is followed by BatchNorm and its own real-valued shortcut; where the width doubles the
convolution has stride 2 and the shortcut is a 2x2 average pool, a 1x1 real convolution and BatchNorm.
A real stem (7x7 strided convolution, BatchNorm, 3x3 strided max-pool) and a global pooling, dense
top. Train the latent binary kernels with ``bnnjax.weight_clip(1.0)`` (larq-zoo's ``"weight_clip"``
constraint, Larq's default clip value 1).

Reference: Liu et al., "Bi-Real Net: Enhancing the Performance of 1-bit CNNs With Improved
Representational Capability and Advanced Training Algorithm", ECCV 2018 (arXiv:1808.00278).
"""

from __future__ import annotations

from flax import linen as nn

from bnnjax.layers import BatchNorm, QuantConv, QuantDense, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, global_pool, release

__all__ = ["BiRealNet"]

CLIP_VALUE = 1.0
_glorot = nn.initializers.glorot_normal()


def _bn(train: bool) -> BatchNorm:
    return keras_batch_norm(train, momentum=0.8)


class BiRealNet(nn.Module):
    """BiRealNet: 57.47 % top-1 / 79.84 % top-5 on ImageNet (larq-zoo's released weights).

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the global pooling, dense layer and softmax; without it the model returns the
        last block's feature map.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      filters: channels of the stem and the first section (doubled in each of the next three).
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    filters: int = 64

    def _residual_block(self, x, out_filters: int, train: bool):
        in_filters = x.shape[-1]
        y = QuantConv(out_filters, (3, 3), strides=1 if out_filters == in_filters else 2, padding="SAME",
                      input_quantizer="approx_sign", kernel_quantizer="magnitude_aware_sign",
                      use_bias=False, kernel_init=_glorot)(x)
        if out_filters == in_filters:
            return _bn(train)(y) + x
        # Keras lists a functional model's layers by depth, so the weights file has the binary conv, then
        # the shortcut conv, then the binary conv's BatchNorm before the shortcut's: call them in that order.
        shortcut = nn.avg_pool(x, (2, 2), (2, 2), padding="SAME", count_include_pad=False)
        shortcut = QuantConv(out_filters, (1, 1), use_bias=False, kernel_init=_glorot)(shortcut)
        y = _bn(train)(y)
        return y + _bn(train)(shortcut)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantConv(self.filters, (7, 7), strides=2, padding="SAME", use_bias=False, kernel_init=_glorot)(x)
        x = nn.max_pool(_bn(train)(x), (3, 3), (2, 2), padding="SAME")
        for _ in range(4):
            x = self._residual_block(x, self.filters, train)
        for _ in range(3):
            x = self._residual_block(x, 2 * x.shape[-1], train)
            for _ in range(3):
                x = self._residual_block(x, x.shape[-1], train)
        if not self.include_top:
            return x
        x = QuantDense(self.num_classes, kernel_init=nn.initializers.glorot_uniform())(global_pool(x))
        return classifier_activation(x, self.classifier_activation)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "BiRealNet": {
        True: release("birealnet", "v0.3.0", "birealnet_weights.h5",
                      "6e6efac1584fcd60dd024198c87f42eb53b5ec719a5ca1f527e1fe7e8b997117"),
        False: release("birealnet", "v0.3.0", "birealnet_weights_notop.h5",
                       "5148b61c0c2a1094bdef811f68bf4957d5ba5f83ad26437b7a4a6855441ab46b"),
    },
}
MODELS = {"BiRealNet": BiRealNet}
