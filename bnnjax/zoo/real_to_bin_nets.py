"""RealToBinaryNet (larq-zoo ``literature``), layer for layer as larq-zoo builds it.

The BNN variant of the Real-to-Binary network, larq-zoo's ``RealToBinNetBNNFactory``: a real stem
(strided 7x7 conv, BatchNorm, PReLU, 3x3 max-pool), eight blocks of two binary half-blocks and a dense
classifier. A half-block is BatchNorm, a 3x3 binary convolution (ste_sign on inputs and kernels, zero
padding) whose output is scaled per channel by a data-dependent gate (global average pool of the
convolution's input, dense reduce by ``scaling_r`` with ReLU, dense expand with sigmoid), then PReLU
and a shortcut add; where the width doubles, the shortcut is a 2x2 average pool, 1x1 conv and BatchNorm.
Train the latent binary kernels with ``bnnjax.weight_clip(1.0)`` (larq-zoo's ``"weight_clip"``
constraint, Larq's ``WeightClip()`` default).

Reference: Martinez et al., "Training Binary Neural Networks with Real-to-Binary Convolutions",
ICLR 2020 (arXiv:2003.11535).
"""

from __future__ import annotations

from flax import linen as nn

from bnnjax.layers import PReLU, QuantConv, QuantDense, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, global_pool, release

__all__ = ["RealToBinaryNet"]

CLIP_VALUE = 1.0
_glorot = nn.initializers.glorot_normal()
_he = nn.initializers.he_normal()


class _HalfBinaryBlock(nn.Module):
    """One binary half-block: BatchNorm, gated binary 3x3 conv, PReLU, shortcut add.

    Sub-modules are called in the order Keras lists the layers in the weights file (BatchNorm, gate,
    conv, shortcut conv, PReLU, shortcut BatchNorm), which is what the layer-order weight matching
    needs; the arithmetic is the same as in any other order.
    """

    features: int
    strides: int = 1
    scaling_r: int = 8
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv_input = keras_batch_norm(train, momentum=self.momentum)(x)
        z = global_pool(conv_input)
        z = nn.relu(QuantDense(x.shape[-1] // self.scaling_r, use_bias=False, kernel_init=_he)(z))
        gate = nn.sigmoid(QuantDense(self.features, use_bias=False, kernel_init=_he)(z))
        y = QuantConv(self.features, (3, 3), strides=self.strides, padding="SAME", input_quantizer="ste_sign",
                      kernel_quantizer="ste_sign", use_bias=False, kernel_init=_glorot)(conv_input)
        shortcut = x
        if self.features != x.shape[-1]:
            # Keras' AvgPool2D(padding="same") averages only the in-bounds taps at odd sizes.
            shortcut = nn.avg_pool(x, (2, 2), (2, 2), padding="SAME", count_include_pad=False)
            shortcut = QuantConv(self.features, (1, 1), use_bias=False, kernel_init=_glorot)(shortcut)
        y = PReLU(shared_axes=(1, 2))(y * gate[:, None, None, :])
        if self.features != x.shape[-1]:
            shortcut = keras_batch_norm(train, momentum=self.momentum)(shortcut)
        return y + shortcut


class RealToBinaryNet(nn.Module):
    """RealToBinaryNet: 65.01 % top-1 / 85.72 % top-5 on ImageNet (larq-zoo's released weights).

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the global pooling, dense layer and softmax; without it the model returns the last
        block's feature map.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      scaling_r: channel reduction of the gates' first dense layer.
      momentum: BatchNorm momentum (Keras convention).
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    scaling_r: int = 8
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantConv(64, (7, 7), strides=2, padding="SAME", use_bias=False, kernel_init=_glorot)(x)
        x = keras_batch_norm(train, momentum=self.momentum)(x)
        x = PReLU(shared_axes=(1, 2))(x)
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for block in range(2, 10):
            downsample = block % 2 == 0 and block > 3
            features = x.shape[-1] * (2 if downsample else 1)
            for half, strides in (("a", 2 if downsample else 1), ("b", 1)):
                x = _HalfBinaryBlock(features, strides, self.scaling_r, self.momentum,
                                     name=f"block_{block}{half}")(x, train)
        if not self.include_top:
            return x
        x = QuantDense(self.num_classes, kernel_init=nn.initializers.glorot_uniform())(global_pool(x))
        return classifier_activation(x, self.classifier_activation)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "RealToBinaryNet": {
        True: release("r2b", "v0.1.0", "r2b_weights.h5",
                      "e8fd16ca1ab9810ac3835f24f5c62758a57bc32a615f73aaa50d382d2b9617e1"),
        False: release("r2b", "v0.1.0", "r2b_weights_notop.h5",
                       "4ec47abf1a4da5c65f4908076257e8d5c812673891089a88c9d9e84e949d1dab"),
    },
}
MODELS = {"RealToBinaryNet": RealToBinaryNet}
