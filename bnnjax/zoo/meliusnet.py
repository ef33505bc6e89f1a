"""MeliusNet22 (larq-zoo ``literature``), layer for layer as larq-zoo builds it.

Blocks of a dense block (BatchNorm, binary 3x3 conv with 64 filters, concatenated to its input) and an
improvement block (BatchNorm, binary 3x3 conv with 64 filters, added to the last 64 channels of its
input); between sections a real transition (BatchNorm, 2x2 max-pool, ReLU, 1x1 conv). The stem is a real
strided 3x3 conv and two grouped 3x3 convs, then a max-pool; the head is BatchNorm, ReLU, global pooling
and a dense layer. Binary convs quantize inputs and kernels with ``ste_sign`` clipped at 1.3 and pad
with zeros; train their latent kernels with ``bnnjax.weight_clip(1.3)`` (larq-zoo's
``WeightClip(1.3)`` constraint).

Reference: Bethge et al., "MeliusNet: Can Binary Neural Networks Achieve MobileNet-level Accuracy?",
arXiv:2001.05936, 2020.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from bnnjax import quantizers
from bnnjax.layers import QuantConv, QuantDense, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, global_pool, release

__all__ = ["MeliusNet22"]

CLIP_VALUE = 1.3
_glorot = nn.initializers.glorot_normal()


class _SplitGroupConv(nn.Module):
    """A grouped convolution built as larq-zoo builds it: one conv per channel slice, concatenated.

    Equals one convolution with ``feature_group_count=groups`` whose kernel is the slices' kernels
    concatenated along the output axis; kept as separate convs (``conv0``, ``conv1``, ...) so each maps
    to one Keras layer of larq-zoo's weight files. Stride 1, "same" padding, no bias.
    """

    features: int
    kernel_size: Sequence[int]
    groups: int

    @nn.compact
    def __call__(self, x):
        if self.features % self.groups or x.shape[-1] % self.groups:
            raise ValueError(f"input channels ({x.shape[-1]}) and features ({self.features}) must be divisible "
                             f"by groups ({self.groups}).")
        slices = jnp.split(x, self.groups, axis=-1)
        return jnp.concatenate([
            QuantConv(self.features // self.groups, self.kernel_size, padding="SAME", use_bias=False,
                      kernel_init=_glorot, name=f"conv{i}")(s)
            for i, s in enumerate(slices)], axis=-1)


class MeliusNet22(nn.Module):
    """MeliusNet22: 62.4 % top-1 / 83.9 % top-5 on ImageNet (larq-zoo's released weights).

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the global pooling, dense layer and softmax; without it the model returns the
        head's BatchNorm and ReLU output (as larq-zoo's does).
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      num_blocks: dense+improvement blocks per section.
      transition_features: channels of the transition after each section (None: no transition).
      batch_norm_momentum: momentum of every BatchNorm (epsilon is 1e-5).
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    num_blocks: Sequence[int] = (4, 5, 4, 4)
    transition_features: Sequence[int | None] = (160, 224, 256, None)
    batch_norm_momentum: float = 0.9

    def _norm(self, x, train: bool, name: str):
        return keras_batch_norm(train, momentum=self.batch_norm_momentum, epsilon=1e-5, name=name)(x)

    def _binary_conv(self, x, name: str):
        sign = quantizers.SteSign(clip_value=CLIP_VALUE)
        return QuantConv(64, (3, 3), padding="SAME", input_quantizer=sign, kernel_quantizer=sign,
                         use_bias=False, kernel_init=_glorot, name=name)(x)

    def _stem(self, x, train: bool):
        x = QuantConv(32, (3, 3), strides=2, padding="SAME", use_bias=False, kernel_init=_glorot,
                      name="stem_s0_conv")(x)
        x = nn.relu(self._norm(x, train, "stem_s0_bn"))
        x = _SplitGroupConv(32, (3, 3), groups=4, name="stem_s1_groupconv")(x)
        x = nn.relu(self._norm(x, train, "stem_s1_bn"))
        x = _SplitGroupConv(64, (3, 3), groups=8, name="stem_s2_groupconv")(x)
        x = nn.relu(self._norm(x, train, "stem_s2_bn"))
        return nn.max_pool(x, (2, 2), (2, 2), padding="SAME")

    def _dense_block(self, x, train: bool, name: str):
        w = self._binary_conv(self._norm(x, train, f"{name}_bn"), f"{name}_binconv")
        return jnp.concatenate([x, w], axis=-1)

    def _improvement_block(self, x, train: bool, name: str):
        w = self._binary_conv(self._norm(x, train, f"{name}_bn"), f"{name}_binconv")
        return x.at[..., -w.shape[-1]:].add(w)

    def _transition_block(self, x, filters: int, train: bool, name: str):
        x = self._norm(x, train, f"{name}_bn")
        x = nn.relu(nn.max_pool(x, (2, 2), (2, 2), padding="SAME"))
        return QuantConv(filters, (1, 1), use_bias=False, kernel_init=_glorot, name=f"{name}_pw")(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(self.num_blocks) != len(self.transition_features):
            raise ValueError(f"num_blocks {self.num_blocks} and transition_features {self.transition_features} "
                             "need one entry per section.")
        x = self._stem(x, train)
        for i, (blocks, filters) in enumerate(zip(self.num_blocks, self.transition_features)):
            for j in range(blocks):
                x = self._dense_block(x, train, f"section_{i}_block_{j}_dense")
                x = self._improvement_block(x, train, f"section_{i}_block_{j}_improve")
            if filters:
                x = self._transition_block(x, filters, train, f"section_{i}_transition")
        x = nn.relu(self._norm(x, train, "head_bn"))
        if not self.include_top:
            return x
        x = QuantDense(self.num_classes, kernel_init=_glorot, name="head_dense")(global_pool(x))
        return classifier_activation(x, self.classifier_activation)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "MeliusNet22": {
        True: release("meliusnet22", "v0.1.0", "meliusnet22_weights.h5",
                      "c1ba85e8389ae326009665ec13331e49fc3df4d0f925fa8553e224f7362c18ed"),
        False: release("meliusnet22", "v0.1.1", "meliusnet22_weights_notop.h5",
                       "abfc5c50049d72a14e44df0c1cb73896ece2a1ab4bf9bb48fede6cc2f5e0b58f"),
    },
}
MODELS = {"MeliusNet22": MeliusNet22}
