"""Larq-style model summary: parameters by bit width, memory, and MACs by precision, per layer.

Shapes come from ``jax.eval_shape`` of ``module.init`` (linen) or of the model's call (NNX) with every
submodule call intercepted to record its input and output shapes (no forward pass is computed). Counting rules follow Larq's
``lq.models.summary``: a BatchNorm counts as fused (2 numbers per channel: its offset is folded with
the moving mean, its scale with the moving variance); MACs are kernel size x output positions, at the
precision ``max(input bits, kernel bits)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from bnnjax import _trace, layers as L
from bnnjax import quantizers

__all__ = ["summary", "LayerProfile"]


def _nnx_layers():
    from bnnjax import nnx as bnx

    return bnx


def _mac_layers():
    bnx = _nnx_layers()
    return (nn.Dense, nn.Conv, nn.ConvTranspose, L.QuantDense, L.QuantConv, L.QuantDepthwiseConv2D, L.ABCDense,
            L.ABCConv, L.FixedDepthwiseConv2D, nnx.Linear, nnx.Conv, nnx.ConvTranspose, bnx.QuantLinear,
            bnx.QuantConv, bnx.ABCLinear, bnx.ABCConv, bnx.FixedDepthwiseConv)


def _is_abc(module) -> bool:
    bnx = _nnx_layers()
    return isinstance(module, (L.ABCDense, L.ABCConv, bnx.ABCLinear, bnx.ABCConv))


@dataclasses.dataclass
class LayerProfile:
    """One row of the layer table."""

    name: str
    kind: str
    input_precision: int | None
    output_shape: tuple
    params_by_bits: dict[int, int]
    trainable: int
    non_trainable: int
    memory_bits: int
    macs_by_bits: dict[int, int]


def _own_vars(variables, path):
    out = {}
    for col, tree in variables.items():
        node = tree
        for p in path:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        own = {k: v for k, v in node.items() if not isinstance(v, dict)} if isinstance(node, dict) else {}
        if own:
            out[col] = own
    return out


def _input_precision(module) -> int | None:
    q = getattr(module, "input_quantizer", None)
    if _is_abc(module):
        return 1 if module.num_act_bases is not None else None
    return quantizers.get(q).precision if q is not None else None


def _profile(name, module, own, in_shape, out_shape) -> LayerProfile:
    params = dict(own.get("params", {}))
    stats = {c: v for c, v in own.items() if c != "params"}
    bn_stats = stats.get("batch_stats", {})
    if isinstance(module, (nn.BatchNorm, nnx.BatchNorm)):
        # Larq counts BatchNorm as fused for inference: offset folds into the mean, scale into the variance
        if "bias" in params and "mean" in bn_stats:
            params.pop("bias")
        if "scale" in params and "var" in bn_stats:
            params.pop("scale")
    by_bits: dict[int, int] = {}
    trainable = non_trainable = memory = 0
    for group, is_trainable in ((params, True), *((v, False) for v in stats.values())):
        for leaf in jax.tree.leaves(group, is_leaf=L.is_quantized):
            value = leaf.value if L.is_quantized(leaf) else leaf
            bits, size = L.precision_of(leaf), int(np.prod(value.shape))
            by_bits[bits] = by_bits.get(bits, 0) + size
            memory += bits * size
            if is_trainable:
                trainable += size
            else:
                non_trainable += size
    in_prec = _input_precision(module)
    macs: dict[int, int] = {}
    kernel = own.get("params", {}).get("kernel", own.get("constants", {}).get("kernel"))
    if isinstance(module, _mac_layers()) and kernel is not None and out_shape:
        kshape = kernel.value.shape if L.is_quantized(kernel) else kernel.shape
        positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 1 else 1
        count = int(np.prod(kshape)) * positions
        if _is_abc(module):
            count *= module.num_weight_bases * (module.num_act_bases or 1)
        mac_bits = max(in_prec or 32, L.precision_of(kernel))
        macs[mac_bits] = count
    return LayerProfile(name, type(module).__name__, in_prec, tuple(out_shape), by_bits, trainable,
                        non_trainable, memory, macs)


def _fmt_shape(shape):
    return "(-1, " + ", ".join(str(s) for s in shape[1:]) + ")" if shape else "?"


def _kib(bits):
    return bits / 8 / 1024


def _count(n) -> str:
    """A count to 3 significant figures with k/M/B/T, as Larq prints it (``13.2 M``, ``1.88 B``)."""
    n = float(f"{n:.3g}")  # round first, so 999,999 reads 1 M, not 1000 k
    if n < 1000:
        return f"{n:g}"
    units = 0
    while n >= 1000 and units < 4:
        n, units = n / 1000, units + 1
    return f"{n:.3g}" + ["", " k", " M", " B", " T"][units]


def _memory(kib: float) -> str:
    """A size with the largest binary prefix under 1024, as Larq prints it (``13.19 KiB``, ``4.17 MiB``)."""
    size = kib * 1024
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or suffix == "GiB":
            return f"{size:.2f} {suffix}"
        size /= 1024


def _table(title, header, rows, footer=None):
    cols = list(zip(*(([header] if header else []) + rows + ([footer] if footer else []))))
    widths = [max(len(str(c)) for c in col) for col in cols]
    left = 1 if header else len(widths)  # the key-value table reads left-aligned
    line = lambda r: "| " + "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                                      for i, (c, w) in enumerate(zip(r, widths))) + " |"
    width = len(line(header or rows[0]))
    rule = "+" + "-" * (width - 2) + "+"
    out = ["+" + title + "-" * (width - 2 - len(title)) + "+"] + ([line(header), rule] if header else [])
    out += [line(r) for r in rows] + [rule]
    if footer:
        out += [line(footer), rule]
    return "\n".join(out)


def _linen_profiles(module: nn.Module, example_inputs, kwargs, rngs) -> list[LayerProfile]:
    rngs = jax.random.key(0) if rngs is None else rngs
    if not isinstance(rngs, dict):
        rngs = {"params": rngs, "dropout": rngs, "quantizer": rngs}
    variables, calls = _trace.linen_calls(
        lambda: jax.eval_shape(lambda *a: module.init(rngs, *a, **kwargs), *example_inputs))
    variables = dict(variables)
    profiles, seen = [], set()
    for c in calls:
        own = _own_vars(variables, c.path)
        if c.path in seen or (not own and not isinstance(c.module, _mac_layers())) or (c.path == () and not own):
            continue
        seen.add(c.path)
        profiles.append(_profile("/".join(c.path) or type(c.module).__name__, c.module, own, c.input_shape,
                                 c.output_shape))
    return profiles


def _nnx_own_vars(module: nnx.Module) -> dict:
    """A module's own variables (not its submodules') by linen collection, tags as linen boxes."""
    bnx = _nnx_layers()
    own: dict = {}
    for name, var in vars(module).items():
        if not isinstance(var, nnx.Variable) or isinstance(var, nnx.RngState):
            continue
        value = var.get_value()
        if isinstance(var, bnx.QuantParam):
            value = L.QuantParam(value, var.precision, var.quantizer)
        collection = "params" if isinstance(var, nnx.Param) else (
            "constants" if isinstance(var, bnx.Constant) else "batch_stats" if isinstance(var, nnx.BatchStat)
            else type(var).__name__)
        own.setdefault(collection, {})[name] = value
    return own


def _nnx_profiles(model: nnx.Module, example_inputs, kwargs) -> list[LayerProfile]:
    profiles, seen = [], set()
    for call in _trace.nnx_calls(model, *example_inputs, **kwargs):
        module = model
        for p in call.path:
            module = module[p] if isinstance(p, int) else getattr(module, p)
        own = _nnx_own_vars(module)
        if call.path in seen or (not own and not isinstance(module, _mac_layers())) or (call.path == () and not own):
            continue
        seen.add(call.path)
        name = "/".join(map(str, call.path)) or type(module).__name__
        profiles.append(_profile(name, module, own, call.input_shape, call.output_shape))
    return profiles


def summary(module, *example_inputs, print_fn: Callable[[str], Any] | None = print,
            rngs=None, **kwargs) -> dict:
    """Print Larq's two summary tables for a Flax module and return the figures.

    Args:
      module: a Flax linen module, or a Flax NNX model (its variables as they are; a
        :class:`bnnjax.nnx.LinenModel` is summarized as the linen module it wraps).
      *example_inputs: arguments of ``module.__call__`` (arrays or ``jax.ShapeDtypeStruct``; the first
        axis is the batch axis, counted out of MACs).
      print_fn: where the tables go; None prints nothing.
      rngs: PRNG key(s) for a linen module's ``init`` (default ``jax.random.key(0)``; shapes only, no
        values computed).
      **kwargs: keyword arguments of ``module.__call__`` (e.g. ``train=False`` for linen).

    Returns:
      A dict with ``layers`` (a list of per-layer dicts), ``params_by_bits`` ({bits: count}),
      ``total_params``, ``trainable_params``, ``non_trainable_params``, ``memory_kib``,
      ``memory_8bit_kib``, ``float32_kib``, ``compression_ratio``, ``macs_by_bits`` ({bits: count}),
      ``total_macs`` and ``binarized_mac_ratio``.
    """
    if isinstance(module, nnx.Module) and isinstance(module, _nnx_layers().LinenModel):
        if module.train_kwarg is not None:
            kwargs = {module.train_kwarg: False, **kwargs}
        module = module.linen_module
    if isinstance(module, nnx.Module):
        profiles = _nnx_profiles(module, example_inputs, kwargs)
    else:
        profiles = _linen_profiles(module, example_inputs, kwargs, rngs)

    bits_all = sorted({b for p in profiles for b in p.params_by_bits} | {b for p in profiles for b in p.macs_by_bits})
    params_by_bits = {b: sum(p.params_by_bits.get(b, 0) for p in profiles) for b in bits_all
                      if any(b in p.params_by_bits for p in profiles)}
    macs_by_bits = {b: sum(p.macs_by_bits.get(b, 0) for p in profiles) for b in bits_all
                    if any(b in p.macs_by_bits for p in profiles)}
    memory_bits = sum(p.memory_bits for p in profiles)
    total = sum(params_by_bits.values())
    total_macs = sum(macs_by_bits.values())
    result = {
        "layers": [dataclasses.asdict(p) for p in profiles],
        "params_by_bits": params_by_bits,
        "total_params": total,
        "trainable_params": sum(p.trainable for p in profiles),
        "non_trainable_params": sum(p.non_trainable for p in profiles),
        "memory_kib": _kib(memory_bits),
        "memory_8bit_kib": _kib(sum(n * (b if b < 8 else 8) for b, n in params_by_bits.items())),
        "float32_kib": _kib(32 * total),
        "compression_ratio": memory_bits / (32 * total) if total else 0.0,
        "macs_by_bits": macs_by_bits,
        "total_macs": total_macs,
        "binarized_mac_ratio": macs_by_bits.get(1, 0) / total_macs if total_macs else 0.0,
    }
    if print_fn is not None:
        print_fn(_render(type(module).__name__.lower(), profiles, result))
    return result


def _render(title, profiles, r):
    pbits = sorted(r["params_by_bits"])
    mbits = sorted(r["macs_by_bits"])
    header = (["Layer", "Input prec. (bit)", "Outputs"] + [f"# {b}-bit" for b in pbits] + ["Memory (KiB)"]
              + [f"{b}-bit MACs" for b in mbits])
    rows = []
    for p in profiles:
        rows.append([p.name, "-" if p.input_precision is None else p.input_precision, _fmt_shape(p.output_shape)]
                    + [p.params_by_bits.get(b, 0) for b in pbits]
                    + [f"{_kib(p.memory_bits):.2f}" if p.memory_bits else "0"]
                    + [p.macs_by_bits.get(b, 0) for b in mbits])
    footer = (["Total", "", ""] + [r["params_by_bits"][b] for b in pbits] + [f"{r['memory_kib']:.2f}"]
              + [r["macs_by_bits"][b] for b in mbits])
    stats = _table(f"{title} stats", header, rows, footer)
    summ = [
        ["Total params", _count(r["total_params"])],
        ["Trainable params", _count(r["trainable_params"])],
        ["Non-trainable params", _count(r["non_trainable_params"])],
        ["Model size", _memory(r["memory_kib"])],
        ["Model size (8-bit FP weights)", _memory(r["memory_8bit_kib"])],
        ["Float-32 Equivalent", _memory(r["float32_kib"])],
        ["Compression Ratio of Memory", f"{r['compression_ratio']:.2f}"],
        ["Number of MACs", _count(r["total_macs"])],
    ]
    for bits, word in ((1, "binarized"), (2, "ternarized")):  # the lines Larq prints when non-zero
        if r["macs_by_bits"].get(bits):
            summ.append([f"Ratio of MACs that are {word}", f"{r['macs_by_bits'][bits] / r['total_macs']:.4f}"])
    return stats + "\n" + _table(f"{title} summary", None, summ)
