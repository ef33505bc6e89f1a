"""QuickNet, QuickNetSmall and QuickNetLarge (larq-zoo ``sota``), layer for layer as larq-zoo builds them.

Binary residual blocks (ste_sign with clip 1.25 on inputs and kernels, one-padding, ReLU, BatchNorm,
identity shortcut), a real stem (strided 3x3 conv, strided depthwise 3x3 conv, 1x1 conv) and, where the
width changes, a real transition (ReLU, 2x2 max-pool with stride 1, a fixed blur-pool depthwise conv
with stride 2, 1x1 conv). Train the latent binary kernels with ``bnnjax.weight_clip(1.25)`` (larq-zoo's
``WeightClip(clip_value=1.25)`` constraint).

Reference: Bannink et al., "Larq Compute Engine: Design, Benchmark, and Deploy State-of-the-Art Binarized
Neural Networks", MLSys 2021 (arXiv:2011.09398).
"""

from __future__ import annotations

from typing import Sequence

from flax import linen as nn

from bnnjax import ops, quantizers
from bnnjax.layers import FixedDepthwiseConv2D, QuantConv, QuantDense, QuantDepthwiseConv2D, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, global_pool, release

__all__ = ["QuickNet", "QuickNetSmall", "QuickNetLarge"]

CLIP_VALUE = 1.25
_he = nn.initializers.he_normal()
_glorot = nn.initializers.glorot_normal()


class QuickNet(nn.Module):
    """QuickNet: 63.3 % top-1 / 84.6 % top-5 on ImageNet (larq-zoo's released weights).

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the ReLU, global pooling, dense layer and softmax; without it the model returns the
        last block's feature map.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      section_blocks: residual blocks per section.
      section_filters: channels per section.
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    section_blocks: Sequence[int] = (4, 4, 4, 4)
    section_filters: Sequence[int] = (64, 128, 256, 512)

    def _stem(self, x, filters: int, train: bool):
        x = QuantConv(filters // 4, (3, 3), strides=2, padding="SAME", use_bias=False, kernel_init=_he)(x)
        x = ops.relu(keras_batch_norm(train)(x))
        x = QuantDepthwiseConv2D((3, 3), strides=2, padding="SAME", use_bias=False,
                                 kernel_init=nn.initializers.glorot_uniform())(x)
        x = keras_batch_norm(train, use_scale=False, use_bias=False)(x)
        x = QuantConv(filters, (1, 1), use_bias=False, kernel_init=_he)(x)
        return keras_batch_norm(train)(x)

    def _residual_block(self, x, train: bool):
        sign = quantizers.SteSign(clip_value=CLIP_VALUE)
        y = QuantConv(x.shape[-1], (3, 3), padding="SAME", pad_values=1.0, input_quantizer=sign,
                      kernel_quantizer=sign, use_bias=False, kernel_init=_glorot)(x)
        y = keras_batch_norm(train, momentum=0.9, epsilon=1e-5)(ops.relu(y))
        return y + x

    def _transition_block(self, x, filters: int, strides: int, train: bool):
        x = ops.max_pool(ops.relu(x), (strides, strides), (1, 1))
        x = FixedDepthwiseConv2D((3, 3), strides=strides, padding="SAME")(x)
        x = QuantConv(filters, (1, 1), use_bias=False, kernel_init=_glorot)(x)
        return keras_batch_norm(train, momentum=0.9, epsilon=1e-5)(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(self.section_blocks) != len(self.section_filters):
            raise ValueError(f"section_blocks {self.section_blocks} and section_filters {self.section_filters} "
                             "need one entry per section.")
        x = self._stem(x, self.section_filters[0], train)
        for blocks, filters in zip(self.section_blocks, self.section_filters):
            for _ in range(blocks):
                if filters != x.shape[-1]:
                    x = self._transition_block(x, filters, 2, train)
                x = self._residual_block(x, train)
        if not self.include_top:
            return x
        x = global_pool(ops.relu(x))
        x = QuantDense(self.num_classes, kernel_init=_glorot)(x)
        return classifier_activation(x, self.classifier_activation)


class QuickNetSmall(QuickNet):
    """QuickNetSmall: 59.4 % top-1 / 81.8 % top-5 on ImageNet; narrower first sections."""

    section_filters: Sequence[int] = (32, 64, 256, 512)


class QuickNetLarge(QuickNet):
    """QuickNetLarge: 66.9 % top-1 / 87.0 % top-5 on ImageNet; more blocks per section."""

    section_blocks: Sequence[int] = (6, 8, 12, 6)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "QuickNet": {
        True: release("quicknet", "v1.0", "quicknet_weights.h5",
                      "8aba9e4e5f8d342faef04a0b2ae8e562da57dbb7d15162e8b3e091c951ba756c"),
        False: release("quicknet", "v1.0", "quicknet_weights_notop.h5",
                       "204414e438373f14f6056a1c098249f505a87dd238e18d3a47a9bd8b66227881"),
    },
    "QuickNetSmall": {
        True: release("quicknet", "v1.0", "quicknet_small_weights.h5",
                      "1ac3b07df7f5a911dd0b49febb2486428ddf1ca130297c403815dfae5a1c71a2"),
        False: release("quicknet", "v1.0", "quicknet_small_weights_notop.h5",
                       "be8ba657155846be355c5580d1ea56eaf8282616de065ffc39257202f9f164ea"),
    },
    "QuickNetLarge": {
        True: release("quicknet", "v1.0", "quicknet_large_weights.h5",
                      "c5158e8a59147b31370becd937825f4db8a5cdf308314874f678f596629be45c"),
        False: release("quicknet", "v1.0", "quicknet_large_weights_notop.h5",
                       "adcf154a2a8007e81bd6af77c035ffbf54cd6413b89a0ba294e23e76a82a1b78"),
    },
}
MODELS = {"QuickNet": QuickNet, "QuickNetSmall": QuickNetSmall, "QuickNetLarge": QuickNetLarge}
