"""Padding resolution shared by the float layers and the packed kernels (one definition for both)."""

from __future__ import annotations

import jax


def resolve(padding, spatial_shape, kernel_shape, strides, dilation=None) -> tuple[tuple[int, int], ...]:
    """Padding as ``((lo, hi), ...)`` per spatial axis, as Flax's ``Conv`` resolves it.

    Args:
      padding: "SAME", "VALID", an int, or one int / (lo, hi) pair per spatial axis.

    Raises:
      ValueError: another string, or the wrong number of pairs.
    """
    spatial_shape, kernel_shape, strides = tuple(spatial_shape), tuple(kernel_shape), tuple(strides)
    dilation = tuple(dilation) if dilation is not None else (1,) * len(kernel_shape)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID', an int or explicit pairs, got {padding!r}.")
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilation)]
        return tuple(jax.lax.padtype_to_pads(spatial_shape, dilated, strides, padding.upper()))
    if isinstance(padding, int):
        return ((padding, padding),) * len(spatial_shape)
    pads = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pads) != len(spatial_shape):
        raise ValueError(f"padding needs one entry per spatial axis ({len(spatial_shape)}), got {padding!r}.")
    return pads
