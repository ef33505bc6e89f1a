"""Quantized Flax linen layers: drop-in replacements for ``nn.Dense`` and ``nn.Conv``.

A quantized layer quantizes its input with ``input_quantizer`` and its latent full-precision kernel
with ``kernel_quantizer`` and then computes exactly what the float Flax layer computes on those
values. Quantized kernels are stored boxed in :class:`QuantParam`, Flax axis metadata that records the
kernel's bit width, so optimizers, the summary and the exporter find binary kernels by tag, never by
parameter name.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import meta
from flax import linen as nn
from flax import nnx

from bnnjax import ops, quantizers

__all__ = [
    "QuantParam", "is_tag", "is_quantized", "is_binary", "precision_of", "QuantDense", "QuantConv",
    "QuantDepthwiseConv2D", "ABCDense", "ABCConv", "abc_from_float", "MaxPool", "Flatten",
    "GlobalAvgPool", "Activation", "BatchNorm", "fold_batch_norm", "keras_batch_norm", "PReLU",
    "FixedDepthwiseConv2D", "blurpool_initializer",
]

QuantizerLike = Union[str, Callable, quantizers.Quantizer, None]
PaddingLike = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
Array = Any


class QuantParam(struct.PyTreeNode, meta.AxisMetadata):
    """A latent kernel boxed with its quantized bit width (Flax axis metadata).

    Attributes:
      value: the latent full-precision array.
      precision: bits per weight after quantization (1 for binary kernels).
      quantizer: name of the kernel quantizer.
      packable: the layer can run this kernel on packed bits (its input is binarized to ±1 and the
        kernel is ±1, a per-channel scale times ±1, or ABC-Net's binary bases): what
        ``bnnjax.export.pack`` packs.
    """

    value: Any
    precision: int = struct.field(pytree_node=False, default=1)
    quantizer: str = struct.field(pytree_node=False, default="ste_sign")
    packable: bool = struct.field(pytree_node=False, default=False)

    def unbox(self):
        return self.value

    def replace_boxed(self, val):
        return self.replace(value=val)

    def add_axis(self, index, params):
        return self

    def remove_axis(self, index, params):
        return self


def _is_nnx_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def is_tag(x) -> bool:
    """True for a parameter wrapper that may carry a quantization tag: a linen :class:`QuantParam` box or
    any NNX variable (``bnnjax.nnx.QuantParam`` is the tagged one); what tree traversals treat as one
    leaf."""
    return isinstance(x, QuantParam) or _is_nnx_variable(x)


def is_quantized(x) -> bool:
    """True for a kernel tagged by a quantized layer (any bit width): a linen :class:`QuantParam` box or an
    NNX ``bnnjax.nnx.QuantParam`` variable."""
    return isinstance(x, QuantParam) or (_is_nnx_variable(x) and x.has_metadata("precision")
                                          and x.has_metadata("quantizer"))


def is_binary(x) -> bool:
    """True for a latent kernel whose forward value is a 1-bit weight (what weight_clip and Bop act on).

    ABC-Net kernels are real latent kernels approximated by M binary bases with solved scales; they
    are not 1-bit weights even when M = 1, and their straight-through gradient is unclipped.
    """
    return is_quantized(x) and x.precision == 1 and x.quantizer != "abc"


def precision_of(x) -> int:
    """Bits per entry of a (possibly tagged) parameter: its tag, else its dtype's width."""
    if is_quantized(x):
        return x.precision
    if _is_nnx_variable(x):
        x = x.get_value()
    return int(np.dtype(x.dtype).itemsize * 8)


def _boxed_init(init, q: quantizers.Quantizer, precision: int | None = None, packable: bool = False):
    def boxed(*args):
        return QuantParam(init(*args), precision or q.precision, q.name, packable)

    return boxed


def _latent_kernel(mdl: nn.Module, shape, q: quantizers.Quantizer, precision=None, packable: bool = False):
    """The latent kernel param, boxed when its quantizer lowers the precision."""
    init = mdl.kernel_init
    if q.precision is not None or precision is not None:
        init = _boxed_init(init, q, precision, packable)
    return mdl.param("kernel", init, shape, mdl.param_dtype)


def _kernel(mdl: nn.Module, shape, q: quantizers.Quantizer, precision=None, packable: bool = False):
    """The layer's kernel: the packed one ``bnnjax.export.pack`` put in its place, else the latent param."""
    if not mdl.is_initializing() and mdl.has_variable("params", "kernel"):
        kernel = mdl.get_variable("params", "kernel")
        if isinstance(kernel, ops.packing.PackedKernel):
            return kernel
    return _latent_kernel(mdl, shape, q, precision, packable)


def _bias(mdl: nn.Module, features: int):
    return mdl.param("bias", mdl.bias_init, (features,), mdl.param_dtype) if mdl.use_bias else None


def _quantizer_rng(mdl: nn.Module, *qs: quantizers.Quantizer):
    """One key for the layer's stochastic quantizers; None without a 'quantizer' stream (evaluation)."""
    if any(q.needs_rng for q in qs) and mdl.has_rng("quantizer"):
        return mdl.make_rng("quantizer")
    return None


def _check_rank(name: str, x, rank: int, layout: str):
    if x.ndim != rank:
        raise ValueError(f"{name} expects inputs of rank {rank} ({layout}), got shape {tuple(x.shape)}; "
                         "add a batch axis with x[None] or reshape the input.")


class MaxPool(nn.Module):
    """Max pooling as a module (Keras' ``MaxPooling2D``), so exporters and summaries see it.

    Same arguments as ``flax.linen.max_pool``; non-overlapping VALID windows take the fast path of
    :func:`bnnjax.ops.max_pool`.
    """

    window_shape: Sequence[int]
    strides: Sequence[int] | None = None
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x):
        return ops.max_pool(x, self.window_shape, self.strides, self.padding)


class Flatten(nn.Module):
    """Flatten every axis but the batch axis (Keras' ``Flatten``), as a module exporters can see."""

    @nn.compact
    def __call__(self, x):
        return ops.flatten(x)


class Activation(nn.Module):
    """An elementwise activation as a module (Keras' ``Activation``), so exporters and summaries see it.

    ``fn`` names a ``jax.nn`` function ("relu", "hard_tanh", ...) or is the function itself; the packed
    exporter supports "relu".
    """

    fn: str | Callable = "relu"

    @nn.compact
    def __call__(self, x):
        return ops.activation(self.fn)(x)


class GlobalAvgPool(nn.Module):
    """Mean over every spatial axis: ``(N, *spatial, C) -> (N, C)`` (Keras' ``GlobalAveragePooling``)."""

    @nn.compact
    def __call__(self, x):
        return ops.global_avg_pool(x)


class BatchNorm(nn.BatchNorm):
    """Flax's ``nn.BatchNorm`` (same fields, same variables: a drop-in) that also runs folded statistics.

    Training and evaluation are ``nn.BatchNorm``'s: ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``.
    :func:`bnnjax.export.pack` folds a trained layer into two numbers per feature, the multiplier
    ``a = scale / sqrt(var + epsilon)`` and the offset ``b = bias - mean * a`` (``batch_stats``
    ``multiplier`` and ``offset``: what LCE stores and Larq's model size counts); the layer that finds
    them computes ``y = x * a + b``, for inference only. ``nn.BatchNorm`` itself cannot read that form,
    so only this class is folded.
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if not self.has_variable("batch_stats", "multiplier"):
            train = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
            if train and mask is None and _lean_batch_norm(self, x):
                return self._train(x)
            return super().__call__(x, use_running_average, mask=mask)
        if not nn.merge_param("use_running_average", self.use_running_average, use_running_average):
            raise ValueError(f"BatchNorm {'/'.join(self.path)}: its statistics are folded for inference "
                             "(bnnjax.export.pack); train on the variables from before pack().")
        return ops.folded_batch_norm(x, self.get_variable("batch_stats", "multiplier"),
                                     self.get_variable("batch_stats", "offset"), self.axis, self.dtype)

    def _train(self, x):
        # nn.BatchNorm's variables, created in its order; the arithmetic is ops.batch_norm's, whose
        # backward pass keeps only x
        features = {a % x.ndim for a in (self.axis if isinstance(self.axis, tuple) else (self.axis,))}
        reduction = tuple(i for i in range(x.ndim) if i not in features)
        shape = [x.shape[a] for a in sorted(features)]
        bshape = tuple(d if i in features else 1 for i, d in enumerate(x.shape))
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype).reshape(bshape) if self.use_scale else None
        bias = self.param("bias", self.bias_init, shape, self.param_dtype).reshape(bshape) if self.use_bias else None
        y, mean, var = ops.batch_norm(x, scale, bias, reduction, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _lean_batch_norm(bn, x) -> bool:
    """Whether :func:`bnnjax.ops.batch_norm` computes this (linen or NNX) BatchNorm's training step: float32
    throughout, Flax's fast variance, no cross-device axis name (one jit program over a mesh needs none)."""
    return (x.dtype == jnp.float32 and bn.param_dtype == jnp.float32 and bn.dtype in (None, jnp.float32)
            and bn.use_fast_variance and bn.axis_name is None and getattr(bn, "force_float32_reductions", True))


def fold_batch_norm(module: nn.BatchNorm, params: dict, batch_stats: dict) -> dict:
    """A BatchNorm's inference variables as :class:`BatchNorm`'s folded ``{"multiplier", "offset"}``.

    ``a = scale * rsqrt(var + epsilon)`` (``scale`` 1 without ``use_scale``), ``b = bias - mean * a``
    (``bias`` 0 without ``use_bias``), in float32.
    """
    mean = jnp.asarray(batch_stats["mean"], jnp.float32)
    a = jax.lax.rsqrt(jnp.asarray(batch_stats["var"], jnp.float32) + module.epsilon)
    if module.use_scale:
        a = a * jnp.asarray(params["scale"], jnp.float32)
    b = -mean * a
    if module.use_bias:
        b = b + jnp.asarray(params["bias"], jnp.float32)
    return {"multiplier": a, "offset": b}


def keras_batch_norm(train: bool, use_scale: bool = True, use_bias: bool = True, momentum: float = 0.99,
                     epsilon: float = 1e-3, name: str | None = None) -> BatchNorm:
    """:class:`BatchNorm` with Keras' defaults (momentum 0.99, epsilon 1e-3), as Larq models use.

    ``use_scale``/``use_bias`` are Keras' ``scale``/``center``.
    """
    return BatchNorm(use_running_average=not train, use_scale=use_scale, use_bias=use_bias,
                     momentum=momentum, epsilon=epsilon, name=name)


class PReLU(nn.Module):
    """Keras' ``PReLU``: ``y = max(x, 0) + alpha * min(x, 0)`` with a learned ``alpha`` per position.

    ``alpha`` has the input's shape without the batch axis, reduced to 1 along ``shared_axes``
    (axes counted with the batch axis first, as in Keras: ``shared_axes=(1, 2)`` gives one alpha per
    channel of an NHWC input, shape ``(1, 1, C)``).

    Reference: He et al., "Delving Deep into Rectifiers", ICCV 2015.
    """

    shared_axes: Sequence[int] = ()
    alpha_init: Callable = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = [1 if i + 1 in tuple(self.shared_axes) else d for i, d in enumerate(x.shape[1:])]
        alpha = self.param("alpha", self.alpha_init, tuple(shape), self.param_dtype)
        return ops.prelu(x, alpha)


def blurpool_initializer(key, shape, dtype=jnp.float32):
    """A normalized binomial filter per channel (larq-zoo's ``blurpool_initializer``), Flax's depthwise
    kernel layout ``(k, k, 1, C)`` with ``k`` in 2, 3, 5: the outer product of ``[1, 1]``, ``[1, 2, 1]``
    or ``[1, 4, 6, 4, 1]`` with itself, divided by its sum.

    Reference: Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019.
    """
    taps = {2: [1, 1], 3: [1, 2, 1], 5: [1, 4, 6, 4, 1]}.get(shape[0])
    if taps is None or shape[0] != shape[1]:
        raise ValueError(f"blurpool kernels are 2x2, 3x3 or 5x5, got kernel shape {tuple(shape)}.")
    k = np.outer(taps, taps).astype(np.float64)
    k = (k / k.sum()).reshape(shape[:2] + (1, 1))
    return jnp.asarray(np.broadcast_to(k, tuple(shape)), dtype)


def _channel_broadcast(kernel, channels: int):
    # a depthwise kernel stored once for all channels: (..., 1, 1) -> (..., 1, channels)
    return jnp.broadcast_to(kernel, kernel.shape[:-1] + (channels,)) if kernel.shape[-1] == 1 else kernel


class FixedDepthwiseConv2D(nn.Module):
    """A depthwise 2-D convolution with a fixed (untrained) kernel, e.g. QuickNet's blur-pool.

    The kernel, shape ``(kh, kw, 1, C)``, is made by ``kernel_init`` and kept in the ``"constants"``
    collection, so optimizers never see it while summaries, checkpoints and weight files do (Keras'
    ``DepthwiseConv2D(trainable=False)``). A stored kernel of shape ``(kh, kw, 1, 1)`` is one filter for
    every channel (what :func:`bnnjax.export.pack` keeps of a blur pool). No bias.
    """

    kernel_size: Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    kernel_init: Callable = blurpool_initializer
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x)
        _check_rank("FixedDepthwiseConv2D", x, 4, "batch, height, width, channels")
        c = x.shape[-1]
        kernel = self.variable("constants", "kernel", lambda: self.kernel_init(
            self.make_rng("params") if self.has_rng("params") else jax.random.key(0),
            tuple(self.kernel_size) + (1, c), self.param_dtype)).value
        kernel = _channel_broadcast(kernel, c)
        return ops.quant_conv(x, kernel.astype(x.dtype), strides=self.strides, padding=self.padding,
                              feature_group_count=c)



class QuantDense(nn.Module):
    """A dense layer with quantized inputs and kernel: ``y = q_in(x) @ q_k(W) + b``.

    Fields are those of ``flax.linen.Dense`` plus ``input_quantizer`` and ``kernel_quantizer`` (a name
    from ``bnnjax.quantizers.names()``, a callable, a ``Quantizer`` from ``quantizers.get(name,
    **kwargs)``, or None for full precision). The latent kernel stays full precision and, when
    quantized, is boxed in ``QuantParam``.

    Reference: Larq's ``QuantDense`` (Geiger & Team, JOSS 2020).
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    input_quantizer: QuantizerLike = None
    kernel_quantizer: QuantizerLike = None

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs)
        if inputs.ndim < 1:
            raise ValueError("QuantDense expects inputs of rank >= 1 (..., features), got a scalar.")
        qi, qk = quantizers.get(self.input_quantizer), quantizers.get(self.kernel_quantizer)
        kernel = _kernel(self, (inputs.shape[-1], self.features), qk, packable=ops.packs_dense(qi, qk))
        return ops.quant_dense(inputs, kernel, _bias(self, self.features), input_quantizer=qi, kernel_quantizer=qk,
                               precision=self.precision, dtype=self.dtype, rng=_quantizer_rng(self, qi, qk))


class _ConvMixin:
    """The call shared by the quantized convolutions (fields live on each class)."""

    def _conv(self, inputs, kernel_size, in_per_group: int, out_features: int, groups: int):
        qi, qk = quantizers.get(self.input_quantizer), quantizers.get(self.kernel_quantizer)
        packable = ops.packs_conv(qi, qk, rank=len(kernel_size), feature_group_count=groups,
                                  input_dilation=self.input_dilation, pad_values=self.pad_values)
        kernel = _kernel(self, tuple(kernel_size) + (in_per_group, out_features), qk, packable=packable)
        return ops.quant_conv(inputs, kernel, _bias(self, out_features), strides=self.strides, padding=self.padding,
                              pad_values=self.pad_values, input_dilation=self.input_dilation,
                              kernel_dilation=self.kernel_dilation, feature_group_count=groups,
                              input_quantizer=qi, kernel_quantizer=qk, precision=self.precision, dtype=self.dtype,
                              rng=_quantizer_rng(self, qi, qk))


class QuantConv(nn.Module, _ConvMixin):
    """An N-d convolution (N = len(kernel_size) in 1..3) with quantized inputs and kernel.

    Computes ``conv(pad(q_in(x), pad_values), q_k(W)) + b`` in channels-last layout. Fields are those of
    ``flax.linen.Conv`` plus ``input_quantizer``, ``kernel_quantizer`` and ``pad_values`` (the value
    "SAME"/explicit padding inserts after input quantization; 1.0 keeps a binary input binary).

    Raises:
      ValueError: ``kernel_size`` of length other than 1-3, or inputs of the wrong rank.

    Reference: Larq's ``QuantConv1D/2D/3D`` (Geiger & Team, JOSS 2020).
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    input_quantizer: QuantizerLike = None
    kernel_quantizer: QuantizerLike = None
    pad_values: float = 0.0

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs)
        ks = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        if not 1 <= len(ks) <= 3:
            raise ValueError(f"QuantConv supports 1-D to 3-D kernels, got kernel_size={self.kernel_size!r}.")
        _check_rank("QuantConv", inputs, len(ks) + 2, "batch, *spatial, channels")
        cin, g = inputs.shape[-1], self.feature_group_count
        if cin % g or self.features % g:
            raise ValueError(f"input channels ({cin}) and features ({self.features}) must be divisible by "
                             f"feature_group_count ({g}).")
        return self._conv(inputs, ks, cin // g, self.features, g)


class QuantDepthwiseConv2D(nn.Module, _ConvMixin):
    """A 2-D depthwise convolution with quantized inputs and kernel.

    Each input channel is convolved with ``depth_multiplier`` filters of its own (kernel shape
    ``(kh, kw, 1, C * depth_multiplier)``, Flax's grouped-conv layout with ``feature_group_count=C``).
    Fields as :class:`QuantConv` without ``features``/``feature_group_count``.

    Reference: Larq's ``QuantDepthwiseConv2D``; Howard et al., "MobileNets", 2017.
    """

    kernel_size: Sequence[int]
    depth_multiplier: int = 1
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: int | Sequence[int] = 1
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    input_quantizer: QuantizerLike = None
    kernel_quantizer: QuantizerLike = None
    pad_values: float = 0.0

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs)
        if isinstance(self.kernel_size, int) or len(self.kernel_size) != 2:
            raise ValueError(f"QuantDepthwiseConv2D needs a 2-D kernel_size, got {self.kernel_size!r}.")
        _check_rank("QuantDepthwiseConv2D", inputs, 4, "batch, height, width, channels")
        cin = inputs.shape[-1]
        return self._conv(inputs, self.kernel_size, 1, cin * self.depth_multiplier, cin)


# --- ABC-Net --------------------------------------------------------------------------------------

abc_weight_bases = ops.abc_weight_bases
abc_activation_bases = ops.abc_activation_bases


def _default_shifts(n):
    return lambda key, shape, dtype=jnp.float32: ops.abc_default_shifts(n, dtype)


class _ABCMixin:
    """The variables shared by the ABC layers (fields live on each class)."""

    def _abc_variables(self, kernel_shape, packable: bool):
        if self.num_act_bases is not None and self.num_act_bases < 1:
            raise ValueError(f"num_act_bases must be >= 1 or None (real input), got {self.num_act_bases}.")
        q = quantizers.Quantizer("abc", quantizers.ste_sign, precision=self.num_weight_bases)
        packable = packable and self.num_act_bases is not None
        kernel = _kernel(self, kernel_shape, q, precision=self.num_weight_bases, packable=packable)
        shift = beta = None
        if self.num_act_bases is not None:
            shift = self.param("shift", _default_shifts(self.num_act_bases), (self.num_act_bases,), self.param_dtype)
            beta = self.param("beta", nn.initializers.ones_init(), (self.num_act_bases,), self.param_dtype)
        return kernel, _bias(self, kernel_shape[-1]), shift, beta


class ABCDense(nn.Module, _ABCMixin):
    """ABC-Net dense layer: M binary weight bases and N shifted binary activation bases.

    ``y = sum_n beta_n sum_m alpha_m (A_n @ B_m) + b`` with ``B_m``, ``alpha`` from
    :func:`abc_weight_bases` (alphas solved by least squares in every forward pass) and ``A_n`` from
    :func:`abc_activation_bases` with learnable shifts ``v_n`` and weights ``beta_n``.
    ``num_act_bases=None`` keeps the input real (ABC's ApproxDense).

    Reference: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017.
    """

    features: int
    num_weight_bases: int = 3
    num_act_bases: int | None = 3
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs)
        kernel, bias, shift, beta = self._abc_variables((inputs.shape[-1], self.features), packable=True)
        return ops.abc_dense(inputs, kernel, bias, shift, beta, num_weight_bases=self.num_weight_bases,
                             precision=self.precision, dtype=self.dtype)


class ABCConv(nn.Module, _ABCMixin):
    """ABC-Net convolution (1-3 D): M binary weight bases, N shifted binary activation bases.

    ``y = sum_n beta_n sum_m alpha_m conv(A_n, B_m) + b``; see :class:`ABCDense`. Fields of
    ``flax.linen.Conv`` (``features``, ``kernel_size``, ``strides``, ``padding``, ...).

    Reference: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    num_weight_bases: int = 3
    num_act_bases: int | None = 3
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs)
        ks = tuple(self.kernel_size)
        _check_rank("ABCConv", inputs, len(ks) + 2, "batch, *spatial, channels")
        kernel, bias, shift, beta = self._abc_variables(ks + (inputs.shape[-1], self.features),
                                                        packable=len(ks) == 2)
        return ops.abc_conv(inputs, kernel, bias, shift, beta, strides=self.strides, padding=self.padding,
                            kernel_dilation=self.kernel_dilation, num_weight_bases=self.num_weight_bases,
                            precision=self.precision, dtype=self.dtype)


def abc_from_float(layer: nn.Module, params: dict, num_weight_bases: int = 3,
                   num_act_bases: int | None = 3):
    """Build an ABC layer from a trained float ``nn.Conv``/``nn.Dense`` (or Quant*) and its params.

    Args:
      layer: the float layer (its fields are copied).
      params: that layer's params, ``{"kernel": ..., "bias": ...}``.
      num_weight_bases: M.
      num_act_bases: N, or None to keep the input real.

    Returns:
      ``(abc_layer, abc_params)``; the shifts and betas start at their defaults.

    Raises:
      TypeError: ``layer`` is not a dense or convolution layer.
    """
    if not isinstance(layer, (nn.Dense, QuantDense, nn.Conv, QuantConv)):
        raise TypeError(f"abc_from_float converts nn.Dense/nn.Conv layers, got {type(layer).__name__}.")
    kernel = meta.unbox(params["kernel"])
    common = dict(num_weight_bases=num_weight_bases, num_act_bases=num_act_bases, use_bias="bias" in params,
                  dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision)
    if isinstance(layer, (nn.Dense, QuantDense)):
        new = ABCDense(features=layer.features, **common)
    elif isinstance(layer, (nn.Conv, QuantConv)):
        ks = (layer.kernel_size,) if isinstance(layer.kernel_size, int) else tuple(layer.kernel_size)
        new = ABCConv(features=layer.features, kernel_size=ks, strides=layer.strides,
                      padding=layer.padding, kernel_dilation=layer.kernel_dilation, **common)
    packable = num_act_bases is not None and (isinstance(new, ABCDense) or len(new.kernel_size) == 2)
    out = {"kernel": QuantParam(jnp.asarray(kernel), num_weight_bases, "abc", packable)}
    if num_act_bases is not None:
        out["shift"] = _default_shifts(num_act_bases)(None, (num_act_bases,), kernel.dtype)
        out["beta"] = jnp.ones((num_act_bases,), kernel.dtype)
    if "bias" in params:
        out["bias"] = jnp.asarray(params["bias"])
    return new, out
