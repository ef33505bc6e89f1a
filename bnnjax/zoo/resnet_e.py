"""BinaryResNetE18 (larq-zoo ``literature``), layer for layer as larq-zoo builds it.

Binary ResNet-E: a ResNet whose every binary 3x3 convolution (ste_sign with clip 1.25 on inputs and
kernels, zero-padding) is followed by BatchNorm and its own shortcut; where the width changes the
convolution has stride 2 (except in the first section) and the shortcut is a 2x2 average pool, a 1x1
real convolution and BatchNorm. A real stem (7x7 strided convolution, BatchNorm, ReLU, 3x3 strided
max-pool, BatchNorm; a single 3x3 convolution for inputs smaller than 50 pixels), a final ReLU and a
global pooling, dense top. Train the latent binary kernels with ``bnnjax.weight_clip(1.25)`` (larq-zoo's
``WeightClip(clip_value=1.25)`` constraint).

Reference: Bethge et al., "Back to Simplicity: How to Train Accurate BNNs from Scratch?",
arXiv:1906.08637 (2019).
"""

from __future__ import annotations

from flax import linen as nn

from bnnjax import quantizers
from bnnjax.layers import BatchNorm, QuantConv, QuantDense, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, global_pool, release

__all__ = ["BinaryResNetE18"]

CLIP_VALUE = 1.25
_he = nn.initializers.he_normal()
_glorot = nn.initializers.glorot_normal()

# num_layers: (binary blocks per section before doubling, channels per section), as larq-zoo's spec
_SPECS = {
    18: ((2, 2, 2, 2), (64, 128, 256, 512)),
    34: ((3, 4, 6, 3), (64, 128, 256, 512)),
    50: ((3, 4, 6, 3), (256, 512, 1024, 2048)),
    101: ((3, 4, 23, 3), (256, 512, 1024, 2048)),
    152: ((3, 8, 36, 3), (256, 512, 1024, 2048)),
}


def _bn(train: bool) -> BatchNorm:
    return keras_batch_norm(train, momentum=0.9, epsilon=1e-5)


class BinaryResNetE18(nn.Module):
    """BinaryResNetE18: 58.32 % top-1 / 80.79 % top-5 on ImageNet (larq-zoo's released weights).

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the global pooling, dense layer and softmax; without it the model returns the
        feature map after the final ReLU.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
      num_layers: the ResNet depth whose sections it follows (18, 34, 50, 101 or 152); each section has
        twice that ResNet's blocks, one binary convolution each.
      initial_filters: channels of the stem convolution.
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"
    num_layers: int = 18
    initial_filters: int = 64

    def _residual_block(self, x, filters: int, strides: int, train: bool):
        sign = quantizers.SteSign(clip_value=CLIP_VALUE)
        y = QuantConv(filters, (3, 3), strides=strides, padding="SAME", input_quantizer=sign,
                      kernel_quantizer=sign, use_bias=False, kernel_init=_glorot)(x)
        if x.shape[-1] == filters:
            return _bn(train)(y) + x
        # Keras lists a functional model's layers by depth, so the weights file has the binary conv, then
        # the shortcut conv, then the binary conv's BatchNorm before the shortcut's: call them in that order.
        shortcut = nn.avg_pool(x, (2, 2), (2, 2))
        shortcut = QuantConv(filters, (1, 1), use_bias=False, kernel_init=_glorot)(shortcut)
        y = _bn(train)(y)
        return y + _bn(train)(shortcut)

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.num_layers not in _SPECS:
            raise ValueError(f"num_layers must be one of {list(_SPECS)}, got {self.num_layers}.")
        if x.shape[1] < 50:
            x = QuantConv(self.initial_filters, (3, 3), padding="SAME", use_bias=False, kernel_init=_he)(x)
        else:
            x = QuantConv(self.initial_filters, (7, 7), strides=2, padding="SAME", use_bias=False,
                          kernel_init=_he)(x)
            x = nn.max_pool(nn.relu(_bn(train)(x)), (3, 3), (2, 2), padding="SAME")
            x = _bn(train)(x)
        for section, (blocks, filters) in enumerate(zip(*_SPECS[self.num_layers])):
            for block in range(2 * blocks):
                x = self._residual_block(x, filters, 2 if section > 0 and block == 0 else 1, train)
        x = nn.relu(x)
        if not self.include_top:
            return x
        x = QuantDense(self.num_classes, kernel_init=_glorot)(global_pool(x))
        return classifier_activation(x, self.classifier_activation)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "BinaryResNetE18": {
        True: release("resnet_e", "v0.1.0", "resnet_e_18_weights.h5",
                      "bde4a64d42c164a7b10a28debbe1ad5b287c499bc0247ecb00449e6e89f3bf5b"),
        False: release("resnet_e", "v0.1.0", "resnet_e_18_weights_notop.h5",
                       "14cb037e47d223827a8d09db88ec73d60e4153a4464dca847e5ae1a155e7f525"),
    },
}
MODELS = {"BinaryResNetE18": BinaryResNetE18}
