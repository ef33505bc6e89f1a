"""Reusable architectures the experiments share."""

from __future__ import annotations

from typing import Callable, Sequence

from flax import linen as nn

from bnnjax.layers import BatchNorm, Flatten, GlobalAvgPool, MaxPool, QuantConv, QuantDense, keras_batch_norm

__all__ = ["LarqTutorialCNN", "BiRealBlock", "BiRealNet"]


class LarqTutorialCNN(nn.Module):
    """Larq's MNIST tutorial BNN (seed 000): 3 QuantConv + 2 QuantDense, ste_sign, BN(scale=False).

    The first conv keeps its input real and binarizes only its kernel; max-pool comes before BatchNorm;
    no biases. Returns logits (the tutorial's softmax lives in the loss). Kernels start Glorot-uniform,
    Keras' default.

    Reference: Larq documentation, "Introduction to BNNs with Larq" (seed 000).
    """

    num_classes: int = 10
    kernel_init: Callable = nn.initializers.glorot_uniform()

    @nn.compact
    def __call__(self, x, train: bool = False):
        binary = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False,
                      kernel_init=self.kernel_init)
        x = QuantConv(32, (3, 3), padding="VALID", kernel_quantizer="ste_sign", use_bias=False,
                      kernel_init=self.kernel_init)(x)
        x = keras_batch_norm(train, use_scale=False)(MaxPool((2, 2))(x))
        x = QuantConv(64, (3, 3), padding="VALID", **binary)(x)
        x = keras_batch_norm(train, use_scale=False)(MaxPool((2, 2))(x))
        x = QuantConv(64, (3, 3), padding="VALID", **binary)(x)
        x = keras_batch_norm(train, use_scale=False)(x)
        x = Flatten()(x)
        x = QuantDense(64, **binary)(x)
        x = keras_batch_norm(train, use_scale=False)(x)
        x = QuantDense(self.num_classes, **binary)(x)
        return keras_batch_norm(train, use_scale=False)(x)


class BiRealBlock(nn.Module):
    """One binary 3x3 conv with a real-valued shortcut around it (Bi-Real Net's building block).

    ``y = BN(QuantConv(approx_sign(x), magnitude_aware_sign(W))) + shortcut(x)``; when the shape changes
    the shortcut is average-pooling then a real 1x1 conv and BN (seed 002's advice for dimension changes).

    Reference: Liu et al., "Bi-Real Net", ECCV 2018 (arXiv:1808.00278).
    """

    features: int
    strides: int = 1
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda: BatchNorm(use_running_average=not train, momentum=self.momentum)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.strides != 1:
                # SAME, averaging only real pixels (Keras' AvgPool2D): matches the strided conv's output size
                shortcut = nn.avg_pool(shortcut, (self.strides, self.strides), (self.strides, self.strides),
                                       padding="SAME", count_include_pad=False)
            shortcut = bn()(nn.Conv(self.features, (1, 1), use_bias=False)(shortcut))
        y = QuantConv(self.features, (3, 3), strides=self.strides, padding="SAME", input_quantizer="approx_sign",
                      kernel_quantizer="magnitude_aware_sign", use_bias=False,
                      kernel_init=nn.initializers.glorot_normal())(x)
        return bn()(y) + shortcut


class BiRealNet(nn.Module):
    """Bi-Real-style ResNet: real stem and classifier, a shortcut around every binary conv.

    Stem: real 3x3 conv + BN; then the blocks; then global average pooling and a real dense layer.

    ``stage_sizes=(4, 4, 4, 4)`` and ``width=64`` give Bi-Real Net 18's 16 binary convolutions (for
    32x32 inputs the stem is a 3x3 conv without pooling).
    """

    stage_sizes: Sequence[int] = (4, 4, 4, 4)
    width: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9)(x)
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                x = BiRealBlock(self.width * 2 ** i, strides=2 if (i > 0 and j == 0) else 1)(x, train)
        # the real-valued block output is pooled as it is: modules only, so the packed exporter sees it all
        return nn.Dense(self.num_classes)(GlobalAvgPool()(x))
