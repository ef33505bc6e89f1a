"""The seed and paper architectures of :mod:`bnnjax.models`, written in Flax NNX.

Same layers, same order, same variables as the linen models (a linen model's variables load into the
NNX one with :func:`load_linen_variables`), so both train to the same numbers from the same start.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen
from flax import nnx
from flax import traverse_util

from bnnjax.nnx.layers import (BatchNorm, Flatten, GlobalAvgPool, MaxPool, QuantConv, QuantLinear, QuantParam,
                               keras_batch_norm)

__all__ = ["LarqTutorialCNN", "BiRealBlock", "BiRealNet", "load_linen_variables"]


class LarqTutorialCNN(nnx.Module):
    """Larq's MNIST tutorial BNN (seed 000) in NNX: 3 QuantConv + 2 QuantLinear, ste_sign,
    BatchNorm(scale=False); see :class:`bnnjax.models.LarqTutorialCNN`.

    Args:
      input_shape: ``(height, width, channels)`` of the images (the dense layer's input size follows).
      num_classes: outputs.
      kernel_init: Keras' Glorot-uniform by default.

    Reference: Larq documentation, "Introduction to BNNs with Larq" (seed 000).
    """

    def __init__(self, input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
                 kernel_init: Callable = nnx.initializers.glorot_uniform(), *, rngs: nnx.Rngs):
        h, w, c = input_shape
        binary = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False,
                      kernel_init=kernel_init, rngs=rngs)
        bn = lambda n: keras_batch_norm(n, use_scale=False, rngs=rngs)
        self.conv1 = QuantConv(c, 32, (3, 3), padding="VALID", kernel_quantizer="ste_sign", use_bias=False,
                               kernel_init=kernel_init, rngs=rngs)
        self.pool1, self.bn1 = MaxPool((2, 2)), bn(32)
        self.conv2 = QuantConv(32, 64, (3, 3), padding="VALID", **binary)
        self.pool2, self.bn2 = MaxPool((2, 2)), bn(64)
        self.conv3 = QuantConv(64, 64, (3, 3), padding="VALID", **binary)
        self.bn3 = bn(64)
        self.flatten = Flatten()
        h, w = ((h - 2) // 2 - 2) // 2 - 2, ((w - 2) // 2 - 2) // 2 - 2
        self.dense1 = QuantLinear(h * w * 64, 64, **binary)
        self.bn4 = bn(64)
        self.dense2 = QuantLinear(64, num_classes, **binary)
        self.bn5 = bn(num_classes)

    def __call__(self, x):
        x = self.bn1(self.pool1(self.conv1(x)))
        x = self.bn2(self.pool2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        x = self.bn4(self.dense1(self.flatten(x)))
        return self.bn5(self.dense2(x))


class BiRealBlock(nnx.Module):
    """One binary 3x3 conv with a real-valued shortcut around it (Bi-Real Net's building block), in NNX;
    see :class:`bnnjax.models.BiRealBlock`.

    Reference: Liu et al., "Bi-Real Net", ECCV 2018 (arXiv:1808.00278).
    """

    def __init__(self, in_features: int, features: int, strides: int = 1, momentum: float = 0.9, *,
                 rngs: nnx.Rngs):
        self.strides = strides
        if strides != 1 or in_features != features:
            self.shortcut_conv = nnx.Conv(in_features, features, (1, 1), use_bias=False, rngs=rngs)
            self.shortcut_bn = BatchNorm(features, momentum=momentum, rngs=rngs)
        else:
            self.shortcut_conv = self.shortcut_bn = nnx.data(None)
        self.conv = QuantConv(in_features, features, (3, 3), strides=strides, padding="SAME",
                              input_quantizer="approx_sign", kernel_quantizer="magnitude_aware_sign", use_bias=False,
                              kernel_init=nnx.initializers.glorot_normal(), rngs=rngs)
        self.bn = BatchNorm(features, momentum=momentum, rngs=rngs)

    def __call__(self, x):
        shortcut = x
        if self.shortcut_conv is not None:
            if self.strides != 1:
                # SAME, averaging only real pixels (Keras' AvgPool2D): matches the strided conv's output size
                s = (self.strides, self.strides)
                shortcut = linen.avg_pool(shortcut, s, s, padding="SAME", count_include_pad=False)
            shortcut = self.shortcut_bn(self.shortcut_conv(shortcut))
        return self.bn(self.conv(x)) + shortcut


class BiRealNet(nnx.Module):
    """Bi-Real-style ResNet in NNX: real stem and classifier, a shortcut around every binary conv; see
    :class:`bnnjax.models.BiRealNet`."""

    def __init__(self, stage_sizes: Sequence[int] = (4, 4, 4, 4), width: int = 64, num_classes: int = 10,
                 in_features: int = 3, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_features, width, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = BatchNorm(width, momentum=0.9, rngs=rngs)
        blocks, c = [], width
        for i, n in enumerate(stage_sizes):
            for j in range(n):
                blocks.append(BiRealBlock(c, width * 2 ** i, strides=2 if (i > 0 and j == 0) else 1, rngs=rngs))
                c = width * 2 ** i
        self.blocks = nnx.List(blocks)
        self.pool = GlobalAvgPool()
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.stem_bn(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x))


def load_linen_variables(model: nnx.Module, linen_module: linen.Module, variables: dict, example_input) -> nnx.Module:
    """Set an NNX model's variables from a linen model's of the same architecture, layer by layer.

    The NNX modules that hold variables and the linen modules that do, each in the order their model
    calls them on ``example_input``, are paired; each NNX module takes its twin's variables by name
    (kernels, biases, BatchNorm scales and statistics, constants), shapes and quantization tags checked.
    Returns ``model`` (changed in place).

    Raises:
      ValueError: a different number of layers, or a name, shape or tag that differs (names both).
    """
    from bnnjax import _trace

    x = jax.ShapeDtypeStruct(jnp.shape(example_input), jnp.result_type(example_input))
    _, calls = _trace.linen_calls(lambda: jax.eval_shape(linen_module.apply, variables, x))
    by_path = _linen_layers(variables)
    linen_layers, seen = [], set()
    for c in calls:
        if c.path in by_path and c.path not in seen:
            seen.add(c.path)
            linen_layers.append((c.path, by_path[c.path]))
    nnx_layers, seen = [], set()
    for call in _trace.nnx_calls(model, example_input):
        module = _at(model, call.path)
        if id(module) not in seen and any(isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)
                                          for v in vars(module).values()):
            seen.add(id(module))
            nnx_layers.append((call.path, module))
    if len(linen_layers) != len(nnx_layers):
        raise ValueError(f"the linen model has {len(linen_layers)} layers with variables, the NNX model "
                         f"{len(nnx_layers)}.")
    for (lpath, lvars), (npath, module) in zip(linen_layers, nnx_layers):
        for name, value in lvars.items():
            var = getattr(module, name, None)
            where = f"linen {'/'.join(lpath) or '(top)'}/{name} -> NNX {'.'.join(map(str, npath)) or '(top)'}.{name}"
            if not isinstance(var, nnx.Variable):
                raise ValueError(f"{where}: the NNX layer has no variable {name!r}.")
            boxed = hasattr(value, "unbox")
            value = value.unbox() if boxed else value
            if tuple(var.get_value().shape) != tuple(value.shape):
                raise ValueError(f"{where}: shape {tuple(value.shape)} does not fit {tuple(var.get_value().shape)}.")
            if isinstance(var, QuantParam) != boxed:
                raise ValueError(f"{where}: one is a quantized kernel, the other is not.")
            var.set_value(value)
    return model


def _at(model, path):
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def _linen_layers(variables: dict) -> dict[tuple, dict]:
    """``{module path: {name: leaf}}`` of every linen module holding variables."""
    layers: dict[tuple, dict] = {}
    for collection, tree in variables.items():
        for path, leaf in traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, x: not isinstance(x, dict)).items():
            layers.setdefault(path[:-1], {})[path[-1]] = leaf
    return layers
