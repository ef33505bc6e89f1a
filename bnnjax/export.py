"""Export a trained Flax BNN to a bit-packed inference model, and save/load it without pickle.

``export(model, variables, example_input)`` records the model's layer calls in evaluation mode (a
Keras-Sequential-like chain of ``QuantConv``/``QuantDense``/``nn.Conv``/``nn.Dense``/``BatchNorm``/
``MaxPool``/``Flatten``/``GlobalAvgPool``/``Activation("relu")``/``Dropout`` modules, ABC layers and
residual ``bnnjax.models.BiRealBlock`` blocks) and turns them into a small program of packed ops:

* binary layers (±1 kernel, sign input quantizer) become bit-packed kernels (``packing`` layout, 32x
  smaller) run by the XNOR-popcount kernel;
* a BatchNorm whose output the next layer binarizes is folded into per-channel **integer thresholds**
  on the binary layer's integer output (bits flow from packed layer to packed layer, like LCE's
  bitpacked output); thresholds are found by evaluating the BatchNorm module itself on every possible
  integer, so the packed model takes the same decisions as the float model;
* a max-pool between a layer and that BatchNorm runs on the bits (AND per channel where BatchNorm's
  slope is positive, OR where it is negative — max commutes with a monotone map);
* other BatchNorms become a per-channel affine; full-precision first/last layers stay float;
* an ABC layer becomes its M x N binary ops: N shifted binarizations of the input, packed, against
  M packed weight bases, combined with the alphas and betas;
* a residual block keeps its real-valued input in a slot: the shortcut (average-pool, real 1x1 conv,
  BatchNorm) runs in float, the binary conv on packed bits, and the two are added.

Each export is verified: the packed model is run on ``example_input`` and must give the float
model's argmax (and logits within tolerance), else ``ExportError`` says where they part. This catches
computation the exporter cannot see (a function call between modules, a residual add).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization
from flax.core import meta

from bnnjax import _padding
from bnnjax import layers as L
from bnnjax import packing as pk
from bnnjax import quantizers
from bnnjax.models import BiRealBlock
from bnnjax.ops import conv_nd, max_pool

__all__ = ["export", "PackedModel", "save_packed", "load_packed", "ExportError", "FORMAT"]

FORMAT = "bnnjax-packed"
VERSION = 1
_SIGN_QUANTIZERS = {"ste_sign", "approx_sign", "swish_sign", "stochastic_sign"}
# kernels that are a per-output-channel scale times a sign: packed as signs, the scale kept as a float
_SCALED_SIGN_QUANTIZERS = {"xnor_weight_scale", "magnitude_aware_sign"}


class ExportError(ValueError):
    """The model cannot be packed (the message names the layer and why)."""


def _record(model, variables, x):
    calls = []

    def interceptor(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and ctx.module.path:
            calls.append((ctx.module, "/".join(ctx.module.path), args[0].shape, out.shape))
        return out

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, train=False)
    return calls, logits


def _outermost(calls, prefix=""):
    """The calls directly under ``prefix`` (a module path; "" for the model): drop calls nested in
    another recorded call's path."""
    inside = [c for c in calls if c[1].startswith(prefix + "/")] if prefix else calls
    paths = [c[1] for c in inside]
    return [c for c in inside if not any(c[1].startswith(p + "/") for p in paths if p != c[1])]


def _get(tree, path, default=None):
    node = tree
    for p in path.split("/"):
        if default is not None and p not in node:
            return default
        node = node[p]
    return node


def _quant_name(q):
    return quantizers.get(q).name if q is not None else None


class _Builder:
    def __init__(self, variables):
        self.v = variables
        self.ops: list[dict] = []
        self.kind = "float"  # what the running value is: "float", "int" (popcount output) or "bits"
        self.k = None  # contraction length of the last integer-producing layer
        self.packed_after_flatten = False  # bits packed along the flattened axis, not per position
        self.slots = 0  # float values kept for residual adds

    def emit(self, op, **fields):
        self.ops.append({"op": op, **fields})

    def save(self) -> int:
        """Keep the running (float) value in a new slot; returns the slot number."""
        self.emit("save", slot=self.slots)
        self.slots += 1
        return self.slots - 1

    def abc_layer(self, mod, name, in_shape):
        """An ABC layer: ``sum_n beta_n sum_m alpha_m op(A_n, B_m) + b`` as M x N packed binary ops.

        ``A_n``'s -1 bits are ``x + v_n < 0.5`` (ABC's ``sign(clip(x + v_n, 0, 1) - 0.5)``, the same
        float32 comparison); the weight bases and least-squares alphas are those the layer computes.
        """
        params = _get(self.v["params"], name)
        latent = jnp.asarray(meta.unbox(params["kernel"]), jnp.float32)
        bases, alpha = L.abc_weight_bases(latent, mod.num_weight_bases)
        bases, alpha = np.asarray(bases, np.float32), np.asarray(alpha, np.float32)
        bias = np.asarray(params["bias"], np.float32) if "bias" in params else None
        is_conv = isinstance(mod, L.ABCConv)
        if is_conv and (latent.ndim != 4 or _tuple2(mod.kernel_dilation) != (1, 1)):
            raise ExportError(f"layer {name}: only undilated 2-D ABC convolutions are exported.")
        self._to_float(name)
        if mod.num_act_bases is None:  # real input: one float layer with the approximated kernel
            w = np.tensordot(alpha, bases, axes=1)
            if is_conv:
                strides = _tuple2(mod.strides)
                pads = [list(p) for p in _padding.resolve(mod.padding, in_shape[1:3], w.shape[:2], strides)]
                self.emit("fconv", kernel=w, strides=list(strides), pads=pads, pad_values=0.0, shape=list(w.shape))
            else:
                self.emit("fdense", kernel=w, shape=list(w.shape))
        else:
            fields = dict(alpha=alpha, shift=np.asarray(params["shift"], np.float32),
                          beta=np.asarray(params["beta"], np.float32), k=int(np.prod(bases.shape[1:-1])))
            if is_conv:
                strides = _tuple2(mod.strides)
                pads = tuple(_padding.resolve(mod.padding, in_shape[1:3], bases.shape[1:3], strides))
                fields.update(kernels=np.stack([np.asarray(pk.pack_kernel(b)) for b in bases]),
                              kernel_hw=list(bases.shape[1:3]), strides=list(strides), pads=[list(p) for p in pads])
                if any(p != (0, 0) for p in pads):  # ABC convolutions zero-pad their binary inputs
                    fields["correction"] = np.stack([np.asarray(pk.pad_correction(b, in_shape[1:3], strides, pads))
                                                     for b in bases])
                self.emit("abc_conv", **fields)
            else:
                if len(in_shape) != 2:
                    raise ExportError(f"layer {name}: a dense layer needs flat input; add bnnjax.layers.Flatten().")
                self.emit("abc_dense", kernels=np.stack([np.asarray(pk.pack_kernel(b)) for b in bases]), **fields)
        if bias is not None:
            self.emit("affine", mean=np.zeros_like(bias), mul=np.ones_like(bias), add=bias)
        self.kind = "float"

    def residual_block(self, mod, name, nested):
        """A Bi-Real block: ``BN(binary_conv(x)) + shortcut(x)``, shortcut = x or BN(conv1x1(avgpool(x)))."""
        convs = [c for c in nested if type(c[0]) is nn.Conv]
        qconvs = [c for c in nested if isinstance(c[0], L.QuantConv)]
        bns = [c for c in nested if isinstance(c[0], nn.BatchNorm)]
        if len(qconvs) != 1 or len(convs) > 1 or len(bns) != 1 + len(convs) or len(nested) != len(convs) + len(qconvs) + len(bns):
            raise ExportError(f"block {name}: expected one QuantConv + BatchNorm and an optional shortcut conv + "
                              f"BatchNorm, got {[type(c[0]).__name__ for c in nested]}.")
        self._to_float(name)
        x_slot = self.save()
        shortcut_slot = x_slot
        if convs:
            conv, bn_short, bn_main = convs[0], bns[0], bns[1]
            if mod.strides != 1:
                self.emit("avgpool", window=[mod.strides] * 2, strides=[mod.strides] * 2)
            self.layer(conv[0], conv[1], conv[2], (1, 1, conv[2][-1]))
            self.batch_norm(bn_short[0], bn_short[1])
            self._finalize_float()
            shortcut_slot = self.save()
            self.emit("load", slot=x_slot)
        else:
            bn_main = bns[0]
        self.layer(qconvs[0][0], qconvs[0][1], qconvs[0][2], (1, 1, qconvs[0][2][-1]))
        self.batch_norm(bn_main[0], bn_main[1])
        self._finalize_float()
        self.emit("add", slot=shortcut_slot)

    # -- layers --
    def layer(self, mod, name, in_shape, flat_layout):
        """Convert one dense/conv layer; ``flat_layout`` is (H, W, C) of a Flatten right before it."""
        params = _get(self.v["params"], name)
        kernel = params["kernel"]
        kq = _quant_name(getattr(mod, "kernel_quantizer", None))
        iq = _quant_name(getattr(mod, "input_quantizer", None))
        latent = np.asarray(meta.unbox(kernel), np.float32)
        is_conv = isinstance(mod, (nn.Conv, L.QuantConv))
        if is_conv and latent.ndim != 4:
            raise ExportError(f"layer {name}: only 2-D convolutions are exported, got kernel shape {latent.shape}.")
        if is_conv and (getattr(mod, "feature_group_count", 1) != 1 or _tuple2(mod.kernel_dilation) != (1, 1)
                        or _tuple2(getattr(mod, "input_dilation", 1)) != (1, 1)):
            raise ExportError(f"layer {name}: grouped or dilated convolutions are not exported.")
        bias = np.asarray(params["bias"], np.float32) if "bias" in params else None
        binary_kernel = kq in _SIGN_QUANTIZERS or kq in _SCALED_SIGN_QUANTIZERS
        scale = None
        if kq in _SCALED_SIGN_QUANTIZERS:  # q(W) = scale * sign(W): |q(W)| is constant per output channel
            q = np.asarray(quantizers.get(mod.kernel_quantizer)(jnp.asarray(latent)))
            scale = np.abs(q.reshape(-1, q.shape[-1])[0])
        if iq is not None and iq not in _SIGN_QUANTIZERS:
            raise ExportError(f"layer {name}: input quantizer {iq!r} is not a ±1 sign; only sign-binarized "
                              "inputs can be packed. Use ste_sign/approx_sign or leave the input real.")
        if kq is not None and not binary_kernel:
            raise ExportError(f"layer {name}: kernel quantizer {kq!r} is not a (scaled) ±1 sign; multi-bit "
                              "kernels are not packed.")
        if iq is not None and binary_kernel:
            self._to_bits(name)
            w = np.where(latent >= 0, 1.0, -1.0).astype(np.float32)
            if is_conv:
                strides = _tuple2(mod.strides)
                pads = tuple(_padding.resolve(mod.padding, in_shape[1:3], w.shape[:2], strides))
                pad_value = float(getattr(mod, "pad_values", 0.0))
                corr = None
                if pad_value == 0.0 and any(p != (0, 0) for p in pads):
                    corr = np.asarray(pk.pad_correction(w, in_shape[1:3], strides, pads))
                elif pad_value not in (0.0, 1.0):
                    raise ExportError(f"layer {name}: pad_values={pad_value} cannot be packed (use 0.0 or 1.0).")
                self.emit("bconv", kernel=np.asarray(pk.pack_kernel(w)), k=int(np.prod(w.shape[:3])),
                          kernel_hw=list(w.shape[:2]), strides=list(strides), pads=[list(p) for p in pads],
                          correction=corr)
            else:
                if len(in_shape) != 2:
                    raise ExportError(f"layer {name}: a dense layer needs flat input; add bnnjax.layers.Flatten().")
                layout = (1, 1, w.shape[0]) if self.packed_after_flatten else flat_layout
                kernel_words = _pack_dense_kernel(w, layout)
                self.emit("bdense", kernel=kernel_words, k=int(w.shape[0]))
            self.kind, self.k = "int", int(np.prod(w.shape[:-1]))
            if scale is not None or bias is not None:
                o = w.shape[-1]
                self.emit("affine", mean=np.zeros(o, np.float32),
                          mul=scale.astype(np.float32) if scale is not None else np.ones(o, np.float32),
                          add=bias if bias is not None else np.zeros(o, np.float32), k=self.k)
            return
        # full-precision input (first layer) or full-precision kernel: a float layer
        self._to_float(name)
        w = np.where(latent >= 0, 1.0, -1.0).astype(np.float32) if binary_kernel else latent
        if scale is not None:  # a scaled sign kernel on real input: store the float kernel
            w, binary_kernel = w * scale, False
        if is_conv:
            strides = _tuple2(mod.strides)
            pads = [list(p) for p in _padding.resolve(mod.padding, in_shape[1:3], w.shape[:2], strides)]
            fields = dict(strides=list(strides), pads=pads, pad_values=float(getattr(mod, "pad_values", 0.0)),
                          shape=list(w.shape))
            if binary_kernel:
                self.emit("fconv", kernel_bits=np.asarray(pk.pack_bits(w.reshape(-1, w.shape[-1]), axis=0)), **fields)
            else:
                self.emit("fconv", kernel=w, **fields)
        else:
            if binary_kernel:
                self.emit("fdense", kernel_bits=np.asarray(pk.pack_bits(w, axis=0)), shape=list(w.shape))
            else:
                self.emit("fdense", kernel=w, shape=list(w.shape))
        if bias is not None:
            self.emit("affine", mean=np.zeros_like(bias), mul=np.ones_like(bias), add=bias)
        self.kind = "float"

    def batch_norm(self, mod, name):
        if not isinstance(mod, nn.BatchNorm) or mod.axis not in (-1,):
            raise ExportError(f"layer {name}: only BatchNorm over the last axis is exported.")
        stats = _get(self.v.get("batch_stats", {}), name)
        params = _get(self.v["params"], name, {})
        c = np.asarray(stats["mean"]).shape[-1]
        self.emit("bn", mean=np.asarray(stats["mean"], np.float32), var=np.asarray(stats["var"], np.float32),
                  scale=np.asarray(params.get("scale", np.ones(c)), np.float32),
                  bias=np.asarray(params.get("bias", np.zeros(c)), np.float32), eps=float(mod.epsilon),
                  module=mod, name=name, k=self.k)

    def _to_bits(self, name):
        """Make the running value bits: fold the trailing [pool] [bn] ops into thresholds where possible."""
        if self.kind == "bits":
            return
        self.packed_after_flatten = False
        tail = []
        while self.ops and self.ops[-1]["op"] in ("bn", "maxpool", "affine", "flatten", "gap"):
            tail.insert(0, self.ops.pop())
        flatten = bool(tail) and tail[-1]["op"] == "flatten"
        if flatten:  # thresholds act per channel, so they commute with flattening the packed words
            tail.pop()
        pools = [i for i, t in enumerate(tail) if t["op"] == "maxpool"]
        maps = [t for t in tail if t["op"] in ("bn", "affine")]
        foldable = maps and len(pools) <= 1 and not any(t["op"] == "flatten" for t in tail)
        if foldable:
            self.emit("threshold", **_thresholds(maps, self.kind == "int"))
            self.emit("pack")
            if pools:
                # max commutes with every channel's monotone map: after the maps it is a max of signs
                # (AND of the "-1" bits) where the maps behind the pool increase, a min (OR) elsewhere
                after = tail[pools[0] + 1:]
                mask = _slope(after) >= 0 if after else np.ones(_channels(maps), bool)
                self.emit("maxpool_bits", window=tail[pools[0]]["window"], strides=tail[pools[0]]["strides"],
                          and_mask=mask)
        else:  # e.g. a BatchNorm over flattened features: evaluate in float, then binarize
            self.ops.extend(tail + ([{"op": "flatten"}] if flatten else []))
            self._finalize_float()
            self.emit("sign")
            self.emit("pack")
            self.packed_after_flatten = any(t["op"] == "flatten" for t in self.ops[-3 - len(tail):])
            flatten = False
        if flatten:
            self.emit("flatten")
        self.kind = "bits"

    def _to_float(self, name):
        self.packed_after_flatten = False
        if self.kind == "bits":
            raise ExportError(f"layer {name}: expects real input but the previous layer's output was binarized.")
        self._finalize_float()

    def _finalize_float(self):
        for i, op in enumerate(self.ops):
            if op["op"] == "bn":
                self.ops[i] = _bn_affine(op)
        self.kind = "float"


def _tuple2(v):
    return (v, v) if isinstance(v, int) else tuple(v) if v is not None else (1, 1)


def _bn_affine(bn):
    # the same float32 operations as flax's _normalize: mul = rsqrt(var + eps) * scale
    mul = jax.lax.rsqrt(jnp.asarray(bn["var"]) + jnp.float32(bn["eps"])) * jnp.asarray(bn["scale"])
    return {"op": "affine", "mean": bn["mean"], "mul": np.asarray(mul, np.float32), "add": bn["bias"]}


def _channels(maps):
    return int(np.asarray(maps[0]["mean"]).shape[-1])


def _slope(maps):
    """Per-channel sign of the slope of a chain of BN/affine maps (+1, -1, or 0 for a constant)."""
    s = np.ones(_channels(maps))
    for m in maps:
        s = s * np.sign(m["scale"] if m["op"] == "bn" else m["mul"])
    return s


def _apply_norm(m, y):
    """Evaluate one BN/affine map exactly as the float model does (a BatchNorm: the module itself)."""
    if m["op"] == "affine":
        return (y - m["mean"]) * m["mul"] + m["add"]
    mod = m["module"]
    variables = {"batch_stats": {"mean": m["mean"], "var": m["var"]}, "params": {}}
    if mod.use_scale:
        variables["params"]["scale"] = m["scale"]
    if mod.use_bias:
        variables["params"]["bias"] = m["bias"]
    return np.asarray(mod.clone(parent=None, use_running_average=True).apply(variables, jnp.asarray(y)))


def _thresholds(maps, integer_input: bool):
    """Fold a chain of per-channel monotone maps followed by sign into ``bit(-1) = s * y < T``.

    Integer input (a packed layer's popcount result): the chain is evaluated on every possible
    integer, so the thresholds reproduce the float model's float32 decisions exactly. Real input
    (the first layer): the chain's float arithmetic is kept.
    """
    c = _channels(maps)
    if not integer_input:
        out = {"mode": "float", "n": len(maps)}
        for i, m in enumerate(m if m["op"] == "affine" else _bn_affine(m) for m in maps):
            out.update({f"mean{i}": m["mean"], f"mul{i}": m["mul"], f"add{i}": m["add"]})
        return out
    k = max(int(m["k"]) for m in maps if m.get("k") is not None) if any(m.get("k") for m in maps) else None
    if k is None:
        raise ExportError("cannot bound the integer input of a threshold.")
    ys = np.arange(-k, k + 1, dtype=np.float32)
    v = np.broadcast_to(ys[:, None], (ys.size, c)).copy()
    for m in maps:
        v = np.asarray(_apply_norm(m, v), np.float32)
    neg = v < 0  # (2k+1, C): which integers the float model maps to -1
    slope = _slope(maps)
    s = np.where(slope >= 0, 1, -1).astype(np.int32)
    t = np.empty(c, np.int64)
    for ch in range(c):
        nonneg = np.nonzero(~neg[:, ch])[0]
        if s[ch] > 0:  # -1 below the first non-negative output
            t[ch] = ys[nonneg[0]] if nonneg.size else k + 1
        else:  # -1 above the last non-negative output: -y < -t
            t[ch] = -ys[nonneg[-1]] if nonneg.size else k + 1
        if not np.array_equal(s[ch] * ys < t[ch], neg[:, ch]):
            raise ExportError(f"channel {ch} of a BatchNorm is not monotone in its input; cannot fold it.")
    return {"mode": "int", "s": s, "t": t.astype(np.int32)}


def _pack_dense_kernel(w, layout):
    """Pack a dense kernel ``(K, O)`` to match flattened packed input words ``layout = (H, W, C)``."""
    h, wd, c = layout
    o = w.shape[-1]
    if h * wd * c != w.shape[0]:
        raise ExportError(f"dense kernel has {w.shape[0]} inputs but the flattened input has {h * wd * c}.")
    return np.asarray(pk.pack_kernel(w.reshape(h, wd, c, o))) if (h, wd) != (1, 1) else np.asarray(pk.pack_kernel(w))


def export(model: nn.Module, variables: dict, example_input) -> "PackedModel":
    """Build a :class:`PackedModel` from a trained model and verify it on ``example_input``.

    Args:
      model: the Flax module; its ``__call__(x, train=False)`` must be a chain of supported layers.
      variables: ``{"params": ..., "batch_stats": ...}`` of the trained model.
      example_input: a batch (e.g. a few test images) to trace shapes and verify the export.

    Raises:
      ExportError: an unsupported layer or quantizer (names the layer), or packed predictions that
        differ from the model's on ``example_input``.
    """
    x = jnp.asarray(example_input)
    calls, logits = _record(model, variables, x)
    b = _Builder(variables)
    flattened = None  # (H, W, C) of the last Flatten, for the dense layer right after it
    for mod, name, in_shape, _ in _outermost(calls):
        if isinstance(mod, BiRealBlock):
            b.residual_block(mod, name, _outermost(calls, name))
            flattened = None
        elif isinstance(mod, (L.ABCConv, L.ABCDense)):
            b.abc_layer(mod, name, in_shape)
            flattened = None
        elif isinstance(mod, L.Activation):
            if mod.fn not in ("relu", jax.nn.relu):
                raise ExportError(f"layer {name}: activation {mod.fn!r} is not exported (supported: 'relu').")
            b._to_float(name)
            b.emit("relu")
        elif isinstance(mod, L.GlobalAvgPool):
            if len(in_shape) != 4:
                raise ExportError(f"layer {name}: only 2-D global average pooling is exported.")
            b.emit("gap")
            flattened = None
        elif isinstance(mod, (L.QuantConv, L.QuantDense, nn.Conv, nn.Dense)):
            b.layer(mod, name, in_shape, flattened or (1, 1, in_shape[-1]))
            flattened = None
        elif isinstance(mod, nn.BatchNorm):
            b.batch_norm(mod, name)
        elif isinstance(mod, nn.Dropout):
            continue  # the identity at inference
        elif isinstance(mod, L.MaxPool):
            ws = tuple(mod.window_shape)
            st = tuple(mod.strides) if mod.strides is not None else ws
            if mod.padding != "VALID":
                raise ExportError(f"layer {name}: only VALID max-pooling is exported.")
            b.emit("maxpool", window=list(ws), strides=list(st))
        elif isinstance(mod, L.Flatten):
            flattened = tuple(in_shape[1:]) if len(in_shape) == 4 else (1, 1, int(np.prod(in_shape[1:])))
            b.emit("flatten")
        else:
            raise ExportError(f"layer {name} ({type(mod).__name__}) cannot be exported; supported: QuantConv, "
                              "QuantDense, ABCConv, ABCDense, nn.Conv, nn.Dense, BatchNorm, MaxPool, Flatten, "
                              "GlobalAvgPool, Activation('relu'), Dropout, BiRealBlock.")
    b._finalize_float()
    packed = PackedModel(_clean(b.ops), tuple(x.shape[1:]))
    got = np.asarray(packed(x))
    want = np.asarray(logits)
    if got.shape != want.shape or not np.array_equal(got.argmax(-1), want.argmax(-1)):
        raise ExportError("the packed model's predictions differ from the model's on example_input: the model "
                          "computes something between its layers that the exporter cannot see (a function call, "
                          "a residual add); express it with supported layer modules.")
    if not np.allclose(got, want, rtol=1e-4, atol=1e-3 * max(1.0, float(np.abs(want).max()))):
        raise ExportError(f"packed logits differ from the model's by up to {np.abs(got - want).max():.3g}.")
    return packed


def _clean(ops):
    out = []
    for op in ops:
        op = {k: v for k, v in op.items() if k not in ("module", "name", "k" if op["op"] in ("bn", "affine") else "")
              and v is not None}
        if op["op"] == "bn":
            op = _bn_affine(op)
        out.append(op)
    return out


# --- the packed model -----------------------------------------------------------------------------

def _run(ops, x):
    """Run the packed program. ``x`` is float; values move between float, int32 and packed bits;
    ``save``/``load`` keep float values in numbered slots for residual adds."""
    v, slots = x, {}
    for op in ops:
        kind = op["op"]
        if kind == "save":
            slots[int(op["slot"])] = v
        elif kind == "load":
            v = slots[int(op["slot"])]
        elif kind == "add":
            v = v.astype(jnp.float32) + slots[int(op["slot"])]
        elif kind == "avgpool":
            v = nn.avg_pool(v.astype(jnp.float32), tuple(op["window"]), tuple(op["strides"]), padding="SAME",
                            count_include_pad=False)
        elif kind == "gap":
            v = jnp.mean(v.astype(jnp.float32), axis=(1, 2))
        elif kind == "relu":
            v = jnp.maximum(v, 0.0)
        elif kind in ("abc_conv", "abc_dense"):
            v = _abc(op, v)
        elif kind == "fconv":
            w = op["kernel"] if "kernel" in op else pk.unpack_bits(op["kernel_bits"], int(np.prod(op["shape"][:3]))).T
            w = w.reshape(op["shape"])
            v = conv_nd(v, w, strides=tuple(op["strides"]), padding=[tuple(p) for p in op["pads"]],
                          pad_values=op["pad_values"])
        elif kind == "fdense":
            w = op["kernel"] if "kernel" in op else pk.unpack_bits(op["kernel_bits"], op["shape"][0]).T
            v = jnp.dot(v.astype(jnp.float32), w)
        elif kind == "bconv":
            v = pk.binary_conv2d(v, op["kernel"], int(op["k"]), tuple(op["kernel_hw"]), tuple(op["strides"]),
                                 [tuple(p) for p in op["pads"]], op.get("correction"))
        elif kind == "bdense":
            v = pk.xnor_matmul(v, op["kernel"], int(op["k"]))
        elif kind == "affine":
            v = (v.astype(jnp.float32) - op["mean"]) * op["mul"] + op["add"]
        elif kind == "threshold":
            if op["mode"] == "int":
                v = op["s"] * v < op["t"]
            else:
                for i in range(int(op["n"])):
                    v = (v - op[f"mean{i}"]) * op[f"mul{i}"] + op[f"add{i}"]
                v = v < 0
        elif kind == "sign":
            v = v < 0
        elif kind == "pack":
            v = pk.pack_bits(v, axis=-1)
        elif kind == "maxpool":
            v = max_pool(v, tuple(op["window"]), tuple(op["strides"]))
        elif kind == "maxpool_bits":
            v = _maxpool_words(v, tuple(op["window"]), tuple(op["strides"]), op["and_mask"])
        elif kind == "flatten":
            v = v.reshape((v.shape[0], -1))
        else:
            raise ValueError(f"unknown op {kind!r} in packed model.")
    return v


def _abc(op, x):
    """``sum_n beta_n sum_m alpha_m binary_op(bits(x + v_n < 0.5), B_m)`` on packed bits."""
    y = 0.0
    for n in range(len(op["shift"])):
        bits = pk.pack_bits(x + op["shift"][n] < 0.5, axis=-1)
        acc = 0.0
        for m in range(len(op["alpha"])):
            if op["op"] == "abc_conv":
                c = op["correction"][m] if "correction" in op else None
                z = pk.binary_conv2d(bits, op["kernels"][m], int(op["k"]), tuple(op["kernel_hw"]),
                                     tuple(op["strides"]), [tuple(p) for p in op["pads"]], c)
            else:
                z = pk.xnor_matmul(bits, op["kernels"][m], int(op["k"]))
            acc = acc + op["alpha"][m] * z.astype(jnp.float32)
        y = y + op["beta"][n] * acc
    return y


def _maxpool_words(words, window, strides, and_mask):
    mask = pk.pack_bits(jnp.asarray(and_mask, bool))  # set bit where the channel pools with AND
    n, h, w, c = words.shape
    wh, ww = window
    sh, sw = strides
    ho, wo = (h - wh) // sh + 1, (w - ww) // sw + 1
    taps = [words[:, i: i + (ho - 1) * sh + 1: sh, j: j + (wo - 1) * sw + 1: sw] for i in range(wh) for j in range(ww)]
    all_and, any_or = taps[0], taps[0]
    for t in taps[1:]:
        all_and, any_or = all_and & t, any_or | t
    return (all_and & mask) | (any_or & ~mask)


class PackedModel:
    """A bit-packed inference model: a list of ops with numpy arrays, run by one jitted function.

    Call it on a float batch of the input shape it was exported with; it returns float logits.
    """

    def __init__(self, ops: list[dict], input_shape: tuple):
        self.ops = ops
        self.input_shape = tuple(input_shape)
        self._fn = jax.jit(lambda arrays, x: _run(_merge(self._static, arrays), x))
        self._static, self._arrays = _split(ops)

    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"packed model expects inputs of shape (batch, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}.")
        return self._fn(self._arrays, x)

    def nbytes(self) -> int:
        """Bytes of the arrays the model stores."""
        return sum(a.nbytes for op in self._arrays for a in op.values())


def _split(ops):
    static, arrays = [], []
    for op in ops:
        static.append({k: v for k, v in op.items() if not isinstance(v, np.ndarray)})
        arrays.append({k: jnp.asarray(v) for k, v in op.items() if isinstance(v, np.ndarray)})
    return static, arrays


def _merge(static, arrays):
    return [{**s, **a} for s, a in zip(static, arrays)]


# --- files ----------------------------------------------------------------------------------------

def save_packed(path: str | os.PathLike, model: PackedModel) -> int:
    """Write the packed model to one msgpack file (no pickle); returns its size in bytes."""
    ops = []
    for op in model.ops:
        ops.append({k: (np.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in op.items()})
    payload = serialization.msgpack_serialize({"format": FORMAT, "version": VERSION,
                                               "input_shape": list(model.input_shape),
                                               "ops": {str(i): op for i, op in enumerate(ops)}})
    Path(path).write_bytes(payload)
    return len(payload)


def load_packed(path: str | os.PathLike) -> PackedModel:
    """Read a file written by :func:`save_packed`; needs no training code.

    Raises:
      ValueError: not a bnnjax packed model, a newer format version, or a corrupt file (names the file).
    """
    path = Path(path)
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise ValueError(f"{path}: not a readable packed model ({type(e).__name__}: {e}).") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a bnnjax packed model file.")
    if int(raw.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: format version {raw['version']} is newer than this bnnjax ({VERSION}); upgrade.")
    ops = [_restore_op(raw["ops"][str(i)]) for i in range(len(raw["ops"]))]
    return PackedModel(ops, tuple(raw["input_shape"]))


def _restore_op(op):
    out = {}
    for k, v in op.items():
        if isinstance(v, dict):  # msgpack turns lists of lists into dicts of "0", "1", ...
            v = [v[str(i)] for i in range(len(v))]
        if k in ("pads",):
            v = [list(p.values()) if isinstance(p, dict) else list(p) for p in v]
        out[k] = v
    return out
