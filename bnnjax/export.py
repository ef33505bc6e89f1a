"""Packed inference: a trained BNN's own Flax modules on bit-packed weights, and a portable artifact.

``packed = pack(model, variables)`` replaces every kernel its layer can run on packed bits (tagged
``QuantParam``: a ±1 or per-channel scaled ±1 kernel, or ABC-Net's binary bases) by a
:class:`~bnnjax.packing.PackedKernel` — the kernel's sign bits, 32 to a ``uint32`` word, plus
per-channel scales or ABC's base scales. Everything else is kept. ``model.apply(packed, x)`` is
then the packed model: each quantized layer that finds a packed kernel packs its input's sign bits and
runs the XNOR-popcount kernel (:func:`bnnjax.ops.packed_conv`, :func:`bnnjax.ops.packed_dense`); the
rest of the network is the same module code. Any architecture written with bnnjax's layers packs —
chains, residual and dense blocks, the zoo's models — with no second description of the network.

``save_artifact(path, model, packed, example_input)`` writes ``jax.export``'s serialized StableHLO of
``model.apply(packed, .)`` with the packed weights embedded and a symbolic batch dimension; running it
needs jax alone::

    exported = jax.export.deserialize(open(path, "rb").read())
    probabilities = exported.call(images)      # any batch size

``save_packed``/``load_packed`` keep packed variables in one msgpack file (no pickle) for use with the
model code. ``compile_iree`` (optional extra ``iree``) compiles the same StableHLO with IREE for this
CPU or, cross-compiled, for aarch64 (Raspberry Pi 4, Apple M1).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax import serialization, traverse_util
from flax.core import meta

from bnnjax import _trace, layers as L
from bnnjax import packing as pk
from bnnjax import quantizers

__all__ = ["pack", "ExportError", "packed_bytes", "save_packed", "load_packed", "save_artifact", "load_artifact",
           "compile_iree", "load_iree", "IREE_TARGETS", "FORMAT", "VERSION"]

FORMAT = "bnnjax-packed-variables"
VERSION = 2
_RETIRED_FORMAT = "bnnjax-packed"  # version 1: the op-list exporter's files


class ExportError(ValueError):
    """A model that does not pack as asked, or a packed model that disagrees with the float model."""


def _pack_kernel(box: L.QuantParam) -> pk.PackedKernel:
    return _packed(jnp.asarray(box.value, jnp.float32), box.precision, box.quantizer, box.packable)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _packed(latent, precision: int, quantizer: str, packable: bool) -> pk.PackedKernel:
    # one compiled program per kernel shape: run op by op, packing's 32 shifted slices per word compiled
    # one by one (4 s for the three kernels of a small CNN)
    box = L.QuantParam(latent, precision, quantizer, packable)
    if box.quantizer == "abc":
        bases, alpha = L.abc_weight_bases(latent, box.precision)
        return pk.PackedKernel(jnp.stack([pk.pack_kernel(b) for b in bases]), tuple(latent.shape), alpha=alpha)
    scale = None
    if quantizers.get(box.quantizer).values == "scaled_signs":
        # q(W) = s * sign(W): every entry of column o has magnitude s[o]
        scale = jnp.abs(quantizers.get(box.quantizer)(latent).reshape(-1, latent.shape[-1])[0])
    signs = jnp.where(latent < 0, -1.0, 1.0)
    if box.packable:  # the layout the XNOR-popcount kernels read
        return pk.PackedKernel(pk.pack_kernel(signs), tuple(latent.shape), scale=scale)
    # real-valued input: the layer unpacks the kernel; all its bits in a row are the smallest storage
    words = pk.pack_bits(signs.reshape(-1))
    return pk.PackedKernel(words, tuple(latent.shape), per_tap=False, scale=scale)


def _packs(box) -> bool:
    """A ±1 (scaled) kernel, or ABC bases a layer runs packed: stored 1 bit per weight."""
    if not isinstance(box, L.QuantParam):
        return False
    if box.quantizer == "abc":
        return box.packable
    return box.precision == 1 and box.quantizer in quantizers.names() and \
        quantizers.get(box.quantizer).values in ("signs", "scaled_signs")


def _modules(model, variables, example_input, cls) -> dict[tuple, nn.Module]:
    """The ``cls`` modules that ``model.apply(variables, x)`` calls, by path (traced with
    ``jax.eval_shape``: nothing is computed)."""
    x = jax.ShapeDtypeStruct(jnp.shape(example_input), jnp.result_type(example_input))
    _, calls = _trace.linen_calls(lambda: jax.eval_shape(model.apply, variables, x))
    return {c.path: c.module for c in calls if isinstance(c.module, cls)}


def _one_filter(kernel):
    """A depthwise kernel ``(..., 1, C)`` whose channels all hold the same filter, as ``(..., 1, 1)``
    (a blur pool's: QuickNet's artifact 16 KB smaller); other kernels unchanged."""
    k = np.asarray(kernel)
    same = k.shape[-1] > 1 and np.array_equal(k, np.broadcast_to(k[..., :1], k.shape))
    return jnp.asarray(k[..., :1]) if same else kernel


def _fixed_filters(model, variables: dict, example_input) -> dict:
    flat = traverse_util.flatten_dict(dict(variables))
    for path in _modules(model, variables, example_input, L.FixedDepthwiseConv2D):
        key = ("constants", *path, "kernel")
        if key in flat:
            flat[key] = _one_filter(flat[key])
    return traverse_util.unflatten_dict(flat)


def _fold_batch_norms(model, variables: dict, example_input) -> dict:
    flat = traverse_util.flatten_dict(dict(variables))
    for path, module in _modules(model, variables, example_input, L.BatchNorm).items():
        stats = {k: flat.get(("batch_stats", *path, k)) for k in ("mean", "var")}
        if any(v is None for v in stats.values()):
            continue  # no running statistics: not an inference-mode BatchNorm
        params = {k: meta.unbox(flat.pop(("params", *path, k))) for k in ("scale", "bias")
                  if ("params", *path, k) in flat}
        for k in stats:
            del flat[("batch_stats", *path, k)]
        for k, v in L.fold_batch_norm(module, params, stats).items():
            flat[("batch_stats", *path, k)] = v
    return traverse_util.unflatten_dict(flat)


def _inference_fn(model, variables=None, method=None):
    """``x -> model's inference output``: ``model.apply(variables, x)`` for linen, ``model(x)`` of an NNX
    model in evaluation mode (a clone: the model is not changed) for NNX, its variables closed over."""
    if isinstance(model, nnx.Module):
        model = nnx.clone(model)
        model.eval()
        graphdef, state = nnx.split(model)
        return lambda a: nnx.merge(graphdef, state)(a)
    return lambda a: model.apply(variables, a, method=method)


def _verify(float_fn, packed_fn, example_input):
    x = jnp.asarray(example_input)
    want = np.asarray(jax.jit(float_fn)(x))
    got = np.asarray(jax.jit(packed_fn)(x))
    if got.shape != want.shape or not np.array_equal(got.argmax(-1), want.argmax(-1)):
        raise ExportError("the packed model's predictions differ from the float model's on example_input.")
    if not np.allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max())):
        raise ExportError(f"packed outputs differ from the float model's by up to {np.abs(got - want).max():.3g}.")


def pack(model, variables=None, example_input=None, *, fold_batch_norm: bool = True):
    """The model with every packable kernel bit-packed (inference only).

    ``pack(linen_module, variables, example_input)`` returns packed variables for
    ``linen_module.apply``; ``pack(nnx_model, example_input)`` returns a packed NNX model (a new model
    in evaluation mode; the one given is not changed). Kernels are found by their tag
    (:class:`~bnnjax.layers.QuantParam`, :class:`bnnjax.nnx.QuantParam`) and become
    :class:`~bnnjax.packing.PackedKernel` values the same layers run packed. With ``example_input``
    every bnnjax BatchNorm the model calls is also folded into two numbers per channel,
    ``y = x * a + b`` (:func:`bnnjax.layers.fold_batch_norm`; Flax's own BatchNorm keeps its
    variables, as it cannot read the folded form). Packed kernels compute exactly what the float layers
    compute, and a fixed depthwise kernel that is one filter for every channel (a blur pool) is
    stored once; folded BatchNorms round differently from ``(x - mean) * a + bias``, so outputs agree up to
    float32 rounding (and a value within rounding of a binarizing sign's threshold may fall on the other
    side); ``fold_batch_norm=False`` keeps Flax's arithmetic, bit for bit.

    Args:
      model: the Flax linen module the variables belong to (called as ``model.apply(variables, x)``),
        or a Flax NNX model (called as ``model(x)`` after ``model.eval()``).
      variables: a linen model's trained variables (``{"params": ..., "batch_stats": ...}``); for an NNX
        model, this argument is ``example_input``.
      example_input: optional batch, or its ``jax.ShapeDtypeStruct``, to trace the model with (which
        BatchNorm layers it calls). An array is also a check: the packed and the float model must give
        the same argmax on it, and outputs within 1e-2 of each other (relative to the largest), else
        ``ExportError``.
      fold_batch_norm: fold bnnjax's BatchNorm layers (needs ``example_input``).

    Returns:
      linen: the same variable tree with ``PackedKernel`` leaves (and folded BatchNorm statistics);
      NNX: the packed model.

    Raises:
      ExportError: the verification failed.
    """
    if isinstance(model, nnx.Module):
        if example_input is not None:
            raise TypeError("an NNX model is packed as pack(model, example_input): it holds its own variables.")
        return _pack_nnx(model, variables, fold_batch_norm)
    is_box = lambda x: isinstance(x, L.QuantParam)
    packed = jax.tree.map(lambda v: _pack_kernel(v) if _packs(v) else v, variables, is_leaf=is_box)
    if example_input is None:
        return packed
    if fold_batch_norm:
        packed = _fold_batch_norms(model, packed, example_input)
    packed = _fixed_filters(model, packed, example_input)
    if not isinstance(example_input, jax.ShapeDtypeStruct):
        _verify(_inference_fn(model, variables), _inference_fn(model, packed), example_input)
    return packed


def _pack_nnx(model: nnx.Module, example_input, fold_batch_norm: bool) -> nnx.Module:
    from bnnjax import nnx as bnx

    if isinstance(model, bnx.LinenModel):
        variables = model.linen_variables()
        packed = pack(model.linen_module, variables, example_input, fold_batch_norm=fold_batch_norm)
        return bnx.LinenModel(model.linen_module, packed, train_kwarg=model.train_kwarg)
    packed = nnx.clone(model)
    packed.eval()
    for _, module in nnx.iter_modules(packed):
        for name, var in list(vars(module).items()):
            if isinstance(var, bnx.QuantParam):
                box = L.QuantParam(var.get_value(), var.precision, var.quantizer, var.get_metadata().get("packable", False))
                if _packs(box):
                    setattr(module, name, nnx.Param(_pack_kernel(box)))
        if fold_batch_norm and example_input is not None and isinstance(module, bnx.BatchNorm) \
                and getattr(module, "multiplier", None) is None:
            params = {k: getattr(module, k).get_value() for k in ("scale", "bias") if getattr(module, k) is not None}
            stats = {k: getattr(module, k).get_value() for k in ("mean", "var")}
            folded = L.fold_batch_norm(module, params, stats)
            for k in ("mean", "var", "scale", "bias"):
                setattr(module, k, nnx.data(None))
            module.multiplier, module.offset = nnx.BatchStat(folded["multiplier"]), nnx.BatchStat(folded["offset"])
        if isinstance(module, bnx.FixedDepthwiseConv):
            module.kernel = bnx.Constant(_one_filter(module.kernel.get_value()))
    if example_input is not None and not isinstance(example_input, jax.ShapeDtypeStruct):
        _verify(_inference_fn(model), _inference_fn(packed), example_input)
    return packed


def packed_bytes(variables) -> int:
    """Bytes of the arrays in (packed) variables, or of a (packed) NNX model's state: what a packed model
    stores."""
    if isinstance(variables, nnx.Module):
        variables = nnx.state(variables, nnx.Param, nnx.BatchStat, bnx_constant())
    leaves = jax.tree.leaves(meta.unbox(variables))
    return int(sum(np.asarray(a).nbytes for a in leaves))


def bnx_constant():
    from bnnjax.nnx import Constant

    return Constant


# --- packed variables in a file -------------------------------------------------------------------

_PACKED_KEY = "__packed_kernel__"


def _to_state(tree):
    def leaf(v):
        if isinstance(v, pk.PackedKernel):
            fields = {"words": v.words, "shape": np.asarray(v.shape, np.int64), "per_tap": np.asarray(v.per_tap),
                      "scale": v.scale, "alpha": v.alpha}
            return {_PACKED_KEY: {k: np.asarray(a) for k, a in fields.items() if a is not None}}
        return np.asarray(meta.unbox(v))

    return jax.tree.map(leaf, tree, is_leaf=lambda v: isinstance(v, (pk.PackedKernel, L.QuantParam)))


def _from_state(tree):
    if isinstance(tree, dict) and _PACKED_KEY in tree:
        f = tree[_PACKED_KEY]
        return pk.PackedKernel(jnp.asarray(f["words"]), tuple(int(d) for d in f["shape"]), bool(f["per_tap"]),
                               **{k: jnp.asarray(f[k]) for k in ("scale", "alpha") if k in f})
    if isinstance(tree, dict):
        return {k: _from_state(v) for k, v in tree.items()}
    return jnp.asarray(tree)


def save_packed(path: str | os.PathLike, variables: dict) -> int:
    """Write packed variables (from :func:`pack`) to one msgpack file (no pickle); returns its size."""
    payload = serialization.msgpack_serialize({"format": FORMAT, "version": VERSION, "variables": _to_state(variables)})
    Path(path).write_bytes(payload)
    return len(payload)


def load_packed(path: str | os.PathLike) -> dict:
    """Read variables written by :func:`save_packed`, for ``model.apply``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a corrupt file, not a bnnjax file, a newer format version, or a file of the retired
        op-list exporter (the message says how to re-export).
    """
    path = Path(path)
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable packed-variables file ({type(e).__name__}: {e}).") from e
    if isinstance(raw, dict) and raw.get("format") == _RETIRED_FORMAT:
        raise ValueError(f"{path} was written by bnnjax's retired op-list exporter (format version "
                         f"{raw.get('version')}), which this bnnjax no longer reads: re-export the trained model with "
                         "bnnjax.export.pack(model, variables) and save_packed, or save_artifact for a file that "
                         "needs no model code.")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a bnnjax packed-variables file.")
    if int(raw.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: format version {raw['version']} is newer than this bnnjax's ({VERSION}); upgrade.")
    return _from_state(raw["variables"])


# --- portable artifact ----------------------------------------------------------------------------

def _model_args(model, packed, example_input):
    """``(variables, example_input)`` of the linen form ``f(model, packed, x)`` or the NNX form
    ``f(model, x)``."""
    if isinstance(model, nnx.Module):
        if example_input is not None:
            raise TypeError("an NNX model holds its variables: call with (model, example_input).")
        return None, packed
    if example_input is None:
        raise TypeError("a linen model needs its variables: call with (model, packed, example_input).")
    return packed, example_input


def save_artifact(path: str | os.PathLike, model, packed=None, example_input=None, *, method=None) -> int:
    """Write ``model.apply(packed, x)`` (linen) or ``model(x)`` (a packed NNX model, evaluation mode) as
    serialized StableHLO (``jax.export``), weights embedded.

    The batch dimension is symbolic: the file runs any batch size. Loading and running it needs jax
    only: ``jax.export.deserialize(open(path, "rb").read()).call(x)``. The exported function is checked
    against ``model.apply`` on ``example_input`` before the file is written.

    Args:
      path: the file to write.
      model: the Flax linen module, or a (packed) NNX model: ``save_artifact(path, nnx_model, x)``.
      packed: a linen module's variables, usually from :func:`pack`.
      example_input: a batch fixing the per-example shape and dtype.
      method: the linen module method to export (default ``__call__``).

    Returns:
      The file's size in bytes.

    Raises:
      ExportError: the exported function disagrees with ``model.apply`` on ``example_input``.
    """
    packed, example_input = _model_args(model, packed, example_input)
    x = jnp.asarray(example_input)
    batch, = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), x.dtype)
    fn = jax.jit(_inference_fn(model, packed, method))
    exported = _slimmed(jax.export.export(fn)(spec))
    got, want = np.asarray(exported.call(x)), np.asarray(fn(x))
    if got.shape != want.shape or not np.array_equal(got.argmax(-1), want.argmax(-1)):
        raise ExportError("the exported artifact's predictions differ from model.apply's on example_input.")
    data = exported.serialize()
    tmp = Path(f"{os.fspath(path)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def _slimmed(exported: jax.export.Exported) -> jax.export.Exported:
    """The exported program without its Python source locations and with repeated subexpressions
    merged (MLIR's ``strip-debuginfo`` and ``cse``): the shape arithmetic of a symbolic batch repeats
    for every op. QuickNet's artifact: 51 KB smaller; the computation is unchanged."""
    from jax.extend import mlir as xm
    from jax.extend.mlir import ir, passmanager
    from jax.extend.mlir.dialects import stablehlo

    with ir.Context() as context:
        stablehlo.register_dialect(context)
        module = xm.deserialize_portable_artifact(exported.mlir_module_serialized, context)
        passmanager.PassManager.parse("builtin.module(strip-debuginfo,cse)").run(module.operation)
        # the compatibility window jax.export itself serializes for
        version = stablehlo.get_version_from_compatibility_requirement(stablehlo.StablehloCompatibilityRequirement.WEEK_4)
        serialized = xm.serialize_portable_artifact(module, version)
    return dataclasses.replace(exported, mlir_module_serialized=serialized)


def load_artifact(path: str | os.PathLike):
    """The function a :func:`save_artifact` file holds, as a ``jax.export.Exported`` (call ``.call(x)``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a serialized ``jax.export`` artifact (corrupt or another format).
    """
    data = Path(path).read_bytes()
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:
        raise ValueError(f"{path}: not a jax.export artifact ({type(e).__name__}: {e}).") from e


# --- IREE (optional extra "iree") ------------------------------------------------------------------

IREE_TARGETS = {
    "host": ["--iree-llvmcpu-target-cpu=host"],
    "x86-64": ["--iree-llvmcpu-target-triple=x86_64-linux-gnu", "--iree-llvmcpu-target-cpu=x86-64-v3"],
    "rpi4": ["--iree-llvmcpu-target-triple=aarch64-linux-gnu", "--iree-llvmcpu-target-cpu=cortex-a72"],
    "apple-m1": ["--iree-llvmcpu-target-triple=arm64-apple-darwin", "--iree-llvmcpu-target-cpu=apple-m1"],
}


def _iree():
    try:
        from iree import compiler, runtime
    except ImportError as e:
        raise ImportError("IREE is not installed: pip install 'bnnjax[iree]' (iree-base-compiler, "
                          "iree-base-runtime).") from e
    return compiler, runtime


def compile_iree(model, packed=None, example_input=None, target: str = "host",
                 path: str | os.PathLike | None = None, *, verify: bool = True) -> bytes:
    """Compile ``model.apply(packed, .)`` (or an NNX model: ``compile_iree(model, x, target=...)``) with
    IREE for a CPU: the same StableHLO as :func:`save_artifact`, at the fixed batch size of
    ``example_input`` (IREE's CPU backend does not take jax's symbolic dimensions).

    IREE links its own OS-independent ELF code (``embedded-elf``) for every target, loaded by IREE's
    runtime on any OS of that architecture. Its runtime does not check CPU features when it loads a
    module: a module for a CPU with more features than the one running it dies of an illegal
    instruction (SIGILL). Verified: ``"rpi4"`` modules run under qemu-user emulating a Cortex-A72
    with predictions identical to x86 (``experiments/check_arm.py``); ``"apple-m1"`` modules (armv8.4-a
    with dot product and fp16 instructions) run under qemu's ``max`` CPU with identical predictions and
    die of SIGILL on a Cortex-A72. Neither has been timed on the real boards (emulated timings mean nothing).

    Args:
      target: ``"host"`` (this machine), ``"x86-64"`` (x86-64-v3), ``"rpi4"`` (Raspberry Pi 4: aarch64
        Cortex-A72) or ``"apple-m1"`` (armv8.4-a + dot product + fp16; not for a Pi 4).
      path: where to write the ``.vmfb`` module, if given.
      verify: for a module this machine can run (``"host"``, and ``"x86-64"`` on an x86-64-v3 CPU), run it
        on ``example_input`` and require the predictions of ``model.apply``.

    Returns:
      The compiled module (IREE VM flatbuffer).

    Raises:
      ImportError: IREE is not installed.
      ValueError: unknown target.
      ExportError: the compiled module disagrees with the model on ``example_input``.
    """
    if target not in IREE_TARGETS:
        raise ValueError(f"unknown IREE target {target!r}; choose one of {sorted(IREE_TARGETS)}.")
    compiler, _ = _iree()
    packed, example_input = _model_args(model, packed, example_input)
    x = jnp.asarray(example_input)
    fn = jax.jit(_inference_fn(model, packed))
    exported = jax.export.export(fn)(jax.ShapeDtypeStruct(x.shape, x.dtype))
    vmfb = compiler.compile_str(exported.mlir_module(), target_backends=["llvm-cpu"], input_type="stablehlo",
                                extra_args=IREE_TARGETS[target])
    if verify and target == "host":
        got, want = load_iree(vmfb)(np.asarray(x)), np.asarray(fn(x))
        if got.shape != want.shape or not np.array_equal(got.argmax(-1), want.argmax(-1)):
            raise ExportError("the IREE module's predictions differ from the model's on example_input.")
    if path is not None:
        Path(path).write_bytes(vmfb)
    return vmfb


def load_iree(vmfb: bytes):
    """A :func:`compile_iree` module this machine can run, as a function of a numpy batch (IREE's CPU
    runtime).

    Raises:
      ValueError: a module compiled for another CPU (run it on that device with IREE's
        ``iree-run-module``; ``experiments/check_arm.py`` shows how, under qemu).
    """
    _, runtime = _iree()
    try:
        main = runtime.load_vm_flatbuffer(vmfb, driver="local-task").main
    except RuntimeError as e:
        if "INCOMPATIBLE" not in str(e) and "not found" not in str(e):
            raise
        raise ValueError("this IREE module was compiled for another CPU than this one (compile_iree's target); "
                         "run it on that device with IREE's iree-run-module, or compile with target='host' to run it "
                         f"here ({str(e).splitlines()[0][:200]}).") from e
    return lambda x: np.asarray(main(np.asarray(x, np.float32)))
