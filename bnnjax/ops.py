"""Functional forms of the layers' computations: convolution, pooling and the packed ±1 product.

The Flax modules in :mod:`bnnjax.layers` hold parameters and quantize; the computation they run lives
here, as pure functions with their custom gradients: convolution by im2col (strided slicing + one dot,
faster than XLA:CPU's convolution backward), a shifted-sum convolution for short contractions, the
XNOR-popcount forward pass of ±1 products (:func:`xnor_product`) and max-pooling with a cheap
first-maximum gradient. Each fast path is chosen at trace time from the backend and is tested equal to
the plain formulation.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np
from flax import linen as nn

from bnnjax import _padding, packing, quantizers

__all__ = ["conv_nd", "max_pool", "xnor_product", "binary_gradient_precision", "packed_training", "float_forward",
           "packed_dense", "packed_conv", "unpacked_kernel", "quant_dense", "quant_conv", "packs_dense", "packs_conv",
           "abc_dense", "abc_conv", "abc_weight_bases", "abc_activation_bases", "abc_default_shifts", "batch_norm", "relu",
           "folded_batch_norm",
           "prelu", "flatten", "global_avg_pool", "activation"]

def _tuple(v, n: int, what: str) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    if len(v) != n:
        raise ValueError(f"{what} must be an int or a sequence of {n} ints, got {v!r}.")
    return v


def conv_nd(x, kernel, *, strides, padding, pad_values=0.0, input_dilation=1, kernel_dilation=1,
            feature_group_count=1, precision=None, signs=False, scaled=False):
    """N-d convolution in channels-last layout with a constant padding value.

    ``pad_values=1.0`` pads a ±1 input with +1 ("one-padding"), which keeps every input of a binary
    convolution binary; ``0.0`` is Flax's (and TensorFlow's) zero padding. ``signs=True`` declares
    that ``x`` holds only -1 and +1 and ``kernel`` too (times a non-negative per-output-channel scale
    with ``scaled=True``), which lets a 2-D convolution on CPU run its forward pass on packed bits
    (:func:`xnor_product`).
    """
    n = kernel.ndim - 2
    strides = _tuple(strides, n, "strides")
    kdil = _tuple(kernel_dilation, n, "kernel_dilation")
    idil = _tuple(input_dilation, n, "input_dilation")
    pads = _padding.resolve(padding, x.shape[1:-1], kernel.shape[:n], strides, kdil)
    if pad_values != 0.0 and any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), constant_values=pad_values)
        pads = ((0, 0),) * n
    if signs and n == 2 and feature_group_count == 1 and all(d == 1 for d in idil) and pad_values in (-1.0, 0.0, 1.0):
        # ±1 operands on any backend: the input's bits are all the backward pass keeps
        im2col = _Im2col(tuple(x.shape), tuple(kernel.shape[:n]), strides, tuple(pads), kdil)
        y = xnor_product(x, kernel.reshape(-1, kernel.shape[-1]), im2col, precision, scaled)
        return y.reshape((x.shape[0],) + im2col.out_spatial + (kernel.shape[-1],))
    if _use_patches_conv(x, kernel, idil, feature_group_count):
        im2col = _Im2col(tuple(x.shape), tuple(kernel.shape[:n]), strides, tuple(pads), kdil)
        k2 = kernel.reshape(-1, kernel.shape[-1])
        if _sums_taps(k2) and x.dtype == jnp.float32:
            y = _lhs_product(im2col, "taps_product", precision, x, k2)
        elif x.shape[-1] <= _NARROW_INPUT:
            y = _patches_dot(im2col, precision, x, k2)
        else:
            y = jnp.dot(im2col(x), k2, precision=precision)
        return y.reshape((x.shape[0],) + im2col.out_spatial + (kernel.shape[-1],))
    if _use_pointwise_dot(x, kernel, pads, idil, feature_group_count):
        x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
        y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[-2:]), precision=precision)
        return y.reshape(x.shape[:-1] + (kernel.shape[-1],))
    if _use_depthwise_taps(x, kernel, idil, feature_group_count):
        # XLA:CPU's grouped convolution runs a 3x3 depthwise conv ~10x slower than the same work as
        # shifted inputs times per-channel kernel rows, which fuse into one elementwise loop
        im2col = _Im2col(tuple(x.shape), tuple(kernel.shape[:n]), strides, tuple(pads), kdil)
        return _depthwise_taps(im2col, x, kernel.reshape(-1, kernel.shape[-1]))
    return _xla_conv(x, kernel, strides, pads, idil, kdil, feature_group_count, precision)


def _xla_conv(x, kernel, strides, pads, input_dilation, kernel_dilation, groups, precision):
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _DIMENSION_NUMBERS[kernel.ndim - 2])
    return jax.lax.conv_general_dilated(x, kernel, strides, pads, lhs_dilation=input_dilation,
                                        rhs_dilation=kernel_dilation, dimension_numbers=dn,
                                        feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _patches_dot(im2col, precision, x, kernel):
    """``im2col(x) @ kernel``; evaluated without differentiation (inference) as XLA's own convolution,
    which XLA:CPU runs several times faster than the patches' concatenation and dot (QuickNet's first
    layer at batch 16, before it summed its taps: 6.3 instead of 19 ms), while the backward pass is the
    dot's (XLA's convolution backward is the slow one). The two forward forms agree to float32 rounding."""
    spatial = im2col.kernel_spatial
    w = kernel.reshape(spatial + (im2col.in_shape[-1], kernel.shape[-1]))
    y = _xla_conv(x, w, im2col.strides, im2col.pads, (1,) * len(spatial), im2col.dilation, 1, precision)
    return y.reshape(-1, kernel.shape[-1])


def _patches_dot_fwd(im2col, precision, x, kernel):
    # the residuals are the patches, as autodiff of the dot keeps them
    return jax.vjp(lambda a, k: jnp.dot(im2col(a), k, precision=precision), x, kernel)


_patches_dot.defvjp(_patches_dot_fwd, lambda im2col, precision, vjp, g: vjp(g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _depthwise_taps(im2col, x, rows):
    """A depthwise convolution as ``sum_t tap_t(x) * rows[t]`` (one elementwise loop).

    Backward, for tap offsets ``o_t``, strides ``s`` and low padding ``lo``: ``drows[t] = sum(tap_t(x) g)``
    and ``dx[i] = sum_t rows[t] G[i + lo - o_t]`` with ``G`` the output gradient dilated by ``s`` (zeros
    between its entries): again shifted slices of one array, one elementwise loop. Autodiff of the
    forward instead pads each tap's gradient to the input's size and holds all of them at once.
    """
    y = None
    for tap, row in zip(im2col.taps(x), rows):
        y = tap * row if y is None else y + tap * row
    return y


def _depthwise_taps_fwd(im2col, x, rows):
    return _depthwise_taps(im2col, x, rows), (x, rows)


def _depthwise_taps_bwd(im2col, res, g):
    x, rows = res
    # made once g exists: XLA would otherwise slice every tap out of x early in the step and hold them
    drows = _isolated(lambda: jnp.stack([jnp.sum(tap * g, axis=tuple(range(g.ndim - 1))) for tap in im2col.taps(x)]),
                      g, rows.shape[:1] + g.shape[-1:], jnp.result_type(x, g),
                      nbytes=rows.shape[0] * g.size * g.dtype.itemsize)
    offsets = [tuple(o * d for o, d in zip(offs, im2col.dilation)) for offs in np.ndindex(*im2col.kernel_spatial)]
    top = [max(o[a] for o in offsets) for a in range(len(im2col.kernel_spatial))]
    # gpad[k] = G[k - P] with P = top - lo, so that dx[i] reads gpad[i + top - o_t]
    pads = [(0, 0, 0)]
    for a, (lo, _) in enumerate(im2col.pads):
        size, out, s = im2col.in_shape[1 + a], g.shape[1 + a], im2col.strides[a]
        pads.append((top[a] - lo, size + lo - (out - 1) * s - 1, s - 1))
    gpad = jax.lax.pad(g, jnp.zeros((), g.dtype), pads + [(0, 0, 0)])
    dx = None
    for o, row in zip(offsets, rows):
        start = (0,) + tuple(t - v for t, v in zip(top, o)) + (0,)
        part = jax.lax.dynamic_slice(gpad, start, x.shape) * row
        dx = part if dx is None else dx + part
    return dx.astype(x.dtype), drows.astype(rows.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


# A CPU convolution sums shifted inputs instead of calling a dot for a contraction up to _TAPS_MAX_K
# long, or up to _TAPS_MAX_TERMS kernel entries (multiply-adds per output pixel): an RGB stem's 3x3x3
# kernel to 16 outputs ran 2.4x faster than XLA's convolution (QuickNet, batch 1 and 16); to 64
# outputs, 1.4x slower.
_TAPS_MAX_K = 16
_TAPS_MAX_TERMS = 1024


def _sums_taps(kernel_rows) -> bool:
    return kernel_rows.shape[0] <= _TAPS_MAX_K or kernel_rows.size <= _TAPS_MAX_TERMS


# Input channels up to which a CPU convolution's forward pass without differentiation is XLA's own
# (:func:`_patches_dot`): concatenating the patches of a narrow input (an image's 3 channels) costs more
# than the dot. For wide inputs the patches' dot measured faster within a model (QuickNet's float
# reference path at batch 16: 565 ms, against 857 ms with XLA's convolution everywhere).
_NARROW_INPUT = 16


def _use_patches_conv(x, kernel, input_dilation, groups) -> bool:
    # XLA:CPU's convolution backward is several times slower than a dot on the same data; GPUs and
    # TPUs have fast native convolutions. Chosen at trace time from the default backend.
    return (jax.default_backend() == "cpu" and groups == 1 and all(d == 1 for d in input_dilation)
            and int(np.prod(kernel.shape[:-2])) > 1)


def _use_pointwise_dot(x, kernel, pads, input_dilation, groups) -> bool:
    # A 1x1 convolution of a wide input as a dot on its (strided) pixels: XLA:CPU's convolution ran
    # QuickNet's float transitions (64 -> 128 ... 256 -> 512 channels) slower, forward and backward
    # (its artifact: 4.56 -> 4.34 ms at batch 1, 50.6 -> 48.6 ms at batch 16). A narrow input (the
    # stem's 16 channels) stays a convolution, which fuses its producer: as a dot it ran slower and
    # held one more activation.
    return (jax.default_backend() == "cpu" and groups == 1 and int(np.prod(kernel.shape[:-2])) == 1
            and x.shape[-1] > _NARROW_INPUT and all(d == 1 for d in input_dilation)
            and all(p == (0, 0) for p in pads))


def _use_depthwise_taps(x, kernel, input_dilation, groups) -> bool:
    return (jax.default_backend() == "cpu" and groups > 1 and groups == x.shape[-1] == kernel.shape[-1]
            and all(d == 1 for d in input_dilation))


@dataclasses.dataclass(frozen=True)
class _Im2col:
    """The patches of a convolution as a (pixels, kernel taps x channels) matrix, by strided slicing.

    A linear map of ``x``: its transpose (slices become pads, the concatenation a split) is a cheap
    pad-and-add, so a convolution's backward pass is two dots plus adds — faster on CPU than XLA's
    convolution backward.
    """

    in_shape: tuple[int, ...]
    kernel_spatial: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple((i + lo + hi - (k - 1) * d - 1) // s + 1 for i, (lo, hi), k, d, s in
                     zip(self.in_shape[1:-1], self.pads, self.kernel_spatial, self.dilation, self.strides))

    @property
    def packable(self) -> bool:
        return len(self.kernel_spatial) == 2

    def taps(self, x):
        """The input window under each kernel tap (row-major), each of shape (N, *out_spatial, C)."""
        if any(p != (0, 0) for p in self.pads):
            x = jnp.pad(x, ((0, 0),) + self.pads + ((0, 0),))
        for offs in np.ndindex(*self.kernel_spatial):
            start = (0,) + tuple(o * d for o, d in zip(offs, self.dilation)) + (0,)
            limit = ((x.shape[0],) + tuple(st + (o - 1) * s + 1 for st, o, s in
                                           zip(start[1:-1], self.out_spatial, self.strides)) + (x.shape[-1],))
            yield jax.lax.slice(x, start, limit, (1,) + self.strides + (1,))

    def __call__(self, x):
        patches = jnp.concatenate(list(self.taps(x)), axis=-1)
        return patches.reshape(-1, patches.shape[-1])

    def taps_product(self, x, kernel):
        """``self(x) @ kernel`` as a sum over kernel taps and input channels of shifted inputs times
        kernel rows: elementwise work XLA fuses into one loop, where a dot with a short contraction
        (a first layer's 3x3x1) runs far below the matmul units' speed."""
        y, row = None, 0
        for tap in self.taps(x):
            for c in range(tap.shape[-1]):
                term = tap[..., c:c + 1] * kernel[row]
                y = term if y is None else y + term
                row += 1
        return y.reshape(-1, kernel.shape[-1])

    def packed_input(self, x):
        """``x``'s sign bits (set where ``x < 0``) packed along channels and padded with clear bits (+1):
        uint32 ``(N, H + pads, W + pads, words per pixel)``. What a ±1 convolution keeps for its backward
        pass: 1/32 of ``x``, 1/taps of its patches."""
        if not self.padded:
            return packing.pack_bits(x)
        # x padded with +1 (clear bits), then packed: XLA fuses the pad into the packing loop, where
        # padding the words took one more kernel per layer (QuickNet's artifact, one A/B: batch 1
        # 4.18 -> 3.65 ms, batch 16 43.1 -> 41.7 ms; its training step unchanged)
        return packing.pack_bits(jnp.pad(x, ((0, 0),) + self.pads + ((0, 0),), constant_values=1))

    def rows_from_input(self, words):
        """:meth:`packed_rows` from :meth:`packed_input`'s words."""
        rows = packing.extract_patches(words, self.kernel_spatial, self.strides, ((0, 0),) * 2, self.dilation)
        return rows.reshape(-1, rows.shape[-1])

    def packed_rows(self, x):
        """The patches of ``x``'s sign bits (set where ``x < 0``): uint32 ``(M, taps * words per tap)``,
        each tap's channels packed into its own words; padded taps are clear bits (+1)."""
        return self.rows_from_input(self.packed_input(x))

    def float_product(self, x, kernel, precision=None):
        """``self(x) @ kernel`` as the backend's own convolution (GPUs, TPUs): float ``(M, N)``."""
        n = len(self.kernel_spatial)
        k = kernel.reshape(self.kernel_spatial + (self.in_shape[-1], kernel.shape[-1]))
        dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, _DIMENSION_NUMBERS[n])
        y = jax.lax.conv_general_dilated(x, k, self.strides, self.pads, rhs_dilation=self.dilation,
                                         dimension_numbers=dn, precision=precision)
        return y.reshape(-1, kernel.shape[-1])

    def backward_from_bits(self, words, g, kernel, precision, bf16: bool):
        """``(dx, dK)`` of ``self(x) @ kernel`` from :meth:`packed_input`'s words, one kernel row at a time.

        For tap ``t`` (offset ``o_t``): ``dK_t = A_t^T g`` with ``A_t`` the ±1 input under the tap (zero
        at zero-padded positions), unpacked from the words straight into the ``(C, M)`` layout, and
        ``dx[o_t + s p] += (g K_t^T)[p]``. A ``lax.scan`` over the kernel's rows keeps one row's taps
        (``kw`` of them: one ``g K_row^T`` dot and one pass over ``dx`` per row, one ``A_t^T g`` dot per
        tap) alive instead of the ``kh``-times larger patches and their gradient. Patches of up to
        ``_WHOLE_PATCHES_MAX_BYTES`` as floats take :func:`_backward_from_rows` instead: two dots, faster
        where memory is no concern. ``bf16``: bfloat16 operands (exact ±1 and kernel signs, ``g``
        rounded), float32 accumulation."""
        n, (ho, wo), c = self.in_shape[0], self.out_spatial, self.in_shape[-1]
        taps = int(np.prod(self.kernel_spatial))
        if n * ho * wo * taps * c * 4 <= _WHOLE_PATCHES_MAX_BYTES:  # small: one dot per operand is faster
            return _backward_from_rows(self, words, g, kernel, precision, bf16)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_spatial, self.strides, self.dilation
        o = kernel.shape[-1]
        dtype = jnp.bfloat16 if bf16 else g.dtype
        # the kernel copy and the zeroed dx below are made once g exists: XLA would otherwise build every
        # layer's early in the step and hold them all through the backward pass
        gd = g.astype(dtype)
        # (kh, N, kw * C): a row's g K_row^T contracts the kernel's leading axis; with K^T as the operand
        # XLA:CPU ran the bfloat16 dot in float32
        k_rows = _materialized(lambda: kernel.reshape(kh, kw * c, o).transpose(0, 2, 1).astype(dtype), g,
                               (kh, o, kw * c), dtype)
        dot = lambda a, b: jnp.dot(a, b, precision=None if bf16 else precision, preferred_element_type=jnp.float32)
        valid = jnp.asarray(self._valid_taps().reshape(kh, kw, 1, 1, -1), dtype) if self.padded else None
        window = ((ho - 1) * sh + 1, (wo - 1) * sw + 1)
        words_t = self._channel_major(words, g)

        def row(dx, i):
            w = jax.lax.dynamic_slice(words_t, (0, 0, i * dh, 0), (words.shape[-1], n, window[0], words.shape[2]))
            dks = []
            for j in range(kw):
                def unpack(j=j):
                    a = packing.unpack_bits(w[:, :, ::sh, j * dw:j * dw + window[1]:sw], c, dtype, 0)
                    return a if valid is None else (a.reshape(c, n, -1) * valid[i, j]).reshape(a.shape)

                # each tap's A_t unpacked on its own, in its slice's (C, n, Ho, Wo) shape: flattened inside
                # the unpacking loop, each element's pixel index was divided back into (n, row, column)
                # (5x slower), and stacking a row's taps there ran the loop 4x slower than three of them
                a_t = _materialized(unpack, g, (c, n, ho, wo), dtype)
                dks.append(dot(a_t.reshape(c, -1), gd))
            da = dot(gd, k_rows[i]).reshape(n, ho, wo, kw, c)
            if (sh, sw) != (1, 1):
                da = jax.lax.pad(da, jnp.zeros((), da.dtype),
                                 ((0, 0, 0), (0, 0, sh - 1), (0, 0, sw - 1), (0, 0, 0), (0, 0, 0)))
            # the row's taps shifted into place and summed: one read and write of dx's band
            zero = jnp.zeros((), da.dtype)
            contrib = sum(jax.lax.pad(da[:, :, :, j], zero, ((0, 0, 0), (0, 0, 0), (j * dw, (kw - 1 - j) * dw, 0),
                                                               (0, 0, 0))) for j in range(kw))
            start = (0, i * dh, 0, 0)
            dx = jax.lax.dynamic_update_slice(dx, jax.lax.dynamic_slice(dx, start, contrib.shape) + contrib, start)
            return dx, jnp.concatenate(dks)

        shape = words.shape[:3] + (c,)
        dx0 = _materialized(lambda: jnp.zeros(shape, jnp.float32), g, shape, jnp.float32)
        dx, dk = jax.lax.scan(row, dx0, jnp.arange(kh))
        (lo_h, _), (lo_w, _) = self.pads
        dx = dx[:, lo_h:lo_h + self.in_shape[1], lo_w:lo_w + self.in_shape[2]]
        return dx, dk.reshape(taps * c, -1)

    def packed_product(self, rows, kernel):
        """``self(x) @ kernel`` for a ±1 kernel ``(K, N)`` from ``rows = packed_rows(x)``; zero padding
        corrected exactly."""
        kernel4 = kernel.reshape(self.kernel_spatial + (self.in_shape[-1], kernel.shape[-1]))
        return self.product_of_words(rows, packing.pack_kernel(kernel4), kernel.shape[0],
                                     packing.tap_sums(kernel4) if self.padded else None)

    def product_of_words(self, rows, words, k: int, sums=None, inference: bool = False, xnor_kernel=None):
        """``rows`` times a packed kernel ``words`` (``(N, W)`` from :func:`packing.pack_kernel`): float32
        ``(M, N)``. With the kernel's :func:`packing.tap_sums` the padded taps count as zeros (LCE's
        zero-padding correction: they were read as +1); without, as +1 (one-padding). ``inference``,
        ``xnor_kernel``: :func:`packing.xnor_matmul`'s ``inference`` and ``kernel``."""
        # rows by image: what lets a symbolic batch block rows within images (packing.xnor_matmul)
        y = packing.xnor_matmul(rows.reshape(self.in_shape[0], -1, rows.shape[-1]), words, k, xnor_kernel, inference)
        return self._corrected(y, sums)

    def product_of_input(self, inwords, words, k: int, sums=None, inference: bool = False, xnor_kernel=None):
        """:meth:`product_of_words` from :meth:`packed_input`'s words: in packed inference on CPU with a
        kernel small enough for the fused direct kernel, straight from the taps (no patches)."""
        if inference and (xnor_kernel or packing.backend_kernel()) == "popcount" and packing._fuses_into_consumer(words):
            taps = packing.word_taps(inwords, self.kernel_spatial, self.strides, self.dilation)
            return self._corrected(packing.xnor_conv_taps(taps, words, k), sums)
        return self.product_of_words(self.rows_from_input(inwords), words, k, sums, inference, xnor_kernel)

    def _corrected(self, y, sums):
        n = y.shape[-1]
        if sums is not None and self.padded:
            corr = packing.pad_correction(sums, self.in_shape[1:3], self.strides, self.pads, self.dilation)
            y = y.reshape((self.in_shape[0], -1, n)) - corr.reshape(-1, n)
        return y.reshape(-1, n).astype(jnp.float32)

    def unpacked_transposed(self, words, dtype):
        """``self(x).T`` from ``words = packed_input(x)``: ``(K, M)`` ±1 with zeros at padded taps.

        Built in the transposed layout from the (32x smaller) words, so the backward pass's
        ``A^T @ g`` is a plain row-major matmul (XLA:CPU runs a transposed left operand through a
        slower matmul path) and the float patches are never stored between the passes. The words are
        made channel-major first and each tap unpacked along its contiguous pixel axis (2.7x faster than
        unpacking the transposed patches' words).
        """
        c, (sh, sw), (dh, dw), (ho, wo) = self.in_shape[-1], self.strides, self.dilation, self.out_spatial
        words_t = self._channel_major(words, words)
        taps = [words_t[:, :, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]
                for i, j in np.ndindex(*self.kernel_spatial)]
        # the taps' words stacked (small), then unpacked in one loop: stacking unpacked taps ran 2x slower
        a_t = packing.unpack_bits(jnp.stack(taps), c, dtype, axis=1)  # (taps, C, n, Ho, Wo)
        if self.padded:
            a_t = a_t.reshape(len(taps), c, self.in_shape[0], -1) * jnp.asarray(self._valid_taps(), dtype)
        return a_t.reshape(len(taps) * c, -1)

    @staticmethod
    def _channel_major(words, after):
        """:meth:`packed_input`'s words as ``(Wc, N, H, W)``, materialized once ``after`` exists: each tap's
        ``A_t`` then unpacks along its contiguous pixel axis (transposing every tap's words inside the
        unpacking loop ran 2.7x slower)."""
        return _materialized(lambda: words.transpose(3, 0, 1, 2), after, (words.shape[3],) + words.shape[:3],
                             words.dtype)

    @property
    def padded(self) -> bool:
        return any(p != (0, 0) for p in self.pads)

    def _valid_taps(self):
        """1 where a kernel tap reads a real pixel, 0 where it reads padding: (taps, 1, 1, Ho*Wo)."""
        inside = np.pad(np.ones(self.in_shape[1:-1], np.float32), self.pads)
        rows = []
        for offs in np.ndindex(*self.kernel_spatial):
            index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                          for o, d, n, s in zip(offs, self.dilation, self.out_spatial, self.strides))
            rows.append(inside[index].reshape(-1))
        return np.stack(rows)[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class _Rows:
    """``x`` of shape (..., K) as a (rows, K) matrix: the left operand of a dense layer."""

    in_shape: tuple[int, ...]

    def __call__(self, x):
        return x.reshape(-1, self.in_shape[-1])

    def packed_input(self, x):
        return packing.pack_bits(self(x))

    def rows_from_input(self, words):
        return words

    def packed_rows(self, x):
        return self.packed_input(x)

    def float_product(self, x, kernel, precision=None):
        return jnp.dot(self(x), kernel, precision=precision)

    def backward_from_bits(self, rows, g, kernel, precision, bf16: bool):
        return _backward_from_rows(self, rows, g, kernel, precision, bf16)

    def packed_product(self, rows, kernel):
        return self.product_of_words(rows, packing.pack_bits(kernel.T), kernel.shape[0])

    def product_of_words(self, rows, words, k: int, sums=None, inference: bool = False, xnor_kernel=None):
        return packing.xnor_matmul(rows, words, k, xnor_kernel, inference).astype(jnp.float32)

    def product_of_input(self, inwords, words, k: int, sums=None, inference: bool = False, xnor_kernel=None):
        return self.product_of_words(inwords, words, k, sums, inference, xnor_kernel)

    def unpacked_transposed(self, words, dtype):
        return packing.unpack_bits(words.T, self.in_shape[-1], dtype, axis=0)


# Float patches up to this size are unpacked whole for the backward pass (two dots: fast); larger ones,
# e.g. QuickNet's 56x56x64 blocks (231 MB at batch 32), one kernel row at a time (memory: 1/kernel rows).
_WHOLE_PATCHES_MAX_BYTES = 16 * 2**20


def _backward_from_rows(lhs, words, g, kernel, precision, bf16: bool):
    """``(dx, dK)`` of ``lhs(x) @ kernel`` from ``x``'s packed bits (``lhs.packed_input``): ``dK = A^T g``
    with ``A^T`` unpacked from the words straight into its transposed layout (a row-major dot operand),
    ``dx`` the transpose of ``lhs`` applied to ``g K^T``."""
    if bf16:
        # A is ±1, exact in bfloat16; g (and a kernel's column scale) are rounded to bfloat16 and the
        # products accumulated in float32: TPU's default matmul numerics
        g16 = g.astype(jnp.bfloat16)
        # a transposed operand XLA cannot fold back into the dot: folded, the bfloat16 dot gets a layout
        # XLA:CPU's matmul library lacks and is silently upcast to float32
        kt = _materialized(lambda: kernel.T.astype(jnp.bfloat16), g, kernel.T.shape, jnp.bfloat16)
        da = jnp.dot(g16, kt, preferred_element_type=jnp.float32)
        dk = jnp.dot(lhs.unpacked_transposed(words, jnp.bfloat16), g16, preferred_element_type=jnp.float32)
    else:
        da = jnp.dot(g, kernel.T, precision=precision)
        dk = jnp.dot(lhs.unpacked_transposed(words, g.dtype), g, precision=precision)
    dx, = jax.linear_transpose(lhs, jax.ShapeDtypeStruct(lhs.in_shape, g.dtype))(da.astype(g.dtype))
    return dx, dk


# a jit-cache-sensitive context: a function traced packed outside float_forward() is traced again inside
_FLOAT_FORWARD = jax.make_user_context(False)


def packed_training() -> bool:
    """Whether ±1 layers run their forward pass on packed bits here (CPU, outside :func:`float_forward`)."""
    # Measured faster than the float32 dot on CPU only; on GPUs/TPUs the packed kernel would be an
    # int8 dot, untimed against their float units here, so they keep the float path.
    return packing.backend_kernel() == "popcount" and not _FLOAT_FORWARD.value


def float_forward():
    """Trace ±1 layers with their plain float products and float residuals (no packed training forward,
    no bit residuals) inside this block: the reference computation, what Larq keeps, for comparisons
    and benchmarks. Latent-kernel layers only; a packed kernel from ``bnnjax.export.pack`` always runs
    packed.

    The setting is part of ``jax.jit``'s cache key: a function compiled outside the block is traced
    and compiled again inside it (and the reverse), never silently reused.
    """
    return _FLOAT_FORWARD(True)


def xnor_product(x, kernel, lhs=None, precision=None, scaled=False):
    """``lhs(x) @ kernel`` for ±1 operands: forward on packed bits (XNOR-popcount), backward in float.

    Forward: ``pack(A) XNOR-popcount pack(K)`` with ``A = lhs(x)``, exactly equal to the float32
    product (integers up to 2**24); with ``scaled=True`` the kernel is ``K * s`` (``s >= 0`` per
    column, XNOR-Net's and Bi-Real's kernels) and the integer product is multiplied by ``s``. Backward
    (``g`` the cotangent of the product)::

        dA = g @ K^T,   dK = A^T @ g,   dx = lhs^T(dA)

    with float32 accumulation — the gradients of the float product. Training a binary layer this way is
    faster on CPU: the forward dot costs a fraction of a float32 one, and only ``A``'s packed bits are
    kept for the backward pass, which unpacks them straight into ``A^T`` (a row-major matmul operand;
    the float patches are never stored).

    Precision of the backward dots: at JAX's default matmul precision their operands are bfloat16 —
    ``A`` and a ±1 ``K`` are exact, the cotangent ``g`` (and a scaled kernel's column scale) are
    rounded to 8 significant bits, TPU's ``DEFAULT`` numerics; about 20 % faster training on the
    CPU this was measured on. ``jax.default_matmul_precision("float32")`` or a float32 ``precision``
    (``HIGH``/``HIGHEST``) gives float32 operands: the float product's gradients up to summation
    order.

    Args:
      x: float array of ±1 values (a binarized activation).
      kernel: (K, N) float array of ±1 values (of ±s[n] in column n with ``scaled=True``).
      lhs: a linear map from ``x`` to the (M, K) left operand with ``packed_rows``, ``packed_product``
        and ``unpacked_transposed`` methods (im2col for a convolution); default: flatten every axis
        but the last.
      precision: ``jax.lax.Precision`` of the backward dots (``None`` follows
        ``jax.default_matmul_precision``).
      scaled: the kernel is a per-column scale times ±1.

    Returns:
      float32 (M, N).

    Reference: Rastegari et al., "XNOR-Net", ECCV 2016 (arXiv:1603.05279), for the XNOR-popcount
    product; the straight-through gradients come from the quantizers.
    """
    lhs = _Rows(tuple(x.shape)) if lhs is None else lhs
    if not packed_training():  # GPUs, TPUs: their own float product, the same bits kept for the backward
        return _lhs_product(lhs, "float_product", precision, x, kernel)
    return _lhs_product(lhs, "scaled_packed_product" if scaled else "packed_product", precision, x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lhs_product(lhs, forward, precision, x, kernel):
    """``lhs(x) @ kernel`` with the forward pass computed as ``forward`` names (``"packed_product"``,
    ``"scaled_packed_product"``, ``"taps_product"``: exact alternative formulations, see
    :func:`_lhs_forward`) and the float product's backward pass."""
    return _lhs_forward(lhs, forward, x, kernel)[0]


def _lhs_forward(lhs, forward, x, kernel):
    """The product and what the backward pass needs of ``A = lhs(x)``: ``x`` itself (``"taps_product"``,
    a real input), else ``x``'s packed sign bits (``lhs.packed_input``: 1/32 of ``x``), named
    ``"bnnjax_bits"``. The product is XNOR-popcount on those bits (``"packed_product"``,
    ``"scaled_packed_product"``) or the backend's float product of the ±1 values (``"float_product"``:
    GPUs, TPUs)."""
    if forward == "taps_product":
        return lhs.taps_product(x, kernel), x
    bits = checkpoint_name(lhs.packed_input(x), "bnnjax_bits")
    if forward == "float_product":
        return lhs.float_product(x, kernel), bits
    rows = lhs.rows_from_input(bits)
    if forward == "scaled_packed_product":
        # every entry of a column has the column's scale as its magnitude
        signs = jnp.where(kernel < 0, -1.0, 1.0).astype(kernel.dtype)
        return lhs.packed_product(rows, signs) * jnp.abs(kernel[0]), bits
    return lhs.packed_product(rows, kernel), bits


def _lhs_product_fwd(lhs, forward, precision, x, kernel):
    y, a_res = _lhs_forward(lhs, forward, x, kernel)
    if forward not in ("float_product", "taps_product"):
        # the popcount product converted to float once, on its own: fused into the backward's loops (the
        # BatchNorm's after it), the conversion kept the int32 product alive besides the float the
        # BatchNorm keeps, two arrays per activation (QuickNet, batch 64: 1,357 -> 849 MiB temporary
        # memory, together with ops.relu's output)
        y = _isolated(lambda: y, y, y.shape, y.dtype)
    return y, (a_res, kernel, jnp.zeros((), x.dtype))


_BFLOAT16_SETTINGS = (None, "default", "bfloat16", "BF16_BF16_F32")


def _bfloat16_gradients(precision) -> bool:
    """Whether the packed layers' backward dots take bfloat16 operands: at JAX's default matmul
    precision (what ``DEFAULT`` means on TPU), unless a float32 precision is asked for globally
    (``jax.default_matmul_precision("float32")``, ``JAX_DEFAULT_MATMUL_PRECISION=float32``) or per
    layer (``precision=jax.lax.Precision.HIGHEST``)."""
    if precision is not None and jax.lax.Precision(precision) != jax.lax.Precision.DEFAULT:
        return False
    return jax.config.jax_default_matmul_precision in _BFLOAT16_SETTINGS


def binary_gradient_precision(precision=None) -> str:
    """``"bfloat16"`` or ``"float32"``: the operands of the backward dots of a ±1 layer under the
    current settings (bfloat16 only where the forward pass runs on packed bits, i.e. on CPU)."""
    return "bfloat16" if packed_training() and _bfloat16_gradients(precision) else "float32"


def _materialized(fn, after, shape, dtype):
    """``fn()`` (of ``shape``, ``dtype``) in a computation XLA neither fuses into its users nor runs
    before the array ``after`` exists (:func:`packing._unfused`, probing ``after``'s first element)."""
    probe = after[(0,) * after.ndim]
    probe = probe if probe.dtype.itemsize == 4 else probe.astype(jnp.float32)
    return packing._unfused(fn, jax.lax.bitcast_convert_type(probe, jnp.uint32), shape, dtype)


# Below this size a value is left to XLA to fuse and schedule: a conditional around it costs more time
# than its memory is worth (seed 000's first layer at batch 64: 4.8 -> 6.0 s per epoch).
_ISOLATE_MIN_BYTES = 4 * 2**20


def _isolated(fn, after, shape, dtype, nbytes=None):
    """:func:`_materialized` where it holds at least ``_ISOLATE_MIN_BYTES`` (``nbytes``, default the
    result's size); else ``fn()``, left to XLA."""
    if (np.prod(shape) * np.dtype(dtype).itemsize if nbytes is None else nbytes) < _ISOLATE_MIN_BYTES:
        return fn()
    return _materialized(fn, after, shape, dtype)


def _lhs_product_bwd(lhs, forward, precision, res, g):
    a_res, kernel, x_dtype = res
    g = g.astype(x_dtype.dtype)
    if forward == "taps_product":  # a real input, kept as it is
        da = jnp.dot(g, kernel.T, precision=precision)
        # the patches made once g exists: XLA would otherwise build them from the input early in the step
        patches = _isolated(lambda: lhs(a_res), g, (g.shape[0], kernel.shape[0]), a_res.dtype)
        dk = jnp.dot(patches.T, g, precision=precision)
        # unused when x is the model's input: XLA drops it
        dx, = jax.linear_transpose(lhs, jax.ShapeDtypeStruct(lhs.in_shape, x_dtype.dtype))(da)
        return dx, dk.astype(kernel.dtype)
    # bfloat16 operands where the forward pass is packed (CPU); accelerators keep their own precision
    bf16 = forward != "float_product" and _bfloat16_gradients(precision) and x_dtype.dtype == jnp.float32
    dx, dk = lhs.backward_from_bits(a_res, g, kernel, precision, bf16)
    return dx.astype(x_dtype.dtype), dk.astype(kernel.dtype)


_lhs_product.defvjp(_lhs_product_fwd, _lhs_product_bwd)


def max_pool(x, window_shape: Sequence[int], strides: Sequence[int] | None = None, padding: str = "VALID"):
    """Max pooling, ``flax.linen.max_pool``'s signature, with a fast path for VALID, window == stride.

    Non-overlapping windows become a reshape and a max over the window axes. The gradient goes to the
    first maximal element of each window (row-major), as XLA's select-and-scatter (``nn.max_pool``)
    and TensorFlow route it — ties are common on the integer outputs of binary layers — but costs a
    compare-and-select instead of select-and-scatter, which is several times slower on CPU. Other
    cases call ``nn.max_pool``.
    """
    strides = tuple(window_shape) if strides is None else tuple(strides)
    window_shape = tuple(window_shape)
    if padding == "VALID" and strides == window_shape:
        return _window_max(x, window_shape)
    if padding == "VALID" and len(strides) == len(window_shape):
        return _strided_max(x, window_shape, strides)
    return nn.max_pool(x, window_shape, strides, padding)


def _offset_slices(x, window, strides, out):
    """For each window offset (row-major), the strided slice of ``x`` holding that offset of every window."""
    n = len(window)
    for offs in np.ndindex(*window):
        index = (slice(None),) + tuple(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(offs, out, strides))
        yield offs, x[index + (slice(None),) * (x.ndim - 1 - n)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _strided_max(x, window, strides):
    # not differentiated (inference): the maximum of shifted slices, computed on its own. Fused, XLA
    # duplicates it into each consumer, and QuickNet's blur pool reads it nine times per output (its
    # StableHLO artifact: 13.5 ms at batch 1 instead of 3.4); XLA's reduce-window (nn.max_pool) is
    # 4x slower than the slices (QuickNet's artifact: 5.3-5.4 ms at batch 1 instead of 6.0-6.3, 56 ms
    # at batch 16 instead of 72-75, A/B)
    out = tuple((d - w) // s + 1 for d, w, s in zip(x.shape[1:], window, strides))
    shape = (x.shape[0],) + out + x.shape[1 + len(window):]
    return _materialized(lambda: _strided_max_fwd(x, window, strides)[0], x, shape, x.dtype)


def _strided_max_fwd(x, window, strides):
    """Overlapping (or gapped) VALID windows, e.g. QuickNet's 2x2 stride-1 pool: an elementwise maximum over
    the window offsets' strided slices; the backward keeps ``x`` and ``y``, where select-and-scatter's
    transpose on XLA:CPU keeps four int32 indices per output."""
    out = tuple((d - w) // s + 1 for d, w, s in zip(x.shape[1:], window, strides))
    y = None
    for _, v in _offset_slices(x, window, strides, out):
        y = v if y is None else jnp.maximum(y, v)
    return y, (x, y)


def _strided_max_bwd(window, strides, res, g):
    x, y = res
    out = y.shape[1:1 + len(window)]
    seen, gx = None, None
    for offs, v in _offset_slices(x, window, strides, out):
        hit = v == y
        first = hit if seen is None else hit & ~seen  # the first maximum of each window, row-major
        seen = hit if seen is None else seen | hit
        part = jnp.where(first, g, jnp.zeros((), g.dtype))
        pads = [(0, 0, 0)] + [(o, d - o - (m - 1) * s - 1, s - 1) for o, d, m, s in zip(offs, x.shape[1:], out, strides)]
        part = jax.lax.pad(part, jnp.zeros((), g.dtype), pads + [(0, 0, 0)] * (x.ndim - len(pads)))
        gx = part if gx is None else gx + part
    return (gx,)


_strided_max.defvjp(_strided_max_fwd, _strided_max_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_max(x, window):
    return _window_max_fwd(x, window)[0]


def _windows(x, window):
    """Crop to whole windows and split each pooled axis into (out, window)."""
    n = len(window)
    out = [s // w for s, w in zip(x.shape[1:1 + n], window)]
    x = x[(slice(None),) + tuple(slice(0, o * w) for o, w in zip(out, window))]
    shape = (x.shape[0],) + tuple(v for o, w in zip(out, window) for v in (o, w)) + x.shape[1 + n:]
    return x.reshape(shape), tuple(2 + 2 * i for i in range(n))


def _window_max_fwd(x, window):
    xr, axes = _windows(x, window)
    # an elementwise maximum over the window offsets (not a reduction): XLA fuses it with the
    # elementwise producer of x (a first layer's shifted-sum convolution) into one loop
    y = None
    for offs in np.ndindex(*window):
        index = [slice(None)] * xr.ndim
        for a, o in zip(axes, offs):
            index[a] = o
        v = xr[tuple(index)]
        y = v if y is None else jnp.maximum(y, v)
    return y, (x, jnp.expand_dims(y, axes))


def _window_max_bwd(window, res, g):
    x, y = res
    xr, axes = _windows(x, window)
    hit = xr == y
    # Route g to the first hit of each window in row-major order. A running "seen" mask over the
    # window offsets is elementwise and fuses; a cumsum over the window lowers to a slow reduce-window.
    seen = None
    parts = []
    for offs in np.ndindex(*window):
        index = [slice(None)] * xr.ndim
        for a, o in zip(axes, offs):
            index[a] = slice(o, o + 1)
        h = hit[tuple(index)]
        first = h if seen is None else h & ~seen
        seen = h if seen is None else seen | h
        parts.append(jnp.where(first, jnp.expand_dims(g, axes), jnp.zeros((), g.dtype)))
    gr = _assemble_windows(parts, window, axes)
    n = len(window)
    gx = gr.reshape((x.shape[0],) + tuple(o * w for o, w in zip(g.shape[1:1 + n], window)) + x.shape[1 + n:])
    # windows cropped away at odd sizes get no gradient
    pads = [(0, 0)] + [(0, s - d) for s, d in zip(x.shape[1:1 + n], gx.shape[1:1 + n])] + [(0, 0)] * (x.ndim - 1 - n)
    return (jnp.pad(gx, pads),)


def _assemble_windows(parts, window, axes):
    """Inverse of indexing one offset per window: concatenate the per-offset pieces back along the
    window axes, last axis innermost (row-major offsets)."""
    for a, w in reversed(list(zip(axes, window))):
        parts = [jnp.concatenate(parts[i:i + w], axis=a) for i in range(0, len(parts), w)]
    return parts[0]


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


_DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


# --- inference on packed kernels ------------------------------------------------------------------

def _packed_product(lhs, inwords, kernel: packing.PackedKernel, zero_padded: bool, xnor_kernel: str):
    """``A @ K`` for ``inwords`` the packed input of ``A`` (``lhs.packed_input``) and a :class:`~bnnjax.packing.PackedKernel`
    ``K`` (a scale times ±1, or ABC-Net's ``sum_m alpha_m B_m``), float32 ``(M, N)``."""
    # the zero-padding correction's per-tap sums, from the words (XLA folds them for constant weights)
    sums = kernel.tap_sums() if zero_padded and getattr(lhs, "padded", False) else None
    if kernel.alpha is None:
        y = lhs.product_of_input(inwords, kernel.words, kernel.k, sums, True, xnor_kernel)
        return y if kernel.scale is None else y * kernel.scale
    y = None
    for m in range(kernel.words.shape[0]):
        z = kernel.alpha[m] * lhs.product_of_input(inwords, kernel.words[m], kernel.k, None if sums is None else sums[m],
                                                   True, xnor_kernel)
        y = z if y is None else y + z
    return y


def unpacked_kernel(kernel: packing.PackedKernel, dtype=jnp.float32):
    """A packed ±1 (scaled) kernel as the float kernel it stands for: what a layer with real-valued input
    multiplies by (its kernel is stored 1 bit per weight all the same)."""
    k = kernel.signs(dtype)
    return k if kernel.scale is None else k * kernel.scale.astype(dtype)


def _check_packed(x, kernel: packing.PackedKernel, rank: int):
    if len(kernel.shape) != rank:
        raise ValueError(f"a packed kernel of shape {kernel.shape} does not fit this layer (rank {rank} kernel).")
    if x.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"input has {x.shape[-1]} channels/features, the packed kernel expects {kernel.shape[-2]}.")


def packed_dense(x, kernel: packing.PackedKernel, shifts=None, betas=None):
    """A ±1 dense layer's product on a packed kernel: ``sign(x) @ K``, exactly (inference).

    The input's sign bits are packed directly (set where ``x < 0``: what every ±1 input quantizer
    outputs, ``sign(0) = +1``), so no ±1 float array is formed and XLA fuses the producer of ``x``
    (a BatchNorm, a residual add) with the packing. With ABC-Net's ``shifts`` ``v_n`` and ``betas``,
    the input is ``sum_n beta_n sign(x + v_n - 0.5)`` (its N binary activation bases).

    Args:
      x: float ``(..., K)``.
      kernel: from ``bnnjax.export.pack``.

    Returns:
      float32 ``(..., N)``.
    """
    _check_packed(x, kernel, 2)
    lhs = _Rows(tuple(x.shape))
    y = _bases_product(lhs, x, kernel, shifts, betas, True, packing.backend_kernel())
    return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


def packed_conv(x, kernel: packing.PackedKernel, *, strides=1, padding="SAME", pad_values=0.0, kernel_dilation=1,
                shifts=None, betas=None):
    """A ±1 2-D convolution on a packed kernel (NHWC), exactly; see :func:`packed_dense`.

    Padded taps are +1 bits for ``pad_values=1.0`` (one-padding) and count as zeros for ``0.0`` (LCE's
    correction from the kernel's tap sums).

    Raises:
      ValueError: a kernel or input that does not fit, or ``pad_values`` other than 0 and 1 with padding.
    """
    _check_packed(x, kernel, 4)
    strides, dilation = _tuple(strides, 2, "strides"), _tuple(kernel_dilation, 2, "kernel_dilation")
    pads = tuple(_padding.resolve(padding, x.shape[1:3], kernel.shape[:2], strides, dilation))
    if pad_values not in (0.0, 1.0) and any(p != (0, 0) for p in pads):
        raise ValueError(f"packed convolutions pad with 0.0 or 1.0, got pad_values={pad_values}.")
    im2col = _Im2col(tuple(x.shape), tuple(kernel.shape[:2]), strides, pads, dilation)
    y = _bases_product(im2col, x, kernel, shifts, betas, pad_values == 0.0, packing.backend_kernel())
    return y.reshape((x.shape[0],) + im2col.out_spatial + (kernel.shape[-1],))


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _bases_product(lhs, x, kernel, shifts, betas, zero_padded: bool, xnor_kernel: str):
    # jit: layers of the same shapes share one lowered function, the weights its arguments, so an
    # exported model holds each distinct layer's code once (XLA inlines the calls and still folds
    # constant weights). xnor_kernel, the XNOR kernel chosen for this backend, is static: a trace for
    # one backend's kernel is not reused for another's.
    if shifts is None:
        return _packed_product(lhs, lhs.packed_input(x), kernel, zero_padded, xnor_kernel)
    y = None
    for n in range(shifts.shape[0]):
        # ABC's A_n = sign(clip(x + v_n, 0, 1) - 0.5) is -1 exactly where x + v_n - 0.5 < 0
        z = betas[n] * _packed_product(lhs, lhs.packed_input(x + shifts[n] - 0.5), kernel, zero_padded, xnor_kernel)
        y = z if y is None else y + z
    return y


# --- the layers' computations ---------------------------------------------------------------------
# The linen modules (bnnjax.layers) and the NNX modules (bnnjax.nnx) create variables and call these;
# each layer's arithmetic, and its choice between the latent kernel, the packed training forward and a
# packed kernel, exists only here.

def packs_dense(input_quantizer, kernel_quantizer) -> bool:
    """Whether a dense layer with these quantizers runs on packed bits: its input is binarized to ±1
    and its kernel is ±1 or a per-channel scale times ±1 (what ``bnnjax.export.pack`` packs)."""
    qi, qk = quantizers.get(input_quantizer), quantizers.get(kernel_quantizer)
    return qi.values == "signs" and qk.values in ("signs", "scaled_signs")


def packs_conv(input_quantizer, kernel_quantizer, *, rank: int, feature_group_count: int = 1, input_dilation=1,
               pad_values: float = 0.0) -> bool:
    """Whether a convolution with these settings runs on packed bits: as :func:`packs_dense`, for a
    2-D ungrouped convolution without input dilation that pads with 0 or 1."""
    return (packs_dense(input_quantizer, kernel_quantizer) and rank == 2 and feature_group_count == 1
            and _tuple(input_dilation, 2, "input_dilation") == (1, 1) and pad_values in (0.0, 1.0))


def _sign_operands(qi, qk, x) -> bool:
    """±1 operands in float32 outside :func:`float_forward`: :func:`xnor_product` computes the product
    (on packed bits on CPU) and keeps only the input's sign bits for the backward pass."""
    return packs_dense(qi, qk) and x.dtype == jnp.float32 and not _FLOAT_FORWARD.value


def _quantize(q, x, key):
    if not q.needs_rng:
        return q(x)
    if key is not None:
        return q(x, key)
    # no key (evaluation): BinaryConnect's deterministic test-time binarization
    return quantizers.ste_sign(x, dict(q.kwargs).get("clip_value", 1.0))


def _quantizer_keys(qi, qk, rng):
    if rng is None or not (qi.needs_rng or qk.needs_rng):
        return None, None
    ki, kk = jax.random.split(rng)
    return ki, kk


def _check_features(layer: str, x, kernel_shape, groups: int = 1, what: str = "in_features"):
    want = kernel_shape[-2] * groups
    if x.shape[-1] != want:
        raise ValueError(f"{layer}: the input has {x.shape[-1]} features (last axis of shape {tuple(x.shape)}) but "
                         f"its kernel {tuple(kernel_shape)} takes {want}; feed it inputs with {want} features, or "
                         f"build the layer with {what}={x.shape[-1]}.")


def _hashable(v):
    return tuple(_hashable(e) for e in v) if isinstance(v, (list, tuple)) else v


def _compiled_when_eager(fn):
    """``fn`` run as one compiled program when called on concrete arrays (an NNX model or
    ``model.apply`` called without ``jit``), as itself inside a trace.

    Op by op, a packed layer's bit packing and word loops compile as dozens of tiny programs (seconds
    for a small CNN's first call); under ``jit`` this function is traced inline as before. The
    keyword-only arguments are static, except ``rng``.
    """
    names = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY} - {"rng"}
    jitted = jax.jit(fn, static_argnames=sorted(names))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        static = {k: _hashable(v) for k, v in kwargs.items() if k in names}
        dynamic = {k: v for k, v in kwargs.items() if k not in names}
        if all(isinstance(v, (np.ndarray, jax.Array)) and not isinstance(v, jax.core.Tracer)
               for v in jax.tree.leaves((args, dynamic))):
            try:
                hash(tuple(static.values()))
            except TypeError:  # e.g. a quantizer object that is not hashable: op by op, as before
                return fn(*args, **kwargs)
            return jitted(*args, **dynamic, **static)
        return fn(*args, **kwargs)

    return call


def _add_bias(y, bias):
    return y if bias is None else y + bias


@_compiled_when_eager
def quant_dense(x, kernel, bias=None, *, input_quantizer=None, kernel_quantizer=None, precision=None, dtype=None,
                rng=None):
    """A quantized dense layer: ``y = q_in(x) @ q_k(W) + b``.

    Forward as written; the backward pass is the quantizers' surrogate gradients through the float
    product (``dx = q_in'(x) * (g @ q_k(W)^T)``, ``dW = q_k'(W) * (q_in(x)^T @ g)``). ±1 operands in
    float32 on CPU compute the product on packed bits (:func:`xnor_product`: the same values). A
    :class:`~bnnjax.packing.PackedKernel` kernel (from ``bnnjax.export.pack``) is used as it is: packed
    XNOR-popcount on the input's signs when the layer binarizes its input (:func:`packed_dense`), else
    unpacked to the ±1 (scaled) kernel it stands for.

    Args:
      x: ``(..., in_features)``.
      kernel: the latent kernel ``(in_features, out_features)`` or a ``PackedKernel``.
      bias: ``(out_features,)`` or None.
      input_quantizer, kernel_quantizer: names, callables or ``Quantizer`` objects (None: full precision).
      precision: ``jax.lax.Precision`` of the dot.
      dtype: computation dtype (None: promote the operands').
      rng: PRNG key for stochastic quantizers (None: their deterministic evaluation form).

    Returns:
      ``(..., out_features)``.

    Raises:
      ValueError: a scalar input, or one whose last axis does not fit the kernel.
    """
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("a dense layer expects inputs of rank >= 1 (..., features), got a scalar.")
    qi, qk = quantizers.get(input_quantizer), quantizers.get(kernel_quantizer)
    _check_features("dense layer", x, kernel.shape)
    if isinstance(kernel, packing.PackedKernel):
        if packs_dense(qi, qk):
            return _add_bias(packed_dense(x, kernel), bias)
        k = unpacked_kernel(kernel)  # a 1-bit kernel on real input
        ki = _quantizer_keys(qi, qk, rng)[0]
    else:
        ki, kk = _quantizer_keys(qi, qk, rng)
        k = _quantize(qk, kernel, kk)
    x = _quantize(qi, x, ki)
    x, k, bias = nn.dtypes.promote_dtype(x, k, bias, dtype=dtype)
    if _sign_operands(qi, qk, x):
        y = xnor_product(x, k, precision=precision, scaled=qk.values == "scaled_signs")
        y = y.reshape(x.shape[:-1] + (k.shape[-1],))
    else:
        y = jax.lax.dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return _add_bias(y, bias)


@_compiled_when_eager
def quant_conv(x, kernel, bias=None, *, strides=1, padding="SAME", pad_values: float = 0.0, input_dilation=1,
               kernel_dilation=1, feature_group_count: int = 1, input_quantizer=None, kernel_quantizer=None,
               precision=None, dtype=None, rng=None):
    """A quantized N-d convolution (N = kernel rank - 2, channels last): ``conv(pad(q_in(x), pad_values),
    q_k(W)) + b``.

    ``pad_values=1.0`` pads a ±1 input with +1 (one-padding: every input of a binary convolution stays
    binary); 0.0 is Flax's zero padding. A depthwise convolution is ``feature_group_count = C`` with a
    ``(kh, kw, 1, C * multiplier)`` kernel. Gradients, the packed training forward and
    ``PackedKernel`` kernels as in :func:`quant_dense` (packed for 2-D ungrouped convolutions:
    :func:`packs_conv`, :func:`packed_conv`).

    Args:
      x: ``(N, *spatial, C)``.
      kernel: the latent ``(*kernel_size, C // groups, out_features)`` kernel or a ``PackedKernel``.
      bias: ``(out_features,)`` or None.
      strides, padding, input_dilation, kernel_dilation, feature_group_count: as ``flax.linen.Conv``.

    Returns:
      ``(N, *out_spatial, out_features)``.

    Raises:
      ValueError: an input of the wrong rank or channel count.
    """
    x = jnp.asarray(x)
    n = len(kernel.shape) - 2
    if x.ndim != n + 2:
        raise ValueError(f"a {n}-D convolution expects inputs of rank {n + 2} (batch, *spatial, channels), got shape "
                         f"{tuple(x.shape)}; add a batch axis with x[None] or reshape the input.")
    g = feature_group_count
    _check_features("convolution", x, kernel.shape, g)
    qi, qk = quantizers.get(input_quantizer), quantizers.get(kernel_quantizer)
    if isinstance(kernel, packing.PackedKernel):
        if packs_conv(qi, qk, rank=n, feature_group_count=g, input_dilation=input_dilation, pad_values=pad_values):
            return _add_bias(packed_conv(x, kernel, strides=strides, padding=padding, pad_values=pad_values,
                                         kernel_dilation=kernel_dilation), bias)
        k = unpacked_kernel(kernel)  # a 1-bit kernel on real input
        ki = _quantizer_keys(qi, qk, rng)[0]
    else:
        ki, kk = _quantizer_keys(qi, qk, rng)
        k = _quantize(qk, kernel, kk)
    x = _quantize(qi, x, ki)
    x, k, bias = nn.dtypes.promote_dtype(x, k, bias, dtype=dtype)
    y = conv_nd(x, k, strides=strides, padding=padding, pad_values=pad_values, input_dilation=input_dilation,
                kernel_dilation=kernel_dilation, feature_group_count=g, precision=precision,
                signs=_sign_operands(qi, qk, x), scaled=qk.values == "scaled_signs")
    return _add_bias(y, bias)


def abc_weight_bases(w, num_bases: int):
    """ABC-Net's binary weight bases and their least-squares scales.

    ``B_i = sign(W - mean(W) + u_i std(W))`` with ``u_i = -1 + 2 (i - 1) / (M - 1)`` (``u = 0`` for
    ``M = 1``), and ``alpha = argmin ||vec(W) - sum_i alpha_i vec(B_i)||^2`` solved in closed form.
    The sign uses a straight-through gradient (``dB_i/dW = 1``); alpha is a constant for the backward
    pass, so ``dL/dW = sum_i alpha_i dL/dB_i`` as in the paper.

    Args:
      w: latent float kernel.
      num_bases: M >= 1.

    Returns:
      ``(bases, alpha)``: bases of shape ``(M,) + w.shape`` with values ±1, alpha of shape ``(M,)``.

    Reference: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017.
    """
    if num_bases < 1:
        raise ValueError(f"num_weight_bases must be >= 1, got {num_bases}.")
    u = jnp.zeros((1,)) if num_bases == 1 else jnp.linspace(-1.0, 1.0, num_bases)
    mean, std = jax.lax.stop_gradient(jnp.mean(w)), jax.lax.stop_gradient(jnp.std(w))
    shifted = (w - mean)[None] + (u * std).reshape((-1,) + (1,) * w.ndim).astype(w.dtype)
    bases = quantizers.ste_sign(shifted, clip_value=None)
    a = jax.lax.stop_gradient(bases.reshape(num_bases, -1).T.astype(jnp.float32))
    alpha, *_ = jnp.linalg.lstsq(a, jax.lax.stop_gradient(w).reshape(-1).astype(jnp.float32))
    return bases, alpha.astype(w.dtype)


def abc_activation_bases(x, shifts):
    """ABC-Net's shifted binarizations of an input: ``A_n = sign(clip(x + v_n, 0, 1) - 0.5)``.

    Backward: straight-through sign, so ``dA_n/dx = dA_n/dv_n = 1(0 <= x + v_n <= 1)``.

    Returns:
      Array of shape ``(N,) + x.shape`` with values ±1.
    """
    v = shifts.reshape((-1,) + (1,) * x.ndim).astype(x.dtype)
    return quantizers.ste_sign(jnp.clip(x[None] + v, 0, 1) - 0.5, clip_value=None)


def _abc(x, kernel, bias, shift, beta, num_weight_bases, dtype, op, packed_op):
    if shift is not None and beta is None:
        raise ValueError("ABC layers with activation bases need both shift and beta.")
    if isinstance(kernel, packing.PackedKernel):
        if shift is None or packed_op is None:
            raise ValueError("a packed ABC kernel needs binary activation bases (shift, beta) and a 1-D or 2-D layer.")
        return _add_bias(packed_op(x, kernel, shift, beta), bias)
    bases, alpha = abc_weight_bases(kernel, num_weight_bases)
    w_hat = jnp.tensordot(alpha, bases, axes=1)
    if shift is not None:
        # sum_n beta_n sum_m alpha_m op(A_n, B_m) = op(sum_n beta_n A_n, sum_m alpha_m B_m): one op
        # trains the same function with the same gradients as the M x N binary ops it stands for.
        x = jnp.tensordot(beta, abc_activation_bases(x, shift), axes=1)
    x, w_hat, bias = nn.dtypes.promote_dtype(x, w_hat, bias, dtype=dtype)
    return _add_bias(op(x, w_hat), bias)


@_compiled_when_eager
def abc_dense(x, kernel, bias=None, shift=None, beta=None, *, num_weight_bases: int = 3, precision=None, dtype=None):
    """ABC-Net's dense layer: ``y = sum_n beta_n sum_m alpha_m (A_n @ B_m) + b``.

    ``B_m``, ``alpha`` from :func:`abc_weight_bases` (alphas solved by least squares in every forward
    pass), ``A_n`` from :func:`abc_activation_bases` with the learned ``shift`` ``v_n`` and ``beta``;
    ``shift=None`` keeps the input real (ABC's ApproxDense). A ``PackedKernel`` (the M bases packed)
    runs the M x N binary products on packed bits (:func:`packed_dense`).

    Reference: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017.
    """
    x = jnp.asarray(x)
    _check_features("ABC dense layer", x, kernel.shape)
    dot = lambda a, w: jax.lax.dot_general(a, w, (((a.ndim - 1,), (0,)), ((), ())), precision=precision)
    packed = lambda a, k, v, b: packed_dense(a, k, shifts=v, betas=b)
    return _abc(x, kernel, bias, shift, beta, num_weight_bases, dtype, dot, packed)


@_compiled_when_eager
def abc_conv(x, kernel, bias=None, shift=None, beta=None, *, strides=1, padding="SAME", kernel_dilation=1,
             num_weight_bases: int = 3, precision=None, dtype=None):
    """ABC-Net's convolution (1-3 D): ``y = sum_n beta_n sum_m alpha_m conv(A_n, B_m) + b``; see
    :func:`abc_dense` (packed for 2-D kernels: :func:`packed_conv`).

    Reference: Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017.
    """
    x = jnp.asarray(x)
    n = len(kernel.shape) - 2
    if x.ndim != n + 2:
        raise ValueError(f"a {n}-D ABC convolution expects inputs of rank {n + 2} (batch, *spatial, channels), got "
                         f"shape {tuple(x.shape)}.")
    _check_features("ABC convolution", x, kernel.shape)
    conv = lambda a, w: conv_nd(a, w, strides=strides, padding=padding, kernel_dilation=kernel_dilation,
                                precision=precision)
    packed = None
    if n == 2:
        packed = lambda a, k, v, b: packed_conv(a, k, strides=strides, padding=padding,
                                                kernel_dilation=kernel_dilation, shifts=v, betas=b)
    return _abc(x, kernel, bias, shift, beta, num_weight_bases, dtype, conv, packed)


def batch_norm(x, scale, bias, reduction_axes: tuple[int, ...], epsilon: float):
    """BatchNorm in training mode, whose backward pass keeps only its input: ``(y, mean, var)``.

    Forward (Flax's ``BatchNorm``, bit for bit): ``mean = E[x]``, ``var = max(0, E[x^2] - mean^2)``
    over ``reduction_axes``, ``y = (x - mean) * (scale / sqrt(var + epsilon)) + bias``.
    Backward, with ``r = 1 / sqrt(var + epsilon)``, ``x_hat = (x - mean) r`` and means over the reduced
    axes: ``dbias = sum(g)``, ``dscale = sum(g x_hat)``, ``dx = scale r (g - E[g] - x_hat E[g x_hat])``
    (plus the terms of cotangents of ``mean`` and ``var``). Autodiff of the forward would keep
    ``x - mean`` and ``(x - mean) r`` besides ``x``: three float arrays per element where one suffices.

    Args:
      x: float32 input.
      scale, bias: arrays broadcastable to ``x`` (shape 1 along ``reduction_axes``), or None.
      reduction_axes: the axes the statistics reduce over (all but the feature axes).
      epsilon: added to the variance.

    Returns:
      ``y`` and the batch ``mean`` and ``var`` (shape of ``x`` without ``reduction_axes``).
    """
    scale = jnp.ones((), x.dtype) if scale is None else scale
    bias = jnp.zeros((), x.dtype) if bias is None else bias
    return _batch_norm(tuple(sorted(a % x.ndim for a in reduction_axes)), float(epsilon), x, scale, bias)


def _batch_norm_stats(axes, x):
    mu, mu2 = x.mean(axes), jax.lax.square(x).mean(axes)
    return mu, mu2 - jax.lax.square(mu)


def _batch_norm_y(axes, epsilon, x, mean, var, scale, bias):
    mul = jax.lax.rsqrt(jnp.expand_dims(var, axes) + epsilon) * scale
    return (x - jnp.expand_dims(mean, axes)) * mul + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _batch_norm(axes, epsilon, x, scale, bias):
    mean, raw_var = _batch_norm_stats(axes, x)
    var = jnp.maximum(0.0, raw_var)
    return _batch_norm_y(axes, epsilon, x, mean, var, scale, bias), mean, var


def _batch_norm_fwd(axes, epsilon, x, scale, bias):
    mean, raw_var = _batch_norm_stats(axes, x)
    var = jnp.maximum(0.0, raw_var)
    y = _batch_norm_y(axes, epsilon, x, mean, var, scale, bias)
    return (y, mean, var), (x, mean, raw_var, scale, bias)


def _batch_norm_bwd(axes, epsilon, res, cotangents):
    x, mean, raw_var, scale, bias = res
    g, g_mean, g_var = cotangents
    var = jnp.maximum(0.0, raw_var)
    n = np.prod([x.shape[a] for a in axes])
    ex = lambda v: jnp.expand_dims(v, axes)  # noqa: E731
    r = jax.lax.rsqrt(var + epsilon)
    # Only sums of g and g x, then one loop over g and x: no full-size array that depends on x alone,
    # which XLA would compute early in the step and hold (x_hat is a second float per element)
    g_sum = jnp.sum(g, axes)
    gc_sum = jnp.sum(g * x, axes) - mean * g_sum  # sum(g (x - mean))
    live = raw_var > 0  # var clipped at 0: no gradient through it
    k1 = ex(r) * scale
    k2 = ex(jnp.where(live, r ** 3 * gc_sum / n, 0.0)) * scale
    k3 = ex(jnp.where(live, 2 * g_var / n, 0.0))
    dx = k1 * g - k1 * ex(g_sum / n) + (k3 - k2) * (x - ex(mean)) + ex(g_mean / n)
    # scale and bias have x's rank with 1 along the reduced axes, or are the scalars batch_norm put in
    dscale = ex(r * gc_sum).reshape(scale.shape) if scale.ndim else jnp.sum(r * gc_sum)
    dbias = ex(g_sum).reshape(bias.shape) if bias.ndim else jnp.sum(g_sum)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def folded_batch_norm(x, multiplier, offset, axis=-1, dtype=None):
    """A BatchNorm folded for inference: ``y = x * a + b`` with ``a``, ``b`` per feature along ``axis``
    (``a = scale / sqrt(var + eps)``, ``b = bias - mean * a``: LCE's multiplier and offset)."""
    axes = tuple(sorted({a % x.ndim for a in (axis if isinstance(axis, tuple) else (axis,))}))
    # broadcast straight to x's shape: one op per vector in an exported program, not a reshape and a
    # broadcast (under a symbolic batch, each also rebuilds the shape)
    a, b = (jax.lax.broadcast_in_dim(v.reshape([x.shape[i] for i in axes]), x.shape, axes) for v in (multiplier, offset))
    y = x * a + b
    return y if dtype is None else y.astype(dtype)


@jax.custom_vjp
def relu(x):
    """``max(x, 0)`` whose backward keeps its output: ``dx = g * (y > 0)`` (``jax.nn.relu``'s gradient).

    ``jax.nn.relu`` keeps its input for the mask; where a BatchNorm keeps the ReLU's output too (a
    binary block's ``BatchNorm(relu(conv(x)))``), that is two float arrays per element instead of one.
    """
    return jnp.maximum(x, 0)


def _relu_fwd(x):
    # isolated for the reason the packed product is (_lhs_product_fwd): one float array, read by the
    # mask and by the BatchNorm after it, instead of that and the input XLA would recompute it from
    y = _isolated(lambda: jnp.maximum(x, 0), x, x.shape, x.dtype)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0, g, jnp.zeros((), g.dtype)),)


relu.defvjp(_relu_fwd, _relu_bwd)


def prelu(x, alpha):
    """Parametric ReLU: ``y = max(x, 0) + alpha * min(x, 0)`` (He et al., ICCV 2015)."""
    return jnp.maximum(x, 0) + alpha.astype(x.dtype) * jnp.minimum(x, 0)


def abc_default_shifts(num_act_bases: int, dtype=jnp.float32):
    """ABC-Net's initial activation shifts: ``num_act_bases`` values spread evenly inside (-0.5, 0.5)."""
    return jnp.linspace(-0.5, 0.5, num_act_bases + 2)[1:-1].astype(dtype)


def flatten(x):
    """Every axis but the batch axis flattened (Keras' ``Flatten``)."""
    return x.reshape((x.shape[0], -1))


def global_avg_pool(x):
    """Mean over every spatial axis: ``(N, *spatial, C) -> (N, C)`` (Keras' ``GlobalAveragePooling``).

    Raises:
      ValueError: an input of rank < 3.
    """
    if x.ndim < 3:
        raise ValueError(f"GlobalAvgPool expects inputs of rank >= 3 (batch, *spatial, channels), got shape "
                         f"{tuple(x.shape)}.")
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def activation(fn):
    """The elementwise function ``fn`` names (a ``jax.nn`` function such as ``"relu"``), or ``fn`` itself.

    Raises:
      ValueError: a name that is not a ``jax.nn`` function.
    """
    if not isinstance(fn, str):
        return fn
    f = getattr(jax.nn, fn, None)
    if not callable(f):
        raise ValueError(f"unknown activation {fn!r}: name a jax.nn function such as 'relu'.")
    return f
