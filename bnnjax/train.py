"""Training engine: train state, compiled steps, and one loop for in-memory arrays and for streams.

``fit`` is Keras' ``fit`` for Flax models (linen modules whose ``__call__`` takes a ``train`` keyword, or
NNX models, switched with ``model.train()`` / ``model.eval()``): it shuffles with a seeded per-epoch
order, runs several optimizer steps per compiled call (``lax.scan``), shows a tqdm bar, evaluates,
appends one JSON line per epoch to ``workdir/log.jsonl`` and checkpoints. ``fit_stream`` trains from an
input stream (``bnnjax.pipeline.train_loader``) for data that does not fit in memory: step-based, with
an optional on-device ``preprocess`` (e.g. ``pipeline.normalize`` of uint8 batches) and a JSON-lines
row every few steps. Both are the same engine over two sources of batches: the same compiled steps, the
same orbax checkpoints (``workdir/checkpoints/<step>/``: the train state, the source's position — the
epoch and batch of the arrays, or the grain iterator's state, one file per process — and what the run
is), the same exact resume: re-running with the same ``workdir`` continues at the latest checkpoint
(mid-epoch too) and, on CPU, ends bit-identical to an uninterrupted run. A workdir of earlier bnnjax
versions (``checkpoint.msgpack``) is converted on first use.

Data parallelism: the batch axis is sharded over a ``jax.sharding.Mesh`` of all devices (or the mesh
you pass) and the state is replicated; XLA inserts the gradient and BatchNorm reductions, so one device
and many run the same code. Several processes (hosts): call :func:`initialize_distributed` (or
``jax.distributed.initialize()``) first in every process, then run the same ``fit``/``fit_stream`` call
in each — every process holds the arrays (``fit``) or reads its own shard of the stream
(``fit_stream``), the global batches are assembled across processes, every process writes its part
of each checkpoint, and the log, progress bar and ``log_fn`` run on process 0 only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization, struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnnjax import optim, packing
from bnnjax.datasets import epoch_permutation

__all__ = ["TrainState", "create_train_state", "softmax_cross_entropy", "squared_hinge", "LOSSES",
           "make_train_step", "make_eval_step", "evaluate", "fit", "fit_stream", "restore_checkpoint",
           "data_mesh", "current_learning_rate", "initialize_distributed", "trained_model", "PeerLostError",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "bnnjax-train"


class PeerLostError(RuntimeError):
    """A process of a multi-process run stopped: the others cannot go on (restart every process; the run
    resumes from its last checkpoint)."""

CHECKPOINT_VERSION = 1

# XLA's compiler frees its working memory (several hundred MiB for a 224x224 model) back to glibc's
# allocator, which keeps it mapped; the process's peak then counts it on top of the first step's
# activations. Each finished compilation hands it back to the OS (glibc's malloc_trim, ~1 ms). QuickNet's
# training at batch 32 (experiments/bench_train.py): peak RSS 1,666-1,709 -> 1,323-1,342 MiB, the step unchanged.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _glibc_malloc_trim():
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc (macOS, musl): nothing to hand back this way
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _glibc_malloc_trim()


def _trim_after_compile(event: str, duration_secs: float, **_):
    if event == _COMPILE_EVENT and _malloc_trim is not None:
        _malloc_trim(0)


jax.monitoring.register_event_duration_secs_listener(_trim_after_compile)


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics, the model's other variables and the PRNG key data
    (uint32) of dropout and stochastic quantizers.

    For a linen model ``params``, ``batch_stats`` and ``extra_variables`` (every other collection, e.g.
    the ``"constants"`` of fixed blur-pool kernels: passed to the model, never trained) are variable
    dicts; for an NNX model they are ``nnx.State``s of its ``nnx.Param``s (tags kept), its
    ``nnx.BatchStat``s and ``{"rest": everything else}``, and ``apply_fn`` merges them with the model's
    graph. ``api`` says which (``"linen"`` or ``"nnx"``); ``model_name`` is the model's class name."""

    batch_stats: Any = None
    rng: jax.Array = None
    extra_variables: Any = struct.field(default_factory=dict)
    api: str = struct.field(pytree_node=False, default="linen")
    model_name: str = struct.field(pytree_node=False, default="")


def softmax_cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def squared_hinge(logits, labels):
    """BinaryNet's squared hinge loss: ``mean_i sum_k max(0, 1 - t_ik y_ik)^2``, ``t`` one-hot in {-1, +1}.

    Reference: Courbariaux et al., "Binarized Neural Networks", 2016.
    """
    t = 2.0 * jax.nn.one_hot(labels, logits.shape[-1]) - 1.0
    return jnp.mean(jnp.sum(jnp.square(jnp.maximum(0.0, 1.0 - t * logits.astype(jnp.float32))), axis=-1))


LOSSES = {"cross_entropy": softmax_cross_entropy, "squared_hinge": squared_hinge}


def _loss(loss):
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a function.")
    return LOSSES[loss]


@dataclasses.dataclass(frozen=True)
class _NNXApply:
    """An NNX model's graph as a linen-style ``apply(variables, x, train, mutable, rngs)``: the engine's
    compiled steps stay functional (one merge per trace, not per step)."""

    graphdef: Any

    def model(self, variables) -> nnx.Module:
        # rebuilt leaf by leaf: variables made here belong to the current trace (a grad inside the jit), so
        # the model may update its BatchNorm statistics and RNG counts
        fresh = jax.tree.map(lambda a: a, (variables["params"], variables["batch_stats"], variables["rest"]))
        return nnx.merge(self.graphdef, *fresh)

    def __call__(self, variables, x, train: bool = False, mutable=False, rngs=None):
        model = self.model(variables)
        if rngs is not None:
            # every RNG stream (dropout, stochastic quantizers) restarts from the step's key: like linen's
            # rngs argument, a function of (seed, step), so a resumed run draws what the full run drew
            key = rngs["quantizer"] if isinstance(rngs, dict) else rngs
            streams = [s for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)]
            for i, stream in enumerate(streams):
                k = jax.random.fold_in(key, i)
                stream.key.set_value(k)
                stream.count.set_value(jnp.zeros((), jnp.uint32))
        if train:
            model.train()
        else:
            model.eval()
        out = model(x)
        if mutable:
            return out, {"batch_stats": nnx.state(model, nnx.BatchStat)}
        return out


def _nnx_train_state(model: nnx.Module, tx, seed: int) -> TrainState:
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return TrainState.create(apply_fn=_NNXApply(graphdef), params=params, tx=tx, batch_stats=stats,
                             rng=jax.random.key_data(jax.random.split(jax.random.key(seed))[1]),
                             extra_variables={"rest": rest}, api="nnx", model_name=type(model).__name__)


def create_train_state(model, tx: optax.GradientTransformation, example_input=None, seed: int = 0,
                       params=None, batch_stats=None, extra_variables=None) -> TrainState:
    """Initialize the model (linen: ``model.init(..., train=False)``) and the optimizer.

    Args:
      model: a Flax linen module whose ``__call__(x, train)`` returns logits, or an NNX model (its current
        variables are the initial ones; ``example_input`` is not needed).
      tx: the optax transform (chain ``bnnjax.weight_clip()`` for latent binary kernels).
      example_input: one batch (or a ``ShapeDtypeStruct``) that fixes a linen model's input shape.
      seed: PRNG seed for initialization and the training key.
      params: linen: initial parameters to use instead of the model's initializers (e.g. converted ones).
      batch_stats: linen: initial BatchNorm statistics to use likewise.
      extra_variables: linen: the other collections (e.g. ``{"constants": ...}``) to use likewise.

    Warns (once): binary kernels with neither ``weight_clip`` nor ``bop`` in ``tx``.
    """
    if isinstance(model, nnx.Module):
        state = _nnx_train_state(model, tx, seed)
    else:
        if example_input is None:
            raise TypeError("a linen model needs example_input (one batch or its jax.ShapeDtypeStruct) to initialize.")
        init_key, train_key = jax.random.split(jax.random.key(seed))
        # jitted: an eager init of a 224x224 model runs every layer op by op and holds its activations
        init = jax.jit(lambda keys, x: model.init(keys, x, train=False))
        variables = init({"params": init_key, "dropout": init_key, "quantizer": init_key},
                         jnp.zeros(example_input.shape, example_input.dtype))
        params = variables["params"] if params is None else params
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  batch_stats=variables.get("batch_stats", {}) if batch_stats is None else batch_stats,
                                  rng=jax.random.key_data(train_key),  # raw uint32: serializable
                                  extra_variables={k: v for k, v in variables.items()
                                                   if k not in ("params", "batch_stats")}
                                  if extra_variables is None else extra_variables,
                                  model_name=type(model).__name__)
    optim.warn_if_unclipped(state.params, state.opt_state)
    return state


def trained_model(state: TrainState, model: nnx.Module | None = None) -> nnx.Module:
    """An NNX train state's model: ``model`` updated in place with the state's variables, or a new one."""
    if state.api != "nnx":
        raise TypeError("trained_model takes the state of an NNX model; a linen model's variables are "
                        "{'params': state.params, 'batch_stats': state.batch_stats, **state.extra_variables}.")
    variables = {"params": state.params, "batch_stats": state.batch_stats, **state.extra_variables}
    variables = jax.device_get(variables)
    if model is None:
        return state.apply_fn.model(variables)
    nnx.update(model, variables["params"], variables["batch_stats"], variables["rest"])
    return model


def _forward(state, params, x, train, rng):
    variables = {**(state.extra_variables or {}), "params": params, "batch_stats": state.batch_stats}
    if train:
        rngs = {"dropout": rng, "quantizer": jax.random.fold_in(rng, 1)}
        logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
        return logits, upd.get("batch_stats", state.batch_stats)
    return state.apply_fn(variables, x, train=False), state.batch_stats


def make_train_step(loss="cross_entropy", preprocess: Callable | None = None):
    """``step(state, x, y) -> (state, metrics)`` for one batch; metrics are sums over the batch.

    ``preprocess`` (e.g. ``pipeline.normalize``) maps the batch's inputs to the model's inside the
    compiled step, i.e. on the device."""
    loss_fn = _loss(loss)

    def step(state: TrainState, x, y):
        if preprocess is not None:
            x = preprocess(x)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def objective(params):
            logits, stats = _forward(state, params, x, True, rng)
            return loss_fn(logits, y), (logits, stats)

        (value, (logits, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        n = x.shape[0]
        return state, {"loss": value * n, "correct": jnp.sum(jnp.argmax(logits, -1) == y), "count": n}

    return step


def _scan_steps(step):
    """Run ``step`` over a leading axis of stacked batches in one compiled call."""

    def many(state, xs, ys):
        def body(s, batch):
            s, m = step(s, *batch)
            return s, m

        state, ms = jax.lax.scan(body, state, (xs, ys))
        return state, jax.tree.map(jnp.sum, ms)

    return many


def make_eval_step(loss="cross_entropy", preprocess: Callable | None = None):
    """``eval_step(state, x, y, mask=None) -> metrics`` (sums) in inference mode (running BatchNorm
    statistics). With a boolean ``mask`` only the examples where it is True count (padded batches)."""
    loss_fn = _loss(loss)

    def eval_step(state, x, y, mask=None):
        if preprocess is not None:
            x = preprocess(x)
        logits, _ = _forward(state, state.params, x, False, None)
        hit = jnp.argmax(logits, -1) == y
        if mask is None:
            return {"loss": loss_fn(logits, y) * x.shape[0], "correct": jnp.sum(hit), "count": x.shape[0]}
        per_example = jax.vmap(lambda l, t: loss_fn(l[None], t[None]))(logits, y)  # any mean loss, per row
        return {"loss": jnp.sum(jnp.where(mask, per_example, 0.0)), "correct": jnp.sum(hit & mask),
                "count": jnp.sum(mask)}

    return eval_step


def _compiled(loss, preprocess=None):
    """The jitted chunk and eval steps of one loss (and input preprocessing), shared by every ``fit`` /
    ``fit_stream`` call so that a second run of the same model (a benchmark after its warm-up, a resumed
    run) does not compile again."""
    return _compiled_cached(loss, preprocess)  # one cache key whether or not preprocess was passed


@functools.lru_cache(maxsize=None)
def _compiled_cached(loss, preprocess):
    options = packing.compiler_options()
    return (jax.jit(_scan_steps(make_train_step(loss, preprocess)), donate_argnums=0, compiler_options=options),
            jax.jit(make_eval_step(loss, preprocess), compiler_options=options))


def _int32_step(state):
    # a fresh state's step is a weakly typed Python int, a restored one int32: with one type, a resumed
    # run reuses the compiled steps of the first
    return state.replace(step=jnp.asarray(state.step, jnp.int32))


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"batch"`` over the given (default: all, every process's) devices."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("batch",))


def _place(mesh: Mesh, array, batch_axis: int):
    """A global array of ``array`` (the same host array in every process) sharded along ``batch_axis``
    over the mesh when it divides evenly, else replicated; each process copies only its devices' part."""
    array = np.asarray(array)
    n = mesh.devices.size
    spec = [None] * array.ndim
    if n > 1 and array.shape[batch_axis] % n == 0:
        spec[batch_axis] = "batch"
    sharding = NamedSharding(mesh, P(*spec))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _replicated(state, mesh: Mesh):
    """``state`` copied onto every device of ``mesh``: a copy, since the compiled steps donate their input
    state and the caller's (or an NNX model's own) arrays must survive the run."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(state, sharding, may_alias=False)
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding,
                                                               lambda i, a=np.asarray(a): a[i]), jax.device_get(state))


def _as_state(state_or_model, tx, seed):
    """``(state, model)``: a TrainState, or an NNX model and its new state (``tx`` needed)."""
    if isinstance(state_or_model, nnx.Module):
        if tx is None:
            raise TypeError("training an NNX model directly needs its optimizer: pass tx=optax...; or pass a "
                            "train.create_train_state(model, tx) state.")
        return create_train_state(state_or_model, tx, seed=seed), state_or_model
    if tx is not None:
        raise TypeError("tx is for an NNX model; a TrainState carries its own optimizer.")
    return state_or_model, None


def evaluate(state, x, y, batch_size: int = 1000, loss="cross_entropy", mesh: Mesh | None = None,
             _eval_step=None) -> dict:
    """Loss and accuracy over a whole split (a TrainState, or an NNX model); the last partial batch is
    included."""
    if isinstance(state, nnx.Module):
        state = _nnx_train_state(state, optax.identity(), 0)
    mesh = mesh or data_mesh()
    eval_step = _eval_step or _compiled(loss)[1]
    tot = {"loss": 0.0, "correct": 0, "count": 0}
    for i in range(0, len(x), batch_size):
        m = eval_step(state, _place(mesh, x[i:i + batch_size], 0), _place(mesh, y[i:i + batch_size], 0))
        for k in tot:
            tot[k] += float(m[k]) if k == "loss" else int(m[k])
    return {"loss": tot["loss"] / tot["count"], "accuracy": tot["correct"] / tot["count"]}


def current_learning_rate(state) -> float | None:
    """The learning rate stored by ``optax.inject_hyperparams`` in the optimizer state, if any."""
    injected = lambda s: isinstance(getattr(s, "hyperparams", None), dict)
    found = [s.hyperparams["learning_rate"] for s in jax.tree.leaves(state.opt_state, is_leaf=injected)
             if injected(s) and "learning_rate" in s.hyperparams]
    return float(found[0]) if found else None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_seconds: int = 120,
                           heartbeat_timeout_seconds: int | None = None) -> None:
    """Join a multi-process run (``jax.distributed.initialize``) with CPU collectives over gloo.

    With no arguments JAX detects the cluster (SLURM, Open MPI, Kubernetes, TPU pods); on a machine of
    your own give ``coordinator_address="host:port"`` (process 0's), ``num_processes`` and
    ``process_id``. Call it before anything else touches JAX.

    A process that dies is noticed by the others in their next collective, which fails at once: the
    engine raises :class:`PeerLostError` (the scripts print it as one line and exit with status 2). A
    process that hangs, or a death no collective sees, is noticed by JAX's coordination service after
    ``heartbeat_timeout_seconds`` without heartbeats: it terminates the others with "the JAX
    distributed service detected fatal errors ... another task died". Either way nobody waits forever.

    Args:
      coordinator_address: ``"host:port"`` of process 0 (None: detect the cluster).
      num_processes, process_id: this run's size and this process's rank (None: detect).
      timeout_seconds: how long the processes wait for each other to start.
      heartbeat_timeout_seconds: silence after which a process counts as dead (default
        ``timeout_seconds``); shorter stops a run sooner after a crash, but a process too busy to send
        heartbeats that long is then taken for dead.
    """
    # CPU collectives between processes (the default is none); accelerators bring their own. Nothing
    # here may touch a backend: initialize() must come first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    params = inspect.signature(jax.distributed.initialize).parameters
    if "heartbeat_timeout_seconds" in params:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds or timeout_seconds
    if "initialization_timeout" in params:
        kwargs["initialization_timeout"] = timeout_seconds
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


# --- the sources of batches -------------------------------------------------------------------------

class _Arrays:
    """In-memory ``(x, y)``: epoch ``e`` visits ``epoch_permutation(n, seed, e)`` in batches of
    ``batch_size``, the last partial batch included. Every process holds the arrays; each copies only
    its devices' rows of a global batch."""

    kind = "arrays"

    def __init__(self, x, y, batch_size: int, seed: int):
        if len(x) != len(y):
            raise ValueError(f"train_data has {len(x)} inputs but {len(y)} labels.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.full = len(x) // batch_size
        self.per_epoch = self.full + (1 if len(x) % batch_size else 0)
        self._order = (None, None)

    def order(self, epoch: int):
        if self._order[0] != epoch:
            self._order = (epoch, epoch_permutation(len(self.x), self.seed, epoch))
        return self._order[1]

    def run(self, step: int) -> int:
        """How many batches from ``step`` on have the same shape (the chunk may not cross the partial one)."""
        b = step % self.per_epoch
        return self.full - b if b < self.full else 1

    def chunk(self, step: int, k: int):
        epoch, b = divmod(step, self.per_epoch)
        order, bs = self.order(epoch), self.batch_size
        idx = order[b * bs:(b + k) * bs] if b < self.full else order[self.full * bs:]
        return self.x[idx].reshape((k, -1) + self.x.shape[1:]), self.y[idx].reshape(k, -1)

    def to_global(self, xs, ys, mesh):
        return _place(mesh, xs, 1), _place(mesh, ys, 1)


class _Stream:
    """An iterator of this process's batches ``{"image", "label"}`` (``pipeline.train_loader``)."""

    kind = "stream"

    def __init__(self, iterator, steps: int):
        self.iterator, self.steps = iterator, steps

    def run(self, step: int) -> int:
        return self.steps

    def chunk(self, step: int, k: int):
        batches = []
        for _ in range(k):
            try:
                batches.append(next(self.iterator))
            except StopIteration:
                raise RuntimeError(f"train_iter ended after {step + len(batches)} steps of {self.steps}; "
                                   "fit_stream needs an endless stream (pipeline.train_loader).") from None
        return np.stack([np.asarray(b["image"]) for b in batches]), np.stack([np.asarray(b["label"]) for b in batches])

    def to_global(self, xs, ys, mesh):
        from bnnjax import pipeline

        return pipeline.global_batch((xs, ys), mesh, batch_axis=1)


def _is_grain_iterator(it) -> bool:
    import grain

    return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


# --- checkpoints ----------------------------------------------------------------------------------

_CKPT_DIR = "checkpoints"
_OLD_CKPT = "checkpoint.msgpack"  # bnnjax 0.1's per-epoch fit checkpoint


def _manager(workdir, keep: int | None):
    import orbax.checkpoint as ocp  # slow import: only when checkpoints are written

    # synchronous saves: the next chunk donates the state's buffers, so nothing may still read them
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(workdir).absolute() / _CKPT_DIR, options=options,
                                 item_names=("state", "data", "meta"))


def _tree(state: TrainState):
    """The state as orbax saves it: nested dicts of arrays (an NNX ``State`` as its pure dict)."""
    is_state = lambda v: isinstance(v, nnx.State)
    return jax.tree.map(lambda v: nnx.to_pure_dict(v) if is_state(v) else v, serialization.to_state_dict(state),
                        is_leaf=is_state)


def _untree(template: TrainState, tree) -> TrainState:
    def merge(t, r):
        if isinstance(t, nnx.State):
            out = jax.tree.map(lambda v: v, t)  # a copy of the template's structure and metadata
            nnx.replace_by_pure_dict(out, r)
            return out
        if isinstance(t, dict):
            return {k: merge(v, r[k]) for k, v in t.items()}
        return r

    return serialization.from_state_dict(template, merge(serialization.to_state_dict(template), tree))


def _meta(state: TrainState, source, row: dict) -> dict:
    """What a checkpoint says of itself: the format, the kind of model and source, and the log row in
    progress (its totals and seconds so far), so a resumed run's next row is the uninterrupted run's."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "api": state.api,
            "model": state.model_name, "source": source.kind, "row": row}


def _check_meta(meta: dict, state: TrainState, source_kind: str, path) -> None:
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a bnnjax training checkpoint; delete it or use another workdir.")
    if int(meta.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {meta['version']} is newer than this bnnjax's "
                         f"({CHECKPOINT_VERSION}); upgrade bnnjax.")
    if meta.get("source") != source_kind:
        names = {"arrays": "fit (in-memory arrays)", "stream": "fit_stream (an input stream)"}
        raise ValueError(f"{path}: this checkpoint is of a {names.get(meta.get('source'))} run; this run is "
                         f"{names[source_kind]}, whose input position it does not hold. Resume it with the same "
                         "function, or use another workdir.")
    if meta.get("api") != state.api:
        kinds = {"linen": "a Flax linen", "nnx": "a Flax NNX"}
        raise ValueError(f"{path}: this checkpoint is of {kinds.get(meta.get('api'), meta.get('api'))} model "
                         f"({meta.get('model') or 'unnamed'}), and the model being trained is "
                         f"{kinds[state.api]} model ({state.model_name}): their variables are laid out "
                         "differently. Resume it with the same kind of model, or use another workdir.")


def _read_meta(manager, step: int) -> dict:
    import orbax.checkpoint as ocp

    path = Path(manager.directory) / str(step)
    if not (path / "meta").exists() and (path / "state").exists():
        # bnnjax 0.1's fit_stream checkpoints: a linen model, a stream, no row in progress
        return {"format": CHECKPOINT_FORMAT, "version": 0, "api": "linen", "source": "stream", "row": _row_start(step)}
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e)[:300]}); it is corrupt or "
                         "not a bnnjax checkpoint — delete it (or the workdir) or use another workdir.") from e


def _restore(manager, step: int, state: TrainState, source_kind: str, mesh: Mesh, data_iterator=None):
    """``(state, meta)`` of checkpoint ``step``, the state placed replicated on ``mesh`` (and
    ``data_iterator`` set to the saved position)."""
    import orbax.checkpoint as ocp

    path = Path(manager.directory) / str(step)
    meta = _read_meta(manager, step)
    _check_meta(meta, state, source_kind, path)
    state = _replicated(_int32_step(state), mesh)
    target = _tree(state)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
        import grain

        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        return _untree(state, restored["state"]), meta
    except Exception as e:
        raise ValueError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {str(e)[:500]}); it is corrupt, "
                         "from a different model or optimizer, or from an input pipeline built with other "
                         "arguments — delete it (or the workdir) or use another workdir.") from e


def restore_checkpoint(workdir: str | os.PathLike, state: TrainState, train_iter=None, *, step: int | None = None,
                       mesh: Mesh | None = None) -> tuple[TrainState, int] | None:
    """Restore a ``fit`` / ``fit_stream`` checkpoint of ``workdir`` into the structure of ``state``.

    Args:
      workdir: the run's workdir (holding ``checkpoints/``).
      state: a template state of the same model and optimizer (e.g. from :func:`create_train_state`).
      train_iter: for a ``fit_stream`` run, a grain iterator built like the run's: it is set to the
        saved position.
      step: which checkpoint (default: the latest).
      mesh: where the restored state is placed, replicated (default: all devices).

    Returns:
      ``(state, step)``, or None when ``workdir`` has no checkpoint.

    Raises:
      ValueError: the checkpoint cannot be restored into ``state``: corrupt, another model or optimizer,
        a linen checkpoint for an NNX model or the reverse (the message names it and what to do).
    """
    if not (Path(workdir) / _CKPT_DIR).is_dir():
        return None
    manager = _manager(workdir, None)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        kind = _read_meta(manager, step).get("source")
        state, _ = _restore(manager, step, state, kind, mesh or data_mesh(), train_iter)
        return state, int(step)
    finally:
        manager.close()


def _convert_old_checkpoint(workdir: Path, state: TrainState, source: _Arrays, manager) -> None:
    """Rewrite bnnjax 0.1's ``checkpoint.msgpack`` (``{"epoch", "state"}``) as the checkpoint of the
    first step of the next epoch."""
    import orbax.checkpoint as ocp

    path = workdir / _OLD_CKPT
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
        # checkpoints written before TrainState had extra_variables: the model's own (usually {}) apply
        raw["state"].setdefault("extra_variables", serialization.to_state_dict(state.extra_variables))
        host = jax.device_get(state)
        restored = serialization.from_state_dict(host, raw["state"])
        epoch = int(raw["epoch"])
    except Exception as e:
        raise ValueError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {e}); it is corrupt or "
                         "from a different model — delete it or use another workdir.") from e
    step = epoch * source.per_epoch
    restored = restored.replace(step=jnp.asarray(step, jnp.int32))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_tree(restored)),
                                               meta=ocp.args.JsonSave(_meta(state, source, _row_start(step)))),
                 force=True)
    manager.wait_until_finished()


def _row_start(step: int) -> dict:
    return {"step": step, "totals": {"loss": 0.0, "correct": 0, "count": 0}, "seconds": 0.0}


def _read_log(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is redone
        if row.get("step", 0) <= upto_step:
            rows.append(row)
    return rows


def _check_positive(**values):
    for name, value in values.items():
        if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


# --- the engine ----------------------------------------------------------------------------------

def _multiples(start: int, end: int, *every: int | None) -> set[int]:
    out = set()
    for n in every:
        if n:
            out.update(range((start // n + 1) * n, end, n))
    return out


@dataclasses.dataclass
class _Plan:
    """When a run writes log rows, evaluates and checkpoints (in optimizer steps), and what a row says."""

    steps: int
    row_every: tuple[int | None, ...]  # a row at every multiple of each (and at the last step)
    eval_every: int | None
    checkpoint_every: tuple[int | None, ...]
    stop_after: int | None
    row: Callable[[int, dict, float], dict]  # (step, totals, seconds) -> the row's own fields
    evaluate: Callable[[TrainState], dict] | None

    def marks(self, start: int) -> list[int]:
        marks = {self.steps} | _multiples(start, self.steps, *self.row_every, *self.checkpoint_every)
        if self.stop_after is not None and start < self.stop_after < self.steps:
            marks.add(self.stop_after)
        return sorted(m for m in marks if m > start)

    def _at(self, step: int, every) -> bool:
        return step == self.steps or any(n and step % n == 0 for n in every)

    def row_at(self, step: int) -> bool:
        return self._at(step, self.row_every)

    def eval_at(self, step: int) -> bool:
        return self.evaluate is not None and self._at(step, (self.eval_every,))

    def checkpoint_at(self, step: int) -> bool:
        return self._at(step, self.checkpoint_every)


def _run(state: TrainState, source, plan: _Plan, *, loss, preprocess, steps_per_call: int, workdir, resume: bool,
         keep_checkpoints: int | None, progress: bool, mesh: Mesh | None, log_fn, desc: str):
    from tqdm.auto import tqdm

    mesh = mesh or data_mesh()
    lead = jax.process_index() == 0  # the log file, the bar and log_fn live on process 0
    run_chunk, _ = _compiled(loss, preprocess)
    state = _replicated(_int32_step(state), mesh)
    history, start, manager, log_path, row_state = [], 0, None, None, _row_start(0)
    grain_iterator = source.iterator if isinstance(source, _Stream) and workdir is not None else None
    if workdir is not None:
        workdir = Path(workdir)
        if grain_iterator is not None and not _is_grain_iterator(grain_iterator):
            raise TypeError(f"fit_stream checkpoints the input iterator's position, which needs a grain iterator "
                            f"(pipeline.train_loader); got {type(grain_iterator).__name__}. Pass such an iterator, "
                            "or workdir=None.")
        log_path = workdir / "log.jsonl"
        manager = _manager(workdir, keep_checkpoints)
        old = workdir / _OLD_CKPT
        if resume and old.exists() and manager.latest_step() is None:
            if not isinstance(source, _Arrays):
                raise ValueError(f"{old} is an in-memory fit checkpoint (per epoch, without an input pipeline "
                                 "position) of an earlier bnnjax; fit_stream cannot resume from it. Delete it, or "
                                 "give fit_stream another workdir.")
            _convert_old_checkpoint(workdir, state, source, manager)
        latest = manager.latest_step() if resume else None
        if latest is not None:
            state, meta = _restore(manager, latest, state, source.kind, mesh, grain_iterator)
            start, row_state = int(latest), meta["row"]
            history = _read_log(log_path, start)
        if lead:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    if start > plan.steps:
        raise ValueError(f"the checkpoint in {workdir} is at step {start}, past this run's {plan.steps} steps; "
                         "ask for more epochs or steps, or use another workdir.")

    bar = tqdm(total=plan.steps, initial=start, desc=desc, disable=not (progress and lead), leave=False)
    step, tot, seconds = start, dict(row_state["totals"]), float(row_state["seconds"])
    params_before = jax.tree.map(jnp.copy, state.params)  # the chunk call donates state.params

    def account(m):
        for key in tot:
            tot[key] += float(m[key]) if key == "loss" else int(m[key])

    try:
        for mark in plan.marks(start):
            pending, t0 = None, time.perf_counter()  # the metrics of the chunk in flight are read after the next
            while step < mark:
                k = min(steps_per_call, mark - step, source.run(step))
                xs, ys = source.to_global(*source.chunk(step, k), mesh)
                state, m = run_chunk(state, xs, ys)
                if pending is not None:
                    account(pending)  # waits for the previous chunk: at most two in flight, with their batches
                pending = m
                step += k
                bar.update(k)
            account(pending)
            jax.block_until_ready(state)
            seconds += time.perf_counter() - t0
            bar.set_postfix(loss=f"{tot['loss'] / tot['count']:.4f}", acc=f"{tot['correct'] / tot['count']:.4f}")
            if plan.row_at(step):
                row = {**plan.row(step, tot, seconds), "flip_ratio": float(optim.flip_ratio(params_before, state.params)),
                       "learning_rate": current_learning_rate(state), "step": step}
                if plan.eval_at(step):
                    row.update({f"test_{k}": v for k, v in plan.evaluate(state).items()})
                history.append(row)
                if log_path is not None and lead:
                    with open(log_path, "a") as f:  # before the checkpoint: a later row is dropped on resume
                        f.write(json.dumps(row) + "\n")
                if log_fn is not None and lead:
                    log_fn(row)
                tot, seconds = {"loss": 0.0, "correct": 0, "count": 0}, 0.0
                params_before = jax.tree.map(jnp.copy, state.params)
            if manager is not None and plan.checkpoint_at(step):
                _save(manager, step, state, source, {"step": step, "totals": tot, "seconds": seconds}, grain_iterator)
            if plan.stop_after is not None and step >= plan.stop_after:
                break
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0][:300]
        where = f" in {workdir}" if workdir is not None else " (no workdir: it starts over)"
        raise PeerLostError(f"process {jax.process_index()} of this {jax.process_count()}-process run stopped at step "
                            f"{step}: a collective with the other processes failed ({first}); another process has "
                            f"most likely died. Restart every process with the same command: the run resumes from "
                            f"its last checkpoint{where}.") from e
    finally:
        bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return state, history


def _save(manager, step, state, source, row_state, grain_iterator):
    import orbax.checkpoint as ocp

    items = {"state": ocp.args.StandardSave(_tree(state)), "meta": ocp.args.JsonSave(_meta(state, source, row_state))}
    if grain_iterator is not None:
        import grain

        items["data"] = grain.checkpoint.CheckpointSave(grain_iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def _finish(model, state: TrainState, history):
    return (state, history) if model is None else (trained_model(state, model), history)


def fit(state, train_data, test_data=None, *, epochs: int, batch_size: int, seed: int = 0, loss="cross_entropy",
        workdir: str | os.PathLike | None = None, resume: bool = True, eval_batch_size: int = 1000,
        steps_per_call: int = 50, checkpoint_every: int | None = None, keep_checkpoints: int | None = 2,
        progress: bool = True, mesh: Mesh | None = None, log_fn: Callable[[dict], Any] | None = None,
        stop_after_epoch: int | None = None, stop_after_step: int | None = None, tx=None):
    """Train for ``epochs`` epochs over in-memory arrays with per-epoch evaluation, logs and checkpoints.

    Epoch ``e`` visits ``epoch_permutation(n, seed, e)`` in batches of ``batch_size`` (the last partial
    batch trained on too). Each epoch appends a JSON line to ``workdir/log.jsonl`` (``epoch``, ``step``,
    ``train_loss``, ``train_accuracy``, ``epoch_seconds``, ``images_per_second``, ``flip_ratio``,
    ``learning_rate``, and ``test_loss`` / ``test_accuracy`` with ``test_data``) and writes a checkpoint,
    also every ``checkpoint_every`` steps within an epoch if given. Re-running with the same ``workdir``
    resumes at the latest checkpoint; an earlier bnnjax's ``checkpoint.msgpack`` is converted.

    Args:
      state: from :func:`create_train_state`, or an NNX model (then pass ``tx``: the model is trained in
        place and returned).
      train_data: ``(x, y)`` numpy arrays (preprocessed float inputs, int labels); in a multi-process
        run every process passes the same arrays.
      test_data: ``(x, y)`` evaluated after each epoch, or None.
      epochs: total number of epochs (a resumed run continues up to this number).
      batch_size: the global batch size (over all devices and processes).
      seed: shuffling seed.
      loss: ``"cross_entropy"``, ``"squared_hinge"`` or ``f(logits, labels)``.
      workdir: where ``log.jsonl`` and ``checkpoints/`` go; None keeps nothing on disk.
      resume: continue from ``workdir``'s latest checkpoint when there is one.
      eval_batch_size: evaluation batch size.
      steps_per_call: optimizer steps fused into one compiled call (``lax.scan``).
      checkpoint_every: also checkpoint every this many steps within an epoch.
      keep_checkpoints: how many checkpoints to keep (None: all).
      progress: show a tqdm progress bar (process 0).
      mesh: device mesh for data parallelism (default: all devices of all processes).
      log_fn: called with each epoch's log row (process 0).
      stop_after_epoch, stop_after_step: return after this epoch or step, what is due there done (as if
        the run were killed right after: tests of resuming).
      tx: the optimizer, when ``state`` is an NNX model.

    Returns:
      ``(state, history)`` — ``(model, history)`` for an NNX model — with the log rows of this run and of
      the runs it resumed.

    Raises:
      ValueError: mismatched arrays, or a checkpoint that does not fit (corrupt, another model or
        optimizer, a linen checkpoint for an NNX model or the reverse, a ``fit_stream`` checkpoint).
    """
    state, model = _as_state(state, tx, seed)
    _check_positive(epochs=epochs, steps_per_call=steps_per_call, checkpoint_every=checkpoint_every)
    source = _Arrays(*train_data, batch_size, seed)
    per_epoch = source.per_epoch
    eval_step = _compiled(loss)[1]

    def row(step, tot, seconds):
        return {"epoch": step // per_epoch, "train_loss": tot["loss"] / tot["count"],
                "train_accuracy": tot["correct"] / tot["count"], "epoch_seconds": seconds,
                "images_per_second": tot["count"] / seconds}

    ev = None if test_data is None else (
        lambda st: evaluate(st, *test_data, batch_size=eval_batch_size, mesh=mesh, _eval_step=eval_step))
    stop = stop_after_epoch * per_epoch if stop_after_epoch is not None else stop_after_step
    plan = _Plan(epochs * per_epoch, (per_epoch,), per_epoch, (per_epoch, checkpoint_every), stop, row, ev)
    return _finish(model, *_run(state, source, plan, loss=loss, preprocess=None, steps_per_call=steps_per_call,
                                      workdir=workdir, resume=resume, keep_checkpoints=keep_checkpoints,
                                      progress=progress, mesh=mesh, log_fn=log_fn, desc=f"{epochs} epochs"))


def fit_stream(state, train_iter, *, steps: int, loss="cross_entropy", preprocess: Callable | None = None,
               eval_data=None, eval_every: int | None = None, checkpoint_every: int | None = None,
               log_every: int | None = 100, workdir: str | os.PathLike | None = None, resume: bool = True,
               keep_checkpoints: int | None = 3, steps_per_call: int = 1, progress: bool = True,
               mesh: Mesh | None = None, log_fn: Callable[[dict], Any] | None = None,
               stop_after_step: int | None = None, tx=None):
    """Train for ``steps`` optimizer steps from a stream of batches, with evaluation, logs and checkpoints.

    Each step takes the next batch ``{"image", "label"}`` of this process from ``train_iter``; the
    global batch is assembled over ``mesh`` with ``pipeline.global_batch`` (every process runs this
    same call with its own iterator). The engine is :func:`fit`'s.

    A JSON line goes to ``workdir/log.jsonl`` at every multiple of ``log_every``, ``eval_every`` and
    ``checkpoint_every`` and at the last step: ``step``, ``train_loss`` / ``train_accuracy`` (over the
    steps since the previous row), ``seconds``, ``images_per_second`` (global), ``flip_ratio``,
    ``learning_rate``, ``skipped_images`` (the iterator's ``skipped``, if it has one) and, at evaluation
    steps, ``test_loss`` / ``test_accuracy``. A checkpoint (train state + ``train_iter``'s state) is
    written every ``checkpoint_every`` steps and at the last step; the newest ``keep_checkpoints``
    are kept. Re-running with the same ``workdir`` and a fresh ``train_iter`` built with the same
    arguments resumes at the latest checkpoint: the iterator continues at the exact next sample, and on
    CPU the run ends bit-identical to an uninterrupted one.

    Args:
      state: from :func:`create_train_state`, or an NNX model (then pass ``tx``).
      train_iter: an endless grain iterator of this process's batches (``pipeline.train_loader``); any
        iterator of ``{"image", "label"}`` batches works when ``workdir`` is None.
      steps: total optimizer steps (a resumed run continues up to this number).
      loss: ``"cross_entropy"``, ``"squared_hinge"`` or ``f(logits, labels)``.
      preprocess: applied to the images inside the compiled steps (on the device), e.g.
        ``pipeline.normalize`` for uint8 batches; a module-level function, so compiled steps are reused.
      eval_data: an iterable re-iterated at each evaluation (``pipeline.eval_loader``), of batches
        ``{"image", "label"}`` and optionally ``"mask"`` (padding rows not counted).
      eval_every: evaluate every this many steps (and at the last step) when ``eval_data`` is given.
      checkpoint_every: checkpoint every this many steps (None: only at the last step).
      log_every: write a log row every this many steps (rows also at evaluations and checkpoints).
      workdir: ``log.jsonl`` and ``checkpoints/`` go here; None keeps nothing on disk.
      resume: continue from ``workdir``'s latest checkpoint when there is one.
      keep_checkpoints: how many checkpoints to keep (None: all).
      steps_per_call: optimizer steps fused into one compiled call; calls end at row boundaries. Each
        call holds that many batches on the device, so keep it small for large images.
      progress: show a tqdm progress bar (process 0).
      mesh: device mesh with a ``"batch"`` axis (default: all devices of all processes).
      log_fn: called with each log row (process 0).
      stop_after_step: return after this step, what is due there done (as if killed right after).
      tx: the optimizer, when ``state`` is an NNX model.

    Returns:
      ``(state, history)`` — ``(model, history)`` for an NNX model: the log rows, earlier runs' included.

    Raises:
      ValueError: ``workdir`` holds an earlier bnnjax's ``checkpoint.msgpack`` or a ``fit`` checkpoint,
        or a checkpoint that does not fit (names the file and what to do).
      TypeError: ``workdir`` is given but ``train_iter`` is not a grain iterator (no checkpointable state).
      RuntimeError: ``train_iter`` ended before ``steps``.
    """
    state, model = _as_state(state, tx, 0)
    _check_positive(steps=steps, steps_per_call=steps_per_call, eval_every=eval_every,
                    checkpoint_every=checkpoint_every, log_every=log_every)
    source = _Stream(train_iter, steps)
    eval_step = _compiled(loss, preprocess)[1]

    def row(step, tot, seconds):
        out = {"train_loss": tot["loss"] / tot["count"], "train_accuracy": tot["correct"] / tot["count"],
               "seconds": seconds, "images_per_second": tot["count"] / seconds}
        if hasattr(train_iter, "skipped"):
            out["skipped_images"] = int(train_iter.skipped)
        return out

    ev = None if eval_data is None else (lambda st: _evaluate_stream(st, eval_data, eval_step, mesh or data_mesh()))
    every = (log_every, checkpoint_every, eval_every if eval_data is not None else None)
    plan = _Plan(steps, every, eval_every, (checkpoint_every,), stop_after_step, row, ev)
    return _finish(model, *_run(state, source, plan, loss=loss, preprocess=preprocess,
                                      steps_per_call=steps_per_call, workdir=workdir, resume=resume,
                                      keep_checkpoints=keep_checkpoints, progress=progress, mesh=mesh,
                                      log_fn=log_fn, desc="steps"))


def _evaluate_stream(state, eval_data, eval_step, mesh) -> dict:
    from bnnjax import pipeline

    tot = {"loss": 0.0, "correct": 0, "count": 0}
    results = []
    it = iter(eval_data)
    try:
        for batch in it:
            arrays = (batch["image"], batch["label"]) + ((batch["mask"],) if "mask" in batch else ())
            results.append(eval_step(state, *pipeline.global_batch(arrays, mesh)))
    finally:
        if hasattr(it, "close"):
            it.close()  # a pass with worker processes: stop them now rather than at garbage collection
    for m in results:
        for key in tot:
            tot[key] += float(m[key]) if key == "loss" else int(m[key])
    if tot["count"] == 0:
        raise ValueError("eval_data yielded no examples.")
    return {"loss": tot["loss"] / tot["count"], "accuracy": tot["correct"] / tot["count"]}
