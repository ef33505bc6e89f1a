"""Bit-packed binary compute: pack ±1 values into uint32 words, XNOR-popcount matmul and convolution.

Bit layout (the one definition every other module uses):

* Values are packed along the **contraction axis** into ``uint32`` words, **LSB first**: bit ``j`` of
  word ``w`` holds element ``32 w + j``.
* A set bit means **-1**, a clear bit means **+1** (the sign bit of the float; ``sign(0) = +1``).
* A contraction length ``k`` that is not a multiple of 32 is padded with clear bits (+1) in **both**
  operands; padded positions then agree and add nothing to the popcount, so
  ``dot(a, b) = k - 2 * popcount(a XOR b)`` with the true ``k`` is exact for any ``k``.

The CPU kernel processes 8 rows of ``a`` per vector (the "row-blocked" layout ``(M/8, W, 8)``) so each
word of ``b`` is loaded once for 8 rows; XLA vectorizes the 8 lanes with AVX-512 popcounts. Other
backends unpack to int8 and use their integer dot units. The choice is made at trace time in
:func:`xnor_matmul`; callers never branch.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from bnnjax import _padding

__all__ = ["WORD_BITS", "num_words", "pack_bits", "unpack_bits", "xnor_matmul", "xnor_matmul_blocked",
           "block_rows", "unblock_rows", "ROW_BLOCK", "binary_conv2d", "extract_patches", "word_taps",
           "xnor_conv_taps", "pad_correction", "tap_sums", "backend_kernel", "compiler_options", "cpu_flags",
           "pack_kernel", "PackedKernel"]

WORD_BITS = 32
ROW_BLOCK = 8  # rows of the left operand per vector lane group on CPU
_SHIFTS = np.arange(WORD_BITS, dtype=np.uint32)


def num_words(k: int) -> int:
    """Words needed for ``k`` bits."""
    return -(-k // WORD_BITS)


def pack_bits(x, axis: int = -1):
    """Pack the signs of ``x`` along ``axis`` into uint32 words (layout in the module docstring).

    Args:
      x: any real array (±1 values, or floats whose sign is taken; sign(0) = +1), or booleans where
        True means -1.
      axis: the contraction axis; it becomes the last axis, of length ``num_words(x.shape[axis])``.

    Returns:
      uint32 array of shape ``x.shape`` without ``axis`` plus ``(num_words,)``.
    """
    x = jnp.asarray(x)
    axis = axis % x.ndim
    # the words are formed where the axis lies and only they (1/32 of x) are moved to the end: moving
    # the floats first made XLA read them transposed inside the reduction (a (3, 3, 512, 512) kernel:
    # 33 ms instead of 2.6 in the QuickNet training step)
    return jnp.moveaxis(_words_in_place(x, axis), axis, -1)


def _words_in_place(x, axis: int):
    """:func:`pack_bits` with the word axis left where ``axis`` was."""
    bits = x if x.dtype == jnp.bool_ else x < 0
    k = bits.shape[axis]
    w = num_words(k)
    if w * WORD_BITS != k:
        bits = jnp.pad(bits, [(0, w * WORD_BITS - k) if i == axis else (0, 0) for i in range(bits.ndim)])
    bits = bits.reshape(bits.shape[:axis] + (w, WORD_BITS) + bits.shape[axis + 1:]).astype(jnp.uint32)
    if axis == bits.ndim - 2:
        # the 32 shifted bits of a word are disjoint, so their sum is their bitwise OR
        return jnp.sum(bits << _SHIFTS, axis=-1, dtype=jnp.uint32)
    # an inner axis: 32 shifted slices OR-ed elementwise (a reduction over an inner axis ran 4x slower,
    # and XLA took seconds to constant-fold it for a kernel closed over by jit)
    words = lax.index_in_dim(bits, 0, axis + 1, keepdims=False)
    for j in range(1, WORD_BITS):
        words = words | (lax.index_in_dim(bits, j, axis + 1, keepdims=False) << np.uint32(j))
    return words


def _bit_patterns(words, k: int, dtype, axis: int):
    """:func:`unpack_bits` as the unsigned integers holding the floats' bit patterns (stackable and
    concatenable without XLA:CPU's float conversions of bfloat16), or None for non-float ``dtype``."""
    dtype = jnp.dtype(dtype)
    if dtype not in _ONE_BITS:
        return None
    uint, one = _ONE_BITS[dtype]
    return (_bits(words, k, axis).astype(uint) << (8 * dtype.itemsize - 1)) | uint(one)


def _bits(words, k: int, axis: int):
    words = jnp.asarray(words, jnp.uint32)
    axis = axis % words.ndim
    shifts = _SHIFTS.reshape((WORD_BITS,) + (1,) * (words.ndim - 1 - axis))
    bits = (jnp.expand_dims(words, axis + 1) >> shifts) & 1
    bits = bits.reshape(words.shape[:axis] + (-1,) + words.shape[axis + 1:])
    return lax.slice_in_dim(bits, 0, k, axis=axis)


def unpack_bits(words, k: int, dtype=jnp.float32, axis: int = -1):
    """Inverse of :func:`pack_bits`: ±1 values of the first ``k`` bits of the words along ``axis``.

    The bits replace the word axis in place: ``(..., W)`` becomes ``(..., k)`` for ``axis=-1``, and
    ``(W, M)`` becomes ``(k, M)`` for ``axis=0`` (a transposed unpack, written directly in that layout
    instead of unpacking then transposing a ``32x`` larger array).
    """
    patterns = _bit_patterns(words, k, dtype, axis)
    if patterns is not None:
        # the float's own bit pattern: +1.0 with the sign bit set from the packed bit; an integer ->
        # float conversion per element (emulated for bfloat16) ran several times slower on CPU
        return lax.bitcast_convert_type(patterns, dtype)
    return (1 - 2 * _bits(words, k, axis).astype(jnp.int32)).astype(dtype)


# +1.0's bits in the unsigned integer of the same width, for the floats unpack_bits writes directly
_ONE_BITS = {jnp.dtype(jnp.float32): (jnp.uint32, 0x3F800000), jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x3F80),
             jnp.dtype(jnp.float16): (jnp.uint16, 0x3C00)}


# --- matmul ---------------------------------------------------------------------------------------

def block_rows(a, block: int = ROW_BLOCK):
    """``(M, W)`` words to the row-blocked layout ``(ceil(M/block), W, block)`` (rows zero-padded)."""
    m, w = a.shape
    mp = -(-m // block) * block
    if mp != m:
        a = jnp.pad(a, ((0, mp - m), (0, 0)))
    return a.reshape(mp // block, block, w).transpose(0, 2, 1)


def unblock_rows(y, m: int):
    """Row-blocked ``(M/b, N, b)`` back to ``(m, N)``."""
    mb, n, b = y.shape
    return y.transpose(0, 2, 1).reshape(mb * b, n)[:m]


def _word_chunk(w: int, most: int = 16) -> int:
    """Words per unrolled chunk of the word loop: the largest divisor of ``w`` up to ``most`` (a
    convolution's words per tap, or a multiple of them), or all ``w`` when that divisor is small."""
    c = max(d for d in range(1, min(w, most) + 1) if w % d == 0)
    return c if c >= 4 else w


def _word(x, i: int, axis: int):
    return lax.slice_in_dim(x, i, i + 1, axis=axis)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _popcounts(a, a_axis: int, b, b_axis: int):
    # sum_w popcount(a_w XOR b_w) over the words along a_axis and b_axis, unrolled: each word one
    # slice of each operand, broadcast against the other (blocked: (M/8, c, 8) x (1, N, c) ->
    # (M/8, N, 8); direct: (M, c) x (c, N) -> (M, N))
    acc = None
    for i in range(a.shape[a_axis]):
        t = lax.population_count(_word(a, i, a_axis) ^ _word(b, i, b_axis))
        acc = t if acc is None else acc + t
    return acc


def _chunked(a, a_axis: int, b, b_axis: int):
    # one unrolled function per chunk shape, called once per chunk: XLA inlines the calls and fuses
    # the sum into one loop (the same program as unrolling every word), while a serialized model
    # (jax.export, IREE) holds each chunk's unrolled code once
    w = b.shape[b_axis]
    c = _word_chunk(w)
    acc = None
    for j in range(0, w, c):
        t = _popcounts(lax.slice_in_dim(a, j, j + c, axis=a_axis), a_axis, lax.slice_in_dim(b, j, j + c, axis=b_axis),
                       b_axis)
        acc = t if acc is None else acc + t
    return acc


def xnor_matmul_blocked(a_blocked, b, k: int):
    """XNOR-popcount product in the row-blocked layout: ``(M/8, W, 8) x (N, W) -> (M/8, N, 8)`` int32.

    ``out[i, n, l] = k - 2 * sum_w popcount(a_blocked[i, w, l] XOR b[n, w])``. The word loop is
    unrolled into one fused expression so XLA:CPU keeps the lanes in vector registers.
    """
    w = a_blocked.shape[1]
    if b.shape[1] != w:
        raise ValueError(f"operands have {w} and {b.shape[1]} words along the contraction axis.")
    return k - 2 * _chunked(a_blocked, 1, b[None], 2).astype(jnp.int32)


def _xnor_int8(a, b, k):
    # accelerators: unpack to ±1 int8 and let the integer dot units (tensor cores, MXU) do the work
    ua = unpack_bits(a, a.shape[-1] * WORD_BITS, jnp.int8)
    ub = unpack_bits(b, b.shape[-1] * WORD_BITS, jnp.int8)
    full = lax.dot_general(ua, ub, (((ua.ndim - 1,), (ub.ndim - 1,)), ((), ())), preferred_element_type=jnp.int32)
    # padding bits are +1 in both operands and each adds 1: remove them
    return full - (a.shape[-1] * WORD_BITS - k)


def _unfused(fn, probe, out_shape, out_dtype):
    """Run ``fn()`` as a separate XLA computation: inside a conditional whose predicate is always true
    but not foldable by XLA (``x < max or x == max`` on a runtime word).

    XLA:CPU otherwise fuses the blocked kernel into its consumer (the un-blocking transpose, a
    threshold) and iterates in the consumer's layout, which loses the 8-lane vectorization (21 ms
    instead of 6 ms at 2048^3 here). Control-flow results are never fused into their users.
    """
    top = jnp.uint32(0xFFFFFFFF)
    always = (probe < top) | (probe == top)
    return lax.cond(always, fn, lambda: jnp.zeros(out_shape, out_dtype))


def xnor_conv_taps(taps, b, k: int):
    """The direct XNOR-popcount product of a convolution fed its taps: ``sum_t taps[t] @ b_t.T`` as int32.

    ``out[..., n] = k - 2 * sum_t sum_w popcount(taps[t][..., w] XOR b[n, t * Wc + w])``: the same
    integers as :func:`xnor_matmul` on the patches ``concatenate(taps, -1)``, without the patches. Each
    tap is a (strided) slice of the packed, padded input, which XLA reads in place inside the one loop
    that also computes the consumer (BatchNorm, residual, the next layer's packing); the patches took
    one small kernel per tap and a copy per layer. For kernels that take :func:`xnor_matmul`'s direct
    (fusible) kernel in packed inference.

    Args:
      taps: uint32 ``(..., Wc)`` arrays of one shape, one per kernel tap in the kernel's order.
      b: uint32 ``(N, len(taps) * Wc)`` packed kernel rows (:func:`pack_kernel`).
      k: the true contraction length.

    Returns:
      int32 ``(..., N)``.
    """
    wc = taps[0].shape[-1]
    if b.shape[1] != len(taps) * wc or any(t.shape != taps[0].shape or t.dtype != jnp.uint32 for t in taps):
        raise ValueError(f"{len(taps)} taps of {wc} words and a {b.shape} kernel: need uint32 taps of one shape "
                         f"and (N, taps * words per tap) kernel words.")
    lead = taps[0].shape[:-1]
    rows = [t.reshape(-1, wc) for t in taps]
    bt = _transposed(b, rows[0])
    acc = None
    for i, r in enumerate(rows):
        t = _popcounts(r, 1, lax.slice_in_dim(bt, i * wc, (i + 1) * wc, axis=0), 0)
        acc = t if acc is None else acc + t
    return (k - 2 * acc.astype(jnp.int32)).reshape(lead + (b.shape[0],))


def _transposed(b, a):
    # b.T made flat in a conditional XLA cannot fold or fuse (probed on the activations a): left a
    # transpose, XLA read b in place with N strided and lost the vectors whenever b was a jit argument
    # rather than a constant it folds (seed 000 at batch 1000: 10.7 -> 5.7 ms; QuickNet at batch 16:
    # 90 -> 54 ms with 64-channel kernels direct)
    probe = a[0, 0] if a.shape[0] != 0 else b[0, 0]
    return _unfused(lambda: b.T.reshape(-1), probe, (b.size,), b.dtype).reshape(b.shape[1], b.shape[0])


def _xnor_direct(a, b, k):
    # small M (batch-1 inference) or a small kernel: one fused loop over the (M, N) output, vectorized
    # along N, so it reads b as (W, N) rows
    return k - 2 * _chunked(a, 1, _transposed(b, a), 0).astype(jnp.int32)


_DIRECT_MAX_WORK = 1 << 18  # word-ops below which blocking and the conditional cost more than they save
# packed inference: kernels of at most this many words take the fusible direct kernel at any M, a
# symbolic one included, so XLA computes each output inside its consumer (BatchNorm, sign, packing of
# the next layer's input) instead of writing M x N int32, and a convolution reads its taps in place
# (xnor_conv_taps). 18432 takes seed 000's layers and QuickNet's 64-, 128- and 256-channel sections
# (1152, 4608 and 18432 words). In-process A/Bs, QuickNet at batch 16: the artifact 47.4 -> 45.7 ms
# (1024 -> 2048 words), weights as jit arguments 48.7 -> 45.3 ms (2048 -> 4608), both with the patches;
# from taps, the artifact 39.8 -> 39.0 ms (4608 -> 18432); all of QuickNet's layers direct: 40.5 ms,
# and batch 1 slower. Training keeps the isolated kernel: fused into a training BatchNorm's reductions,
# XLA recomputed it per use.
_DIRECT_MAX_KERNEL_WORDS = 18432


def _fuses_into_consumer(b, inference: bool = True) -> bool:
    return inference and b.shape[0] * b.shape[1] <= _DIRECT_MAX_KERNEL_WORDS


@functools.partial(jax.jit, static_argnums=(2, 3))
def _xnor_popcount(a, b, k, inference=False):
    # jit: layers with the same shapes share one lowered function, so an exported model holds each
    # unrolled kernel once (QuickNet's StableHLO: 0.3 MB smaller, 4.54 MB); XLA inlines it
    m = a.shape[0]
    # a symbolic row count (jax.export with a symbolic batch) takes the blocked kernel unless fused
    if (isinstance(m, int) and m * b.shape[0] * b.shape[1] <= _DIRECT_MAX_WORK) or _fuses_into_consumer(b, inference):
        return _xnor_direct(a, b, k)
    return _blocked(a, b, k)


def _blocked(a, b, k):
    # (M, W) x (N, W) -> (M, N) through the row-blocked kernel, computed apart from its consumer
    ab = block_rows(a)
    y = _unfused(lambda: xnor_matmul_blocked(ab, b, k), b[0, 0], (ab.shape[0], b.shape[0], ROW_BLOCK), jnp.int32)
    return unblock_rows(y, a.shape[0])


def _blocks_per_image(rows) -> bool:
    # per-image blocks pad each image's rows to a multiple of 8: only where that adds at most 1/7 of
    # the work (QuickNet's 7x7 maps: 49 -> 56 rows; not seed 000's 3x3 map: 9 -> 16 measured 15 % slower)
    return isinstance(rows, int) and 7 * (-(-rows // ROW_BLOCK) * ROW_BLOCK) <= 8 * rows


@functools.partial(jax.jit, static_argnums=(2,))
def _xnor_popcount_images(a, b, k):
    # (B, R, W) rows -> (B, R, N): the blocked kernel on (B * ceil(R/8), W, 8), each image's rows padded
    batch, r, w = a.shape
    rp = -(-r // ROW_BLOCK) * ROW_BLOCK
    if rp != r:
        a = jnp.pad(a, ((0, 0), (0, rp - r), (0, 0)))
    return _blocked(a.reshape(batch * rp, w), b, k).reshape(batch, rp, b.shape[0])[:, :r]


def compiler_options(backend: str | None = None) -> dict:
    """XLA options for compiling a program that runs packed kernels on this host: pass them to the
    top-level ``jax.jit(f, compiler_options=packing.compiler_options())`` (JAX refuses them on a jit
    nested in another).

    On an x86 CPU with AVX-512, ``{"xla_cpu_prefer_vector_width": 512}``: XLA:CPU emits 256-bit
    vectors by default, and the popcount loops fused into their BatchNorm/sign consumers, the packing
    of activations and the float layers around them run faster on 512-bit ones (QuickNet's artifact on
    this project's 2-core AVX-512 machine: 4.86 -> 4.39 ms at batch 1, 52.1 -> 46.3 ms at batch 16,
    ``experiments/bench_inference.py``). Elsewhere (other CPUs, GPUs, TPUs) ``{}``. The
    options change how XLA vectorizes, not what it computes: integer results are the same, float
    sums may round differently.
    """
    if (backend or jax.default_backend()) != "cpu" or "avx512f" not in cpu_flags():
        return {}
    return {"xla_cpu_prefer_vector_width": 512}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def backend_kernel(backend: str | None = None) -> str:
    """Which kernel :func:`xnor_matmul` uses on a backend: ``"popcount"`` (CPU) or ``"int8"``."""
    return "popcount" if (backend or jax.default_backend()) == "cpu" else "int8"


def xnor_matmul(a, b, k: int, kernel: str | None = None, inference: bool = False):
    """Exact ±1 matrix product of bit-packed operands: ``a @ b.T`` as int32.

    ``out[m, n] = sum_i A[m, i] B[n, i] = k - 2 * popcount(a[m] XOR b[n])`` where ``A``, ``B`` are the
    ±1 matrices packed by :func:`pack_bits` along their last (contraction) axis.

    Args:
      a: uint32 ``(..., M, W)`` packed rows (leading axes are batch axes, flattened into M).
      b: uint32 ``(N, W)`` packed rows of the second operand (a kernel stored output-major).
      k: the true contraction length (``<= 32 W``).
      kernel: ``"popcount"`` or ``"int8"`` to override the per-backend choice.
      inference: the product feeds elementwise consumers only (packed inference): on CPU, small
        kernels then take a formulation XLA fuses into the consumer.

    Returns:
      int32 ``(..., M, N)``.

    Raises:
      ValueError: mismatched word counts, ``k`` out of range, or non-uint32 operands.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.dtype != jnp.uint32 or b.dtype != jnp.uint32:
        raise ValueError(f"xnor_matmul takes uint32 words from pack_bits, got {a.dtype} and {b.dtype}.")
    if a.ndim < 2 or b.ndim != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"shapes {a.shape} and {b.shape}: need (..., M, W) and (N, W) with equal W.")
    w = a.shape[-1]
    if not (0 < k <= w * WORD_BITS):
        raise ValueError(f"k={k} must be in 1..{w * WORD_BITS} for {w} words.")
    lead = a.shape[:-2]
    a2 = a.reshape(-1, w)
    kernel = kernel or backend_kernel()
    if kernel == "popcount" and lead and not isinstance(a2.shape[0], int) and _blocks_per_image(a.shape[-2]) and not (
            _fuses_into_consumer(b, inference)):
        # a symbolic batch (jax.export): row blocks within each image keep every shape a multiple of
        # the batch; blocks across images would make each shape a floor division the program recomputes
        out = _xnor_popcount_images(a.reshape(-1, a.shape[-2], w), b, k)
    elif kernel == "popcount":
        out = _xnor_popcount(a2, b, k, inference)
    elif kernel == "int8":
        out = _xnor_int8(a2, b, k)
    else:
        raise ValueError(f"kernel must be 'popcount' or 'int8', got {kernel!r}.")
    return out.reshape(lead + (a.shape[-2], b.shape[0]))


# --- convolution ----------------------------------------------------------------------------------

def extract_patches(x_words, kernel_hw: Sequence[int], strides: Sequence[int], pads,
                    dilation: Sequence[int] = (1, 1)):
    """im2col on packed words: ``(N, H, W, Wc)`` to ``(N, Ho, Wo, kh*kw*Wc)``.

    Padded taps are clear bits (+1): exact for one-padding; zero-padding needs :func:`pad_correction`.
    Taps are ordered (row, column, channel-word), matching a kernel packed as
    ``pack_bits(kernel.reshape(kh, kw, C, O)..., axis=C)`` flattened the same way; ``dilation`` spaces
    the taps as a dilated convolution's kernel.
    """
    if any(p != (0, 0) for p in pads):
        x_words = jnp.pad(x_words, ((0, 0),) + tuple(tuple(p) for p in pads) + ((0, 0),))
    cols = word_taps(x_words, kernel_hw, strides, dilation)
    # stacked on a new axis, then merged (a concatenation of the slices ran as nine kernels plus a
    # copy, ~15 % of QuickNet's batch-1 time; XLA may still run a small kernel per tap, which is why
    # packed inference reads small kernels' taps in place: xnor_conv_taps)
    return jnp.stack(cols, axis=3).reshape(cols[0].shape[:3] + (-1,))


def word_taps(x_words, kernel_hw: Sequence[int], strides: Sequence[int], dilation: Sequence[int] = (1, 1)):
    """The (strided) slice of padded packed words ``(N, H, W, Wc)`` under each kernel tap, row-major:
    a list of ``(N, Ho, Wo, Wc)``, what :func:`extract_patches` concatenates."""
    n, h, w, c = x_words.shape
    kh, kw = kernel_hw
    sh, sw = strides
    dh, dw = dilation
    ho, wo = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
    return [lax.slice(x_words, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def tap_sums(kernel_pm1):
    """``sum_c kernel[i, j, c, o]``: a ±1 kernel's per-tap sums ``(kh, kw, 1, O)``, float32 (exact
    integers), all :func:`pad_correction` needs to know of the kernel."""
    return jnp.sum(jnp.asarray(kernel_pm1, jnp.float32), axis=2, keepdims=True)


def pad_correction(sums, in_hw, strides, pads, dilation=(1, 1)):
    """What one-padded bits add over zero padding, per output position and channel (int32).

    A zero-padded tap contributes 0, a clear padding bit contributes ``+1 * w``; the correction is
    ``sum over padded taps of sum_c w[tap, c, o]``, a function of the border pattern only. Subtract it
    from the packed result to get zero-padding semantics (what LCE does). Works on concrete and on
    traced kernels (inside ``jit``).

    Args:
      sums: :func:`tap_sums` of the ±1 kernel, ``(kh, kw, 1, O)``.
      in_hw: the unpadded input's ``(H, W)``.

    Returns:
      int32 ``(Ho, Wo, O)``.
    """
    mask = np.pad(np.zeros(tuple(in_hw), np.float32), pads, constant_values=1.0)[None, :, :, None]
    corr = lax.conv_general_dilated(jnp.asarray(mask), sums, tuple(strides), "VALID", rhs_dilation=tuple(dilation),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
    return jnp.rint(corr[0]).astype(jnp.int32)


def binary_conv2d(x_words, kernel_words, k: int, kernel_hw: Sequence[int], strides: Sequence[int] = (1, 1),
                  padding="VALID", correction=None, dilation: Sequence[int] = (1, 1)):
    """Exact ±1 2-D convolution on packed NHWC bits: int32 ``(N, Ho, Wo, O)``.

    Args:
      x_words: ``(N, H, W, Wc)`` input packed along channels.
      kernel_words: ``(O, kh*kw*Wc)`` kernel packed per tap along channels (see :func:`pack_kernel`).
      k: true contraction length ``kh * kw * C``.
      kernel_hw: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: "VALID", "SAME" or explicit pairs; padded taps read as +1 (one-padding).
      correction: int32 ``(Ho, Wo, O)`` from :func:`pad_correction` for zero-padding semantics.
      dilation: the kernel's dilation ``(dh, dw)``.
    """
    if x_words.ndim != 4:
        raise ValueError(f"binary_conv2d expects packed NHWC words of rank 4, got shape {x_words.shape}.")
    pads = _padding.resolve(padding, x_words.shape[1:3], kernel_hw, strides, dilation)
    patches = extract_patches(x_words, kernel_hw, strides, pads, dilation)
    y = xnor_matmul(patches, kernel_words, k)
    return y if correction is None else y - correction


def pack_kernel(kernel_pm1):
    """Pack a ``(kh, kw, C, O)`` or ``(K, O)`` ±1 kernel output-major: ``(O, taps * words_per_tap)``."""
    kernel_pm1 = jnp.asarray(kernel_pm1)
    o = kernel_pm1.shape[-1]
    per_tap = kernel_pm1.reshape(-1, kernel_pm1.shape[-2], o) if kernel_pm1.ndim == 4 else kernel_pm1[None]
    # packed in place, (taps, Wc, O), then only the words transposed: fused, the transposition made the
    # packing loop read the floats across rows (4.5x slower)
    words = _words_in_place(per_tap, 1)
    words = _unfused(lambda: words, words[(0,) * words.ndim], words.shape, jnp.uint32)
    return words.transpose(2, 0, 1).reshape(o, -1)


class PackedKernel(struct.PyTreeNode):
    """A layer's ±1 kernel (or ABC-Net's M binary bases) packed for the XNOR-popcount kernels.

    What a quantized layer finds in place of its latent kernel after ``bnnjax.export.pack``: it then
    runs its forward pass on packed bits.

    Attributes:
      words: uint32 ``(O, taps * words per tap)`` from :func:`pack_kernel` (``(M, O, ...)`` for M bases).
      shape: the latent kernel's shape, ``(K, O)`` or ``(kh, kw, C, O)`` (static).
      scale: float32 ``(O,)``: the kernel is ``scale * sign`` (XNOR-Net's and Bi-Real's kernels), or None.
      alpha: float32 ``(M,)``: ABC-Net's weight-base scales, or None for one ±1 kernel.
      per_tap: the words of a convolution kernel hold each tap's channels in words of their own
        (:func:`pack_kernel`, what the XNOR-popcount convolution reads); False: the kernel's bits in
        its own (row-major) order, ``(num_words(K * O),)``, the smallest storage, for a kernel that a
        layer with real-valued input unpacks.
    """

    words: jax.Array
    shape: tuple = struct.field(pytree_node=False, default=())
    per_tap: bool = struct.field(pytree_node=False, default=True)
    scale: jax.Array | None = None
    alpha: jax.Array | None = None

    @property
    def k(self) -> int:
        """The contraction length: ``K``, or ``kh * kw * C``."""
        return int(np.prod(self.shape[:-1]))

    def signs(self, dtype=jnp.float32):
        """The ±1 kernel (``(M,) + shape`` for M bases), unpacked."""
        if not self.per_tap:
            return unpack_bits(self.words, int(np.prod(self.shape)), dtype).reshape(self.shape)
        c = self.shape[-2]
        words = self.words.reshape(self.words.shape[:-1] + (-1, num_words(c)))  # (..., O, taps, Wc)
        k = jnp.moveaxis(unpack_bits(words, c, dtype), -3, -1)  # (..., taps, C, O)
        return k.reshape(self.words.shape[:-2] + tuple(self.shape))

    def tap_sums(self):
        """:func:`tap_sums` of the kernel, ``(..., kh, kw, 1, O)``, from the words: each tap's sum is
        ``C - 2 * popcount`` (padding bits are clear)."""
        c = self.shape[-2]
        words = self.words.reshape(self.words.shape[:-1] + (-1, num_words(c)))
        neg = jnp.sum(lax.population_count(words).astype(jnp.int32), axis=-1)  # (..., O, taps)
        sums = jnp.moveaxis(c - 2 * neg, -2, -1).astype(jnp.float32)  # (..., taps, O)
        return sums.reshape(self.words.shape[:-2] + tuple(self.shape[:2]) + (1, self.shape[-1]))
