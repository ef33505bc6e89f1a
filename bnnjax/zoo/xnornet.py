"""XNORNet (larq-zoo ``literature``), layer for layer as larq-zoo builds it.

An AlexNet-shaped network: a real 11x11 stem, then binary convolutions (ste_sign inputs, kernels binarized
by ``xnor_weight_scale``: a per-output-channel mean magnitude times the sign) each preceded by a
BatchNorm without scale, max-pooling after the stem and the second and fifth convolutions, and a 6x6
binary convolution to a 1x1 map of 4096 features. The top is a 1x1 binary convolution, BatchNorm, ReLU
and a real dense layer. Train the latent binary kernels with ``bnnjax.weight_clip(1.0)`` (larq-zoo's
``weight_clip`` constraint) and add larq-zoo's L2 penalty ``KERNEL_L2 * sum(w**2)`` on every kernel.

Reference: Rastegari et al., "XNOR-Net: ImageNet Classification Using Binary Convolutional Neural
Networks", ECCV 2016 (arXiv:1603.05279).
"""

from __future__ import annotations

from flax import linen as nn

from bnnjax.layers import QuantConv, QuantDense, keras_batch_norm
from bnnjax.zoo._base import classifier_activation, release

__all__ = ["XNORNet"]

CLIP_VALUE = 1.0
KERNEL_L2 = 5e-7  # Keras' l2(5e-7) on every conv and dense kernel: 5e-7 * sum(w**2) added to the loss
_glorot = nn.initializers.glorot_uniform()


class XNORNet(nn.Module):
    """XNOR-Net: 44.96 % top-1 / 69.18 % top-5 on ImageNet (larq-zoo's released weights).

    The top flattens the last feature map (1x1 at 224x224), so its dense kernel's shape follows the
    input size.

    Attributes:
      num_classes: classes of the top's dense layer.
      include_top: the 1x1 binary convolution, BatchNorm, ReLU, dense layer and softmax; without it the
        model returns the 1x1x4096 feature map.
      classifier_activation: ``"softmax"`` (larq-zoo's output) or None for logits (training).
    """

    num_classes: int = 1000
    include_top: bool = True
    classifier_activation: str | None = "softmax"

    def _binary_conv(self, x, features: int, kernel_size: int, padding: str = "SAME"):
        return QuantConv(features, (kernel_size, kernel_size), padding=padding, input_quantizer="ste_sign",
                         kernel_quantizer="xnor_weight_scale", use_bias=False, kernel_init=_glorot)(x)

    @nn.compact
    def __call__(self, x, train: bool = False):
        def bn(x, epsilon=1e-4):
            return keras_batch_norm(train, use_scale=False, momentum=0.9, epsilon=epsilon)(x)

        def pool(x):
            return nn.max_pool(x, (3, 3), (2, 2))

        x = QuantConv(96, (11, 11), strides=4, padding="SAME", use_bias=False, kernel_init=_glorot)(x)
        x = nn.relu(bn(x, epsilon=1e-5))
        x = bn(pool(x))
        x = bn(pool(self._binary_conv(x, 256, 5)))
        x = bn(self._binary_conv(x, 384, 3))
        x = bn(self._binary_conv(x, 384, 3))
        x = bn(pool(self._binary_conv(x, 256, 3)))
        x = bn(self._binary_conv(x, 4096, 6, padding="VALID"))
        if not self.include_top:
            return x
        x = nn.relu(bn(self._binary_conv(x, 4096, 1), epsilon=1e-3))
        x = x.reshape((x.shape[0], -1))
        x = QuantDense(self.num_classes, use_bias=False, kernel_init=_glorot)(x)
        return classifier_activation(x, self.classifier_activation)


# larq-zoo's released weights: {include_top: file}
WEIGHTS = {
    "XNORNet": {
        True: release("xnornet", "v0.2.0", "xnornet_weights.h5",
                      "e6ba24f785655260ae76a2ef1fab520e3528243d9c8fac430299cd81dbeabe10"),
        False: release("xnornet", "v0.2.1", "xnornet_weights_notop.h5",
                       "20a17423090b2c80c6b7a6b62346faa4b2b7dc8d4da99efa792c9351cf86c3d5"),
    },
}
MODELS = {"XNORNet": XNORNet}
