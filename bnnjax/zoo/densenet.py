"""BinaryDenseNet28, 37, 37Dilated and 45 (larq-zoo ``literature``), layer for layer as larq-zoo builds them.

Densely connected binary blocks: BatchNorm, then a binary 3x3 convolution (ste_sign with clip 1.3 on
inputs and kernels, zero-padding, optionally dilated) producing ``growth_rate`` channels that are
concatenated to the block's input. Between sections a real transition (BatchNorm, 2x2 max-pool unless
the next section is dilated, ReLU, 1x1 convolution reducing the channels). A real stem (7x7 strided
convolution, BatchNorm, ReLU, 3x3 strided max-pool; a single 3x3 convolution for inputs smaller than
50 pixels) and a BatchNorm, ReLU, global pooling, dense top. Train the latent binary kernels with
``bnnjax.weight_clip(1.3)`` (larq-zoo's ``WeightClip(clip_value=1.3)`` constraint).

Reference: Bethge et al., "Back to Simplicity: How to Train Accurate BNNs from Scratch?",
arXiv:1906.08637 (2019).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from bnnjax import quantizers
from bnnjax.layers import BatchNorm, QuantConv, QuantDense, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, global_pool, release

__all__ = ["BinaryDenseNet28", "BinaryDenseNet37", "BinaryDenseNet37Dilated", "BinaryDenseNet45"]

CLIP_VALUE = 1.3
_he = nn.initializers.he_normal()
_glorot = nn.initializers.glorot_normal()


def _bn(train: bool) -> BatchNorm:
    return keras_batch_norm(train, momentum=0.9, epsilon=1e-5)


def _transition_filters(channels: int, reduction: float) -> int:
    # larq-zoo's exact expression: float floor division, then Python's round-half-to-even to a multiple of 32.
    return round(channels // reduction / 32) * 32


class BinaryDenseNet28(nn.Module):
    """BinaryDenseNet28: 60.91 % top-1 / 82.83 % top-5 on ImageNet (larq-zoo's released weights).

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the global pooling, dense layer and softmax; without it the model returns the
        feature map after the final BatchNorm and ReLU.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      initial_filters: channels of the stem convolution.
      growth_rate: channels each densely connected block adds.
      reduction: per transition, the factor the channels are divided by (then rounded to a multiple of 32).
      dilation_rate: per section, the dilation of its binary convolutions; a transition into a section
        with dilation other than 1 keeps the resolution (no max-pool).
      layers: densely connected blocks per section.
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    initial_filters: int = 64
    growth_rate: int = 64
    reduction: Sequence[float] = (2.7, 2.7, 2.2)
    dilation_rate: Sequence[int] = (1, 1, 1, 1)
    layers: Sequence[int] = (6, 6, 6, 5)

    def _stem(self, x, train: bool):
        # larq-zoo switches to a CIFAR-style stem for small images.
        if x.shape[1] < 50:
            return QuantConv(self.initial_filters, (3, 3), padding="SAME", use_bias=False, kernel_init=_he)(x)
        x = QuantConv(self.initial_filters, (7, 7), strides=2, padding="SAME", use_bias=False, kernel_init=_he)(x)
        x = nn.relu(_bn(train)(x))
        return nn.max_pool(x, (3, 3), (2, 2), padding="SAME")

    def _densely_connected_block(self, x, dilation: int, train: bool):
        sign = quantizers.SteSign(clip_value=CLIP_VALUE)
        y = _bn(train)(x)
        y = QuantConv(self.growth_rate, (3, 3), padding="SAME", kernel_dilation=dilation, input_quantizer=sign,
                      kernel_quantizer=sign, use_bias=False, kernel_init=_glorot)(y)
        return jnp.concatenate([x, y], axis=-1)

    def _transition_block(self, x, reduction: float, pool: bool, train: bool):
        x = _bn(train)(x)
        if pool:
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(x)
        return QuantConv(_transition_filters(x.shape[-1], reduction), (1, 1), use_bias=False, kernel_init=_he)(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        sections = len(self.layers)
        if len(self.dilation_rate) != sections or len(self.reduction) != sections - 1:
            raise ValueError(f"layers {self.layers} needs one dilation_rate per section (got {self.dilation_rate}) "
                             f"and one reduction per transition (got {self.reduction}).")
        x = self._stem(x, train)
        for block, blocks in enumerate(self.layers):
            for _ in range(blocks):
                x = self._densely_connected_block(x, self.dilation_rate[block], train)
            if block < sections - 1:
                x = self._transition_block(x, self.reduction[block], self.dilation_rate[block + 1] == 1, train)
        x = nn.relu(_bn(train)(x))
        if not self.include_top:
            return x
        x = QuantDense(self.num_classes, kernel_init=_he)(global_pool(x))
        return classifier_activation(x, self.classifier_activation)


class BinaryDenseNet37(BinaryDenseNet28):
    """BinaryDenseNet37: 62.89 % top-1 / 84.19 % top-5 on ImageNet; deeper sections, stronger reduction."""

    reduction: Sequence[float] = (3.3, 3.3, 4)
    layers: Sequence[int] = (6, 8, 12, 6)


class BinaryDenseNet37Dilated(BinaryDenseNet37):
    """BinaryDenseNet37Dilated: 64.34 % top-1 / 85.15 % top-5 on ImageNet; the last two sections are
    dilated (rates 2 and 4) instead of downsampled, so the final feature map is 28x28 at 224x224 input."""

    dilation_rate: Sequence[int] = (1, 1, 2, 4)


class BinaryDenseNet45(BinaryDenseNet28):
    """BinaryDenseNet45: 64.59 % top-1 / 85.21 % top-5 on ImageNet; the deepest variant."""

    reduction: Sequence[float] = (2.7, 3.3, 4)
    layers: Sequence[int] = (6, 12, 14, 8)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "BinaryDenseNet28": {
        True: release("binary_densenet", "v0.1.0", "binary_densenet_28_weights.h5",
                      "21fe3ca03eed244df9c41a2219876fcf03e73800932ec96a3e2a76af4747ac53"),
        False: release("binary_densenet", "v0.1.0", "binary_densenet_28_weights_notop.h5",
                       "a376df1e41772c4427edd1856072b934a89bf293bf911438bf6f751a9b2a28f5"),
    },
    "BinaryDenseNet37": {
        True: release("binary_densenet", "v0.1.0", "binary_densenet_37_weights.h5",
                      "8056a5d52c3ed86a934893987d09a06f59a5166aa9bddcaedb050f111d0a7d76"),
        False: release("binary_densenet", "v0.1.0", "binary_densenet_37_weights_notop.h5",
                       "4e12bca9fd27580a5b833241c4eb35d6cc332878c406048e6ca8dbbc78d59175"),
    },
    "BinaryDenseNet37Dilated": {
        True: release("binary_densenet", "v0.1.0", "binary_densenet_37_dilated_weights.h5",
                      "15c1bcd79b8dc22971382fbf79acf364a3f51049d0e584a11533e6fdbb7363d3"),
        # larq-zoo re-released this one file in v0.1.1.
        False: release("binary_densenet", "v0.1.1", "binary_densenet_37_dilated_weights_notop.h5",
                       "8b31fbfdc8de08a46c6adcda1ced48ace0a2ff0ce45a05c72b2acc27901dd88b"),
    },
    "BinaryDenseNet45": {
        True: release("binary_densenet", "v0.1.0", "binary_densenet_45_weights.h5",
                      "d00a0d26fbd2dba1bfba8c0306c770f3aeea5c370e99f963bb239bd916f72c37"),
        False: release("binary_densenet", "v0.1.0", "binary_densenet_45_weights_notop.h5",
                       "e72d5cc6b0afe4612f8be7b1f9bb48a53ba2c8468b57bf1266d2900c99fd2adf"),
    },
}
MODELS = {"BinaryDenseNet28": BinaryDenseNet28, "BinaryDenseNet37": BinaryDenseNet37,
          "BinaryDenseNet37Dilated": BinaryDenseNet37Dilated, "BinaryDenseNet45": BinaryDenseNet45}
