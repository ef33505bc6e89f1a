"""Reusable architectures the experiments share."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
from flax import linen as nn

from bnnjax.layers import Flatten, MaxPool, QuantConv, QuantDense

__all__ = ["LarqTutorialCNN", "keras_batch_norm"]


def keras_batch_norm(train: bool, use_scale: bool = True, momentum: float = 0.99, epsilon: float = 1e-3,
                     name: str | None = None) -> nn.BatchNorm:
    """``nn.BatchNorm`` with Keras' defaults (momentum 0.99, epsilon 1e-3), as Larq models use."""
    return nn.BatchNorm(use_running_average=not train, use_scale=use_scale, momentum=momentum,
                        epsilon=epsilon, name=name)


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
