"""Quantized Flax NNX layers: drop-in replacements for ``nnx.Linear`` and ``nnx.Conv``.

Each layer takes Flax NNX's constructor arguments (``in_features, out_features, *, ..., rngs``) plus
``input_quantizer`` / ``kernel_quantizer``, creates its variables and calls the same pure function
as the linen layer of :mod:`bnnjax.layers` (:func:`bnnjax.ops.quant_dense`, :func:`bnnjax.ops.quant_conv`,
...): the arithmetic, the packed training forward and packed inference exist once. A quantized latent
kernel is a :class:`QuantParam` (an ``nnx.Param`` that records its bit width), so
``nnx.state(model, QuantParam)`` selects exactly the binary kernels and ``nnx.Param`` still selects
everything trainable.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bnnjax import layers as _linen
from bnnjax import ops, quantizers

__all__ = ["QuantParam", "Constant", "QuantLinear", "QuantConv", "QuantDepthwiseConv", "ABCLinear", "ABCConv",
           "BatchNorm", "keras_batch_norm", "PReLU", "FixedDepthwiseConv", "MaxPool", "Flatten", "GlobalAvgPool",
           "Activation"]

QuantizerLike = _linen.QuantizerLike
PaddingLike = _linen.PaddingLike
_default_kernel_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()


class QuantParam(nnx.Param):
    """A latent kernel tagged with its quantized bit width: an ``nnx.Param`` with metadata.

    Metadata (read as attributes): ``precision`` (bits per weight after quantization, 1 for binary
    kernels), ``quantizer`` (the kernel quantizer's name) and ``packable`` (the layer runs this kernel on
    packed bits, what ``bnnjax.export.pack`` packs). The NNX twin of :class:`bnnjax.layers.QuantParam`.
    """


class Constant(nnx.Variable):
    """A fixed array a layer uses but never trains (QuickNet's blur-pool kernel): linen's ``"constants"``
    collection. ``nnx.Param`` does not select it, so optimizers never see it; checkpoints, weight files
    and summaries do."""


# linen <-> NNX: the collection name of each variable type (used by flax's bridge and bnnjax's)
if nnx.variablelib.VariableTypeCache.get("constants") is not Constant:
    nnx.register_variable_name("constants", Constant, overwrite=True)


def _value(v):
    """A variable's value (None for an absent optional variable)."""
    return None if v is None else v.get_value()


def _kernel_variable(value, q: quantizers.Quantizer, precision: int | None = None, packable: bool = False):
    if q.precision is None and precision is None:
        return nnx.Param(value)
    return QuantParam(value, precision=precision or q.precision, quantizer=q.name, packable=packable)


def _bias_variable(use_bias: bool, init, rngs: nnx.Rngs, features: int, dtype):
    return nnx.Param(init(rngs.params(), (features,), dtype)) if use_bias else nnx.data(None)


def _tuple(v, n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


class _Quantized(nnx.Module):
    """What the quantized layers share: quantizers, the stochastic quantizers' RNG stream and the
    ``deterministic`` switch that ``model.train()`` / ``model.eval()`` set."""

    def _init_quantizers(self, input_quantizer, kernel_quantizer, rngs: nnx.Rngs, deterministic: bool):
        self.input_quantizer = quantizers.get(input_quantizer)
        self.kernel_quantizer = quantizers.get(kernel_quantizer)
        stochastic = self.input_quantizer.needs_rng or self.kernel_quantizer.needs_rng
        # the stream exists only for stochastic quantizers: a deterministic layer's state holds no key
        self.rngs = rngs["quantizer"].fork() if stochastic else nnx.data(None)
        self.deterministic = deterministic

    def _rng(self):
        # evaluation (deterministic): BinaryConnect's deterministic binarization, as linen without a
        # 'quantizer' RNG stream
        return None if self.rngs is None or self.deterministic else self.rngs()

    def set_view(self, deterministic: bool | None = None):
        """For ``nnx.view``: ``deterministic=True`` evaluates stochastic quantizers deterministically."""
        if deterministic is not None:
            self.deterministic = deterministic


class QuantLinear(_Quantized):
    """A linear layer with quantized inputs and kernel: ``y = q_in(x) @ q_k(W) + b``
    (:func:`bnnjax.ops.quant_dense`).

    Arguments are ``nnx.Linear``'s plus ``input_quantizer`` and ``kernel_quantizer`` (a name from
    ``bnnjax.quantizers.names()``, a callable, a ``Quantizer``, or None for full precision). The latent
    kernel ``(in_features, out_features)`` stays full precision; quantized, it is a :class:`QuantParam`.
    Stochastic quantizers draw from the ``"quantizer"`` stream of ``rngs`` (else its default stream) in
    training mode and binarize deterministically after ``model.eval()``.

    Reference: Larq's ``QuantDense`` (Geiger & Team, JOSS 2020).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None, kernel_init: Callable = _default_kernel_init,
                 bias_init: Callable = _zeros, input_quantizer: QuantizerLike = None,
                 kernel_quantizer: QuantizerLike = None, deterministic: bool = False, rngs: nnx.Rngs):
        self._init_quantizers(input_quantizer, kernel_quantizer, rngs, deterministic)
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.dtype, self.param_dtype, self.precision = use_bias, dtype, param_dtype, precision
        self.kernel = _kernel_variable(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                                       self.kernel_quantizer,
                                       packable=ops.packs_dense(self.input_quantizer, self.kernel_quantizer))
        self.bias = _bias_variable(use_bias, bias_init, rngs, out_features, param_dtype)

    def __call__(self, inputs):
        return ops.quant_dense(inputs, _value(self.kernel), _value(self.bias), input_quantizer=self.input_quantizer,
                               kernel_quantizer=self.kernel_quantizer, precision=self.precision, dtype=self.dtype,
                               rng=self._rng())


class QuantConv(_Quantized):
    """An N-d convolution (N = len(kernel_size) in 1..3, channels last) with quantized inputs and kernel:
    ``conv(pad(q_in(x), pad_values), q_k(W)) + b`` (:func:`bnnjax.ops.quant_conv`).

    Arguments are ``nnx.Conv``'s plus ``input_quantizer``, ``kernel_quantizer`` and ``pad_values`` (the
    value "SAME"/explicit padding inserts after input quantization; 1.0 keeps a binary input binary).
    Kernel shape ``(*kernel_size, in_features // feature_group_count, out_features)``.

    Raises:
      ValueError: ``kernel_size`` of length other than 1-3, or features not divisible by the groups.

    Reference: Larq's ``QuantConv1D/2D/3D`` (Geiger & Team, JOSS 2020).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, *, padding: PaddingLike = "SAME",
                 input_dilation: int | Sequence[int] = 1, kernel_dilation: int | Sequence[int] = 1,
                 feature_group_count: int = 1, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None, kernel_init: Callable = _default_kernel_init,
                 bias_init: Callable = _zeros, input_quantizer: QuantizerLike = None,
                 kernel_quantizer: QuantizerLike = None, pad_values: float = 0.0, deterministic: bool = False,
                 rngs: nnx.Rngs):
        ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        if not 1 <= len(ks) <= 3:
            raise ValueError(f"QuantConv supports 1-D to 3-D kernels, got kernel_size={kernel_size!r}.")
        g = feature_group_count
        if in_features % g or out_features % g:
            raise ValueError(f"in_features ({in_features}) and out_features ({out_features}) must be divisible by "
                             f"feature_group_count ({g}).")
        self._init_quantizers(input_quantizer, kernel_quantizer, rngs, deterministic)
        self.in_features, self.out_features, self.kernel_size = in_features, out_features, ks
        self.strides, self.padding, self.pad_values = strides, padding, pad_values
        self.input_dilation, self.kernel_dilation, self.feature_group_count = input_dilation, kernel_dilation, g
        self.use_bias, self.dtype, self.param_dtype, self.precision = use_bias, dtype, param_dtype, precision
        packable = ops.packs_conv(self.input_quantizer, self.kernel_quantizer, rank=len(ks), feature_group_count=g,
                                  input_dilation=input_dilation, pad_values=pad_values)
        self.kernel = _kernel_variable(kernel_init(rngs.params(), ks + (in_features // g, out_features), param_dtype),
                                       self.kernel_quantizer, packable=packable)
        self.bias = _bias_variable(use_bias, bias_init, rngs, out_features, param_dtype)

    def __call__(self, inputs):
        return ops.quant_conv(inputs, _value(self.kernel), _value(self.bias), strides=self.strides,
                              padding=self.padding, pad_values=self.pad_values, input_dilation=self.input_dilation,
                              kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
                              input_quantizer=self.input_quantizer, kernel_quantizer=self.kernel_quantizer,
                              precision=self.precision, dtype=self.dtype, rng=self._rng())


class QuantDepthwiseConv(QuantConv):
    """A depthwise convolution with quantized inputs and kernel: each of the ``in_features`` channels is
    convolved with ``depth_multiplier`` filters of its own (kernel ``(*kernel_size, 1, in_features *
    depth_multiplier)``, a grouped :class:`QuantConv` with ``feature_group_count=in_features``).

    Reference: Larq's ``QuantDepthwiseConv2D``; Howard et al., "MobileNets", 2017.
    """

    def __init__(self, in_features: int, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1, *,
                 depth_multiplier: int = 1, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, in_features * depth_multiplier, kernel_size, strides,
                         feature_group_count=in_features, rngs=rngs, **kwargs)
        self.depth_multiplier = depth_multiplier


class _ABC(nnx.Module):
    def _init_abc(self, kernel_shape, num_weight_bases: int, num_act_bases: int | None, packable: bool, use_bias,
                  dtype, param_dtype, precision, kernel_init, bias_init, rngs: nnx.Rngs):
        if num_act_bases is not None and num_act_bases < 1:
            raise ValueError(f"num_act_bases must be >= 1 or None (real input), got {num_act_bases}.")
        if num_weight_bases < 1:
            raise ValueError(f"num_weight_bases must be >= 1, got {num_weight_bases}.")
        self.num_weight_bases, self.num_act_bases = num_weight_bases, num_act_bases
        self.use_bias, self.dtype, self.param_dtype, self.precision = use_bias, dtype, param_dtype, precision
        self.kernel = QuantParam(kernel_init(rngs.params(), tuple(kernel_shape), param_dtype), precision=num_weight_bases,
                                 quantizer="abc", packable=packable and num_act_bases is not None)
        if num_act_bases is None:
            self.shift = self.beta = nnx.data(None)
        else:
            self.shift = nnx.Param(ops.abc_default_shifts(num_act_bases, param_dtype))
            self.beta = nnx.Param(jnp.ones((num_act_bases,), param_dtype))
        self.bias = _bias_variable(use_bias, bias_init, rngs, kernel_shape[-1], param_dtype)


class ABCLinear(_ABC):
    """ABC-Net's linear layer: M binary weight bases, N shifted binary activation bases
    (:func:`bnnjax.ops.abc_dense`); ``num_act_bases=None`` keeps the input real.

    Reference: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017.
    """

    def __init__(self, in_features: int, out_features: int, *, num_weight_bases: int = 3,
                 num_act_bases: int | None = 3, use_bias: bool = True, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None, kernel_init: Callable = _default_kernel_init,
                 bias_init: Callable = _zeros, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self._init_abc((in_features, out_features), num_weight_bases, num_act_bases, True, use_bias, dtype,
                       param_dtype, precision, kernel_init, bias_init, rngs)

    def __call__(self, inputs):
        return ops.abc_dense(inputs, _value(self.kernel), _value(self.bias), _value(self.shift), _value(self.beta),
                             num_weight_bases=self.num_weight_bases, precision=self.precision, dtype=self.dtype)


class ABCConv(_ABC):
    """ABC-Net's convolution (1-3 D): M binary weight bases, N shifted binary activation bases
    (:func:`bnnjax.ops.abc_conv`).

    Reference: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, *, padding: PaddingLike = "SAME",
                 kernel_dilation: int | Sequence[int] = 1, num_weight_bases: int = 3, num_act_bases: int | None = 3,
                 use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = _default_kernel_init, bias_init: Callable = _zeros, rngs: nnx.Rngs):
        ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_features, self.out_features, self.kernel_size = in_features, out_features, ks
        self.strides, self.padding, self.kernel_dilation = strides, padding, kernel_dilation
        self._init_abc(ks + (in_features, out_features), num_weight_bases, num_act_bases, len(ks) == 2, use_bias,
                       dtype, param_dtype, precision, kernel_init, bias_init, rngs)

    def __call__(self, inputs):
        return ops.abc_conv(inputs, _value(self.kernel), _value(self.bias), _value(self.shift), _value(self.beta),
                            strides=self.strides, padding=self.padding, kernel_dilation=self.kernel_dilation,
                            num_weight_bases=self.num_weight_bases, precision=self.precision, dtype=self.dtype)


class BatchNorm(nnx.BatchNorm):
    """Flax's ``nnx.BatchNorm`` (same arguments, same variables: a drop-in) that also runs folded statistics.

    Training and evaluation are ``nnx.BatchNorm``'s. :func:`bnnjax.export.pack` folds a trained layer into
    two numbers per feature, ``multiplier = scale / sqrt(var + epsilon)`` and ``offset = bias - mean *
    multiplier`` (``nnx.BatchStat``s, LCE's form); the layer that holds them computes ``y = x *
    multiplier + offset`` (:func:`bnnjax.ops.folded_batch_norm`), for inference only.
    """

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if getattr(self, "multiplier", None) is None:
            running = self.use_running_average if use_running_average is None else use_running_average
            if running is False and mask is None and _linen._lean_batch_norm(self, x):
                return self._train(x)
            return super().__call__(x, use_running_average, mask=mask)
        if not (self.use_running_average if use_running_average is None else use_running_average):
            raise ValueError("this BatchNorm's statistics are folded for inference (bnnjax.export.pack); call "
                             "model.eval() on the packed model, and train the model from before pack().")
        return ops.folded_batch_norm(x, self.multiplier.get_value(), self.offset.get_value(), self.axis, self.dtype)

    def _train(self, x):
        # nnx.BatchNorm's training step with ops.batch_norm's arithmetic, whose backward keeps only x
        features = {a % x.ndim for a in (self.axis if isinstance(self.axis, tuple) else (self.axis,))}
        reduction = tuple(i for i in range(x.ndim) if i not in features)
        bshape = tuple(d if i in features else 1 for i, d in enumerate(x.shape))
        scale = None if self.scale is None else self.scale[...].reshape(bshape)
        bias = None if self.bias is None else self.bias[...].reshape(bshape)
        y, mean, var = ops.batch_norm(x, scale, bias, reduction, self.epsilon)
        self.mean[...] = jax.lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = jax.lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
        return y


def keras_batch_norm(num_features: int, *, use_scale: bool = True, use_bias: bool = True, momentum: float = 0.99,
                     epsilon: float = 1e-3, rngs: nnx.Rngs) -> BatchNorm:
    """:class:`BatchNorm` with Keras' defaults (momentum 0.99, epsilon 1e-3), as Larq models use.

    ``use_scale``/``use_bias`` are Keras' ``scale``/``center``.
    """
    return BatchNorm(num_features, use_scale=use_scale, use_bias=use_bias, momentum=momentum, epsilon=epsilon,
                     rngs=rngs)


class PReLU(nnx.Module):
    """Keras' ``PReLU``: ``y = max(x, 0) + alpha * min(x, 0)`` (:func:`bnnjax.ops.prelu`) with a learned
    ``alpha`` of shape ``alpha_shape``, broadcast against the input without its batch axis: an int
    ``C`` gives one alpha per channel (Keras' ``shared_axes=(1, 2)`` on NHWC input), ``(H, W, C)`` one
    per position.

    Reference: He et al., "Delving Deep into Rectifiers", ICCV 2015.
    """

    def __init__(self, alpha_shape: int | Sequence[int], *, alpha_init: Callable = _zeros,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        shape = (alpha_shape,) if isinstance(alpha_shape, int) else tuple(alpha_shape)
        self.alpha = nnx.Param(alpha_init(rngs.params(), shape, param_dtype))

    def __call__(self, x):
        return ops.prelu(x, self.alpha.get_value())


class FixedDepthwiseConv(nnx.Module):
    """A depthwise convolution with a fixed (untrained) kernel, e.g. QuickNet's blur-pool.

    The kernel ``(*kernel_size, 1, in_features)`` is made by ``kernel_init`` (default
    :func:`bnnjax.layers.blurpool_initializer`) and kept as a :class:`Constant`: optimizers never see it
    (Keras' ``DepthwiseConv2D(trainable=False)``); stored as ``(*kernel_size, 1, 1)``, one filter for
    every channel (what :func:`bnnjax.export.pack` keeps of a blur pool). No bias.
    """

    def __init__(self, in_features: int, kernel_size: Sequence[int] = (3, 3), strides: int | Sequence[int] = 1, *,
                 padding: PaddingLike = "SAME", kernel_init: Callable = _linen.blurpool_initializer,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        self.in_features, self.kernel_size, self.strides, self.padding = in_features, tuple(kernel_size), strides, padding
        key = rngs.params() if rngs is not None else jax.random.key(0)
        self.kernel = Constant(kernel_init(key, tuple(kernel_size) + (1, in_features), param_dtype))

    def __call__(self, x):
        kernel = _linen._channel_broadcast(self.kernel.get_value(), self.in_features)
        return ops.quant_conv(x, kernel.astype(x.dtype), strides=self.strides, padding=self.padding,
                              feature_group_count=self.in_features)


class MaxPool(nnx.Module):
    """Max pooling as a module (Keras' ``MaxPooling2D``), so summaries list it
    (:func:`bnnjax.ops.max_pool`)."""

    def __init__(self, window_shape: Sequence[int], strides: Sequence[int] | None = None, padding: str = "VALID"):
        self.window_shape, self.strides, self.padding = tuple(window_shape), strides, padding

    def __call__(self, x):
        return ops.max_pool(x, self.window_shape, self.strides, self.padding)


class Flatten(nnx.Module):
    """Flatten every axis but the batch axis (Keras' ``Flatten``)."""

    def __call__(self, x):
        return ops.flatten(x)


class GlobalAvgPool(nnx.Module):
    """Mean over every spatial axis: ``(N, *spatial, C) -> (N, C)`` (Keras' ``GlobalAveragePooling``)."""

    def __call__(self, x):
        return ops.global_avg_pool(x)


class Activation(nnx.Module):
    """An elementwise activation as a module (Keras' ``Activation``): ``fn`` names a ``jax.nn`` function
    ("relu", "hard_tanh", ...) or is the function itself."""

    def __init__(self, fn: str | Callable = "relu"):
        ops.activation(fn)  # an unknown name fails here, where the model is built
        self.fn = fn

    def __call__(self, x):
        return ops.activation(self.fn)(x)
