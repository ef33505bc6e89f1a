"""Training engine: train state, compiled train/eval steps, ``fit`` with logs, checkpoints and resume.

``fit`` is Keras' ``fit`` for Flax models whose ``__call__`` takes a ``train`` keyword: it shuffles
with a seeded per-epoch order, runs several optimizer steps per compiled call (``lax.scan``), shows a
tqdm bar with loss and accuracy, evaluates, appends one JSON line per epoch to ``workdir/log.jsonl``
and writes a msgpack checkpoint (no pickle). Re-running with the same ``workdir`` resumes after the
last finished epoch and, on CPU, ends with parameters bit-identical to an uninterrupted run.

``fit_stream`` trains from an input stream (``bnnjax.pipeline.train_loader``) for data that does not
fit in memory: step-based, with the same compiled steps, an optional on-device ``preprocess`` (e.g.
``pipeline.normalize`` of uint8 batches), evaluation and a JSON-lines row every few steps, and orbax
checkpoints (``workdir/checkpoints/<step>/``: the sharded train state plus the input iterator's state,
one JSON file per process) every ``checkpoint_every`` steps. Re-running with the same ``workdir``
resumes at the last checkpoint in the middle of an epoch, continuing the exact sample order; on CPU
it ends bit-identical to an uninterrupted run.

Two checkpoint formats, on purpose: ``fit``'s single ``checkpoint.msgpack`` per workdir (small
in-memory runs, replicated state, one file the experiments and their results already use) and
``fit_stream``'s orbax directories (sharded state written by every host, the iterator state per
process, old steps pruned). Each function rejects the other's workdir with a message saying so.

Data parallelism: the batch axis is sharded over a ``jax.sharding.Mesh`` of all local devices (or the
mesh you pass) and the state is replicated; XLA inserts the gradient and BatchNorm reductions, so one
device and many run the same code. For several hosts, call ``jax.distributed.initialize()`` first on
every host, build ``Mesh(jax.devices(), ("batch",))`` and feed each host's slice of the data.
"""

from __future__ import annotations

import functools
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
from flax import serialization, struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnnjax import optim
from bnnjax.datasets import epoch_permutation

__all__ = ["TrainState", "create_train_state", "softmax_cross_entropy", "squared_hinge", "LOSSES",
           "make_train_step", "make_eval_step", "evaluate", "fit", "fit_stream", "save_checkpoint",
           "restore_checkpoint", "restore_stream_checkpoint", "data_mesh", "current_learning_rate"]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics, the model's other variable collections and the PRNG
    key data (uint32) of dropout and stochastic quantizers.

    ``extra_variables`` holds every collection besides ``params`` and ``batch_stats`` (e.g. the
    ``"constants"`` of fixed blur-pool kernels): passed to the model as they are, never trained or
    updated; ``{}`` for most models."""

    batch_stats: Any = None
    rng: jax.Array = None
    extra_variables: Any = struct.field(default_factory=dict)


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


def create_train_state(model, tx: optax.GradientTransformation, example_input, seed: int = 0,
                       params=None, batch_stats=None, extra_variables=None) -> TrainState:
    """Initialize the model (``model.init(..., train=False)``) and optimizer.

    Args:
      model: a Flax module whose ``__call__(x, train)`` returns logits.
      tx: the optax transform (chain ``bnnjax.weight_clip()`` for latent binary kernels).
      example_input: one batch (or a ``ShapeDtypeStruct``) that fixes the input shape.
      seed: PRNG seed for initialization and the training key.
      params: initial parameters to use instead of the model's initializers (e.g. converted ones).
      batch_stats: initial BatchNorm statistics to use likewise.
      extra_variables: the other collections (e.g. ``{"constants": ...}``) to use likewise.

    Warns (once): binary kernels with neither ``weight_clip`` nor ``bop`` in ``tx``.
    """
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = model.init({"params": init_key, "dropout": init_key, "quantizer": init_key},
                           jnp.zeros(example_input.shape, example_input.dtype), train=False)
    params = variables["params"] if params is None else params
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                              batch_stats=variables.get("batch_stats", {}) if batch_stats is None else batch_stats,
                              rng=jax.random.key_data(train_key),  # raw uint32: serializable
                              extra_variables={k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
                              if extra_variables is None else extra_variables)
    optim.warn_if_unclipped(state.params, state.opt_state)
    return state


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
    return (jax.jit(_scan_steps(make_train_step(loss, preprocess)), donate_argnums=0),
            jax.jit(make_eval_step(loss, preprocess)))


def _int32_step(state):
    # a fresh state's step is a weakly typed Python int, a restored one int32: with one type, a resumed
    # run reuses the compiled steps of the first
    return state.replace(step=jnp.asarray(state.step, jnp.int32))


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"batch"`` over the given (default: all) devices."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("batch",))


def _place(mesh: Mesh, array, batch_axis: int):
    """Shard ``array`` along ``batch_axis`` over the mesh when it divides evenly, else replicate it."""
    n = mesh.devices.size
    spec = [None] * array.ndim
    if n > 1 and array.shape[batch_axis] % n == 0:
        spec[batch_axis] = "batch"
    return jax.device_put(array, NamedSharding(mesh, P(*spec)))


def evaluate(state, x, y, batch_size: int = 1000, loss="cross_entropy", mesh: Mesh | None = None,
             _eval_step=None) -> dict:
    """Loss and accuracy over a whole split; the last partial batch is included."""
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


# --- checkpoints ----------------------------------------------------------------------------------

_CKPT = "checkpoint.msgpack"


def save_checkpoint(workdir: str | os.PathLike, state: TrainState, epoch: int) -> Path:
    """Write ``{state, epoch}`` to ``workdir/checkpoint.msgpack`` atomically (msgpack, no pickle)."""
    path = Path(workdir) / _CKPT
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = serialization.msgpack_serialize({"epoch": epoch, "state": serialization.to_state_dict(jax.device_get(state))})
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous checkpoint intact
    return path


def restore_checkpoint(workdir: str | os.PathLike, template: TrainState) -> tuple[TrainState, int] | None:
    """Restore ``(state, epoch)`` from ``workdir`` into the structure of ``template``; None if absent.

    Raises:
      ValueError: the file exists but is corrupt or does not fit the model (names the file).
    """
    path = Path(workdir) / _CKPT
    if not path.exists():
        return None
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
        # checkpoints written before TrainState had extra_variables: the model's own (usually {}) apply
        raw["state"].setdefault("extra_variables", serialization.to_state_dict(template.extra_variables))
        state = serialization.from_state_dict(template, raw["state"])
        return state, int(raw["epoch"])
    except Exception as e:
        raise ValueError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {e}); it is corrupt or "
                         "from a different model — delete it or use another workdir.") from e


def _read_log(path: Path, upto_epoch: int, key: str = "epoch") -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is redone
        if row.get(key, 0) <= upto_epoch:
            rows.append(row)
    return rows


# --- fit ------------------------------------------------------------------------------------------

def fit(state: TrainState, train_data, test_data=None, *, epochs: int, batch_size: int, seed: int = 0,
        loss="cross_entropy", workdir: str | os.PathLike | None = None, resume: bool = True,
        eval_batch_size: int = 1000, steps_per_call: int = 50, progress: bool = True,
        mesh: Mesh | None = None, log_fn: Callable[[dict], Any] | None = None,
        stop_after_epoch: int | None = None) -> tuple[TrainState, list[dict]]:
    """Train for ``epochs`` epochs with per-epoch evaluation, logging and checkpoints.

    Args:
      state: from :func:`create_train_state`.
      train_data: ``(x, y)`` numpy arrays (preprocessed float inputs, int labels).
      test_data: ``(x, y)`` evaluated after each epoch, or None.
      epochs: total number of epochs (a resumed run continues up to this number).
      batch_size: training batch size; the last partial batch of an epoch is trained on too.
      seed: shuffling seed; the order of epoch ``e`` is ``epoch_permutation(n, seed, e)``.
      loss: ``"cross_entropy"``, ``"squared_hinge"`` or ``f(logits, labels)``.
      workdir: where ``log.jsonl`` and ``checkpoint.msgpack`` go; None keeps nothing on disk.
      resume: continue from ``workdir``'s checkpoint when there is one.
      eval_batch_size: evaluation batch size.
      steps_per_call: optimizer steps fused into one compiled call (``lax.scan``).
      progress: show a tqdm progress bar.
      mesh: device mesh for data parallelism (default: all local devices).
      log_fn: called with each epoch's log row.
      stop_after_epoch: return after this epoch (simulates a killed run in tests).

    Returns:
      ``(state, history)``: the final state and the list of epoch log rows.
    """
    from tqdm.auto import tqdm

    x, y = train_data
    if len(x) != len(y):
        raise ValueError(f"train_data has {len(x)} inputs but {len(y)} labels.")
    mesh = mesh or data_mesh()
    if workdir is not None and resume and (Path(workdir) / _STREAM_DIR).is_dir():
        raise ValueError(f"{Path(workdir) / _STREAM_DIR} holds fit_stream's (orbax) checkpoints; fit keeps its own in "
                         f"{_CKPT}. Resume that run with fit_stream, or give fit another workdir.")
    state = jax.device_put(_int32_step(state), NamedSharding(mesh, P()))
    run_chunk, eval_step = _compiled(loss)
    history, start = [], 0
    log_path = Path(workdir) / "log.jsonl" if workdir is not None else None
    if workdir is not None and resume:
        restored = restore_checkpoint(workdir, jax.device_get(state))
        if restored is not None:
            state, start = restored
            state = jax.device_put(_int32_step(state), NamedSharding(mesh, P()))
            history = _read_log(log_path, start)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    n = len(x)
    full = n // batch_size
    for epoch in range(start, epochs):
        order = epoch_permutation(n, seed, epoch)
        params_before = jax.tree.map(jnp.copy, state.params)  # the chunk call donates state.params
        tot = {"loss": 0.0, "correct": 0, "count": 0}
        bar = tqdm(total=math.ceil(n / batch_size), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        t0 = time.perf_counter()
        chunks = [(i, min(i + steps_per_call, full)) for i in range(0, full, steps_per_call)]
        if n % batch_size:
            chunks.append((full, full + 1))
        pending = None  # metrics of the chunk in flight: read after the next one is dispatched

        def account(m, k):
            for key in tot:
                tot[key] += float(m[key]) if key == "loss" else int(m[key])
            bar.update(k)
            bar.set_postfix(loss=f"{tot['loss'] / tot['count']:.4f}", acc=f"{tot['correct'] / tot['count']:.4f}")

        for a, b in chunks:
            idx = order[a * batch_size: b * batch_size]
            k = b - a
            xs = x[idx].reshape((k, -1) + x.shape[1:])
            ys = y[idx].reshape(k, -1)
            state, m = run_chunk(state, _place(mesh, xs, 1), _place(mesh, ys, 1))
            if pending is not None:
                account(*pending)
            pending = (m, k)
        account(*pending)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0
        bar.close()
        row = {"epoch": epoch + 1, "train_loss": tot["loss"] / tot["count"],
               "train_accuracy": tot["correct"] / tot["count"], "epoch_seconds": seconds,
               "images_per_second": n / seconds, "flip_ratio": float(optim.flip_ratio(params_before, state.params)),
               "learning_rate": current_learning_rate(state), "step": int(state.step)}
        if test_data is not None:
            ev = evaluate(state, *test_data, batch_size=eval_batch_size, mesh=mesh, _eval_step=eval_step)
            row.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
        history.append(row)
        if workdir is not None:
            # log first: a kill between the two leaves a row past the checkpoint, dropped on resume
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            save_checkpoint(workdir, state, epoch + 1)
        if log_fn is not None:
            log_fn(row)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return state, history


# --- fit_stream -----------------------------------------------------------------------------------

_STREAM_DIR = "checkpoints"


def _stream_manager(workdir, keep: int | None):
    import orbax.checkpoint as ocp  # loaded for the streaming path only (slow import)

    # synchronous saves: the next chunk donates the state's buffers, so nothing may still read them
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(workdir).absolute() / _STREAM_DIR, options=options,
                                 item_names=("state", "data"))


def _is_grain_iterator(it) -> bool:
    import grain

    return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


def _restore_stream(manager, step: int, state: TrainState, train_iter, mesh: Mesh) -> TrainState:
    import grain
    import orbax.checkpoint as ocp

    state = jax.device_put(_int32_step(state), NamedSharding(mesh, P()))
    target = serialization.to_state_dict(state)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if train_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(train_iter)
    path = Path(manager.directory) / str(step)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        return serialization.from_state_dict(state, restored["state"])
    except Exception as e:
        raise ValueError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {str(e)[:500]}); it is corrupt, "
                         "from a different model or optimizer, or from an input pipeline built with other "
                         "arguments — delete it (or the workdir) or use another workdir.") from e


def restore_stream_checkpoint(workdir: str | os.PathLike, state: TrainState, train_iter=None, *,
                              step: int | None = None, mesh: Mesh | None = None) -> tuple[TrainState, int] | None:
    """Restore a :func:`fit_stream` checkpoint of ``workdir`` into the structure of ``state``.

    Args:
      workdir: the ``fit_stream`` workdir (holding ``checkpoints/``).
      state: a template state of the same model and optimizer (e.g. from :func:`create_train_state`).
      train_iter: when given, a grain iterator built like the run's; it is set to the saved position.
      step: which checkpoint (default: the latest).
      mesh: where the restored state is placed, replicated (default: all devices).

    Returns:
      ``(state, step)``, or None when ``workdir`` has no checkpoint.

    Raises:
      ValueError: the checkpoint cannot be restored into ``state`` (names it and what to do).
    """
    if not (Path(workdir) / _STREAM_DIR).is_dir():
        return None
    manager = _stream_manager(workdir, None)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        return _restore_stream(manager, step, state, train_iter, mesh or data_mesh()), int(step)
    finally:
        manager.close()


def _boundaries(start: int, steps: int, every: list[int | None], extra: list[int | None]) -> list[int]:
    marks = {steps}
    for n in every:
        if n:
            marks.update(range((start // n + 1) * n, steps, n))
    marks.update(e for e in extra if e is not None and start < e < steps)
    return sorted(m for m in marks if m > start)


def fit_stream(state: TrainState, train_iter, *, steps: int, loss="cross_entropy",
               preprocess: Callable | None = None, eval_data=None, eval_every: int | None = None,
               checkpoint_every: int | None = None, log_every: int | None = 100,
               workdir: str | os.PathLike | None = None, resume: bool = True, keep_checkpoints: int | None = 3,
               steps_per_call: int = 1, progress: bool = True, mesh: Mesh | None = None,
               log_fn: Callable[[dict], Any] | None = None,
               stop_after_step: int | None = None) -> tuple[TrainState, list[dict]]:
    """Train for ``steps`` optimizer steps from a stream of batches, with evaluation, logs and checkpoints.

    Each step takes the next batch ``{"image", "label"}`` of this host from ``train_iter``; the global
    batch is assembled over ``mesh`` with ``pipeline.global_batch`` (every host runs this same call
    with its own iterator). The compiled steps are ``fit``'s (``make_train_step`` under ``lax.scan``).

    A JSON line goes to ``workdir/log.jsonl`` at every multiple of ``log_every``, ``eval_every`` and
    ``checkpoint_every`` and at the last step: ``step``, ``train_loss`` / ``train_accuracy`` (over the
    steps since the previous row), ``seconds``, ``images_per_second`` (global), ``flip_ratio``,
    ``learning_rate``, ``skipped_images`` (the iterator's ``skipped``, if it has one) and, at evaluation
    steps, ``test_loss`` / ``test_accuracy``. A checkpoint (train state + ``train_iter``'s state) is
    written every ``checkpoint_every`` steps and at the last step; the newest ``keep_checkpoints``
    are kept. Re-running with the same ``workdir`` and a fresh ``train_iter`` built with the same
    arguments resumes at the latest checkpoint: the iterator continues at the exact next sample, and on
    CPU the run ends bit-identical to an uninterrupted one (rows after the checkpoint are redone).

    Args:
      state: from :func:`create_train_state`.
      train_iter: an endless grain iterator of host batches (``pipeline.train_loader``); any iterator
        of ``{"image", "label"}`` batches works when ``workdir`` is None.
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
      progress: show a tqdm progress bar.
      mesh: device mesh with a ``"batch"`` axis (default: all devices).
      log_fn: called with each log row.
      stop_after_step: return after this step without a checkpoint there (simulates a killed run).

    Returns:
      ``(state, history)``: the final state and the log rows (those of earlier runs included).

    Raises:
      ValueError: ``workdir`` holds ``fit``'s ``checkpoint.msgpack`` and no stream checkpoint, or a
        checkpoint that does not fit (names the file and what to do).
      TypeError: ``workdir`` is given but ``train_iter`` is not a grain iterator (no checkpointable state).
      RuntimeError: ``train_iter`` ended before ``steps``.
    """
    from tqdm.auto import tqdm

    from bnnjax import pipeline  # grain is loaded for the streaming path only

    for name, value in (("steps", steps), ("steps_per_call", steps_per_call), ("eval_every", eval_every),
                        ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    mesh = mesh or data_mesh()
    run_chunk, eval_step = _compiled(loss, preprocess)
    state = jax.device_put(_int32_step(state), NamedSharding(mesh, P()))
    history, start, manager, log_path = [], 0, None, None
    if workdir is not None:
        if not _is_grain_iterator(train_iter):
            raise TypeError(f"fit_stream checkpoints the input iterator's position, which needs a grain iterator "
                            f"(pipeline.train_loader); got {type(train_iter).__name__}. Pass such an iterator, "
                            "or workdir=None.")
        old = Path(workdir) / _CKPT
        if resume and old.exists() and not (Path(workdir) / _STREAM_DIR).is_dir():
            raise ValueError(f"{old} is an in-memory fit checkpoint (per epoch, without an input pipeline position); "
                             "fit_stream cannot resume from it. Load it with train.restore_checkpoint(workdir, "
                             "state), pass that state to fit_stream with a new workdir, or delete the file.")
        log_path = Path(workdir) / "log.jsonl"
        manager = _stream_manager(workdir, keep_checkpoints)
        latest = manager.latest_step() if resume else None
        if latest is not None:
            state = _restore_stream(manager, latest, state, train_iter, mesh)
            start = int(latest)
            history = _read_log(log_path, start, key="step")
        if jax.process_index() == 0:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    rows = _boundaries(start, steps, [log_every, checkpoint_every, eval_every if eval_data is not None else None],
                       [stop_after_step])
    bar = tqdm(total=steps, initial=start, desc="steps", disable=not progress, leave=False)
    step = start
    try:
        for row_end in rows:
            params_before = jax.tree.map(jnp.copy, state.params)  # the chunk call donates state.params
            tot = {"loss": 0.0, "correct": 0, "count": 0}
            pending = None  # metrics of the chunk in flight: read after the next one is dispatched

            def account(m):
                for key in tot:
                    tot[key] += float(m[key]) if key == "loss" else int(m[key])

            t0 = time.perf_counter()
            while step < row_end:
                k = min(steps_per_call, row_end - step)
                batches = []
                for _ in range(k):
                    try:
                        batches.append(next(train_iter))
                    except StopIteration:
                        raise RuntimeError(f"train_iter ended after {step + len(batches)} steps of {steps}; "
                                           "fit_stream needs an endless stream (pipeline.train_loader).") from None
                xs = np.stack([np.asarray(b["image"]) for b in batches])
                ys = np.stack([np.asarray(b["label"]) for b in batches])
                xs, ys = pipeline.global_batch((xs, ys), mesh, batch_axis=1)
                state, m = run_chunk(state, xs, ys)
                if pending is not None:
                    account(pending)  # waits for the previous chunk: at most two in flight, with their batches
                pending = m
                step += k
                bar.update(k)
            account(pending)
            jax.block_until_ready(state)
            seconds = time.perf_counter() - t0
            row = {"step": step, "train_loss": tot["loss"] / tot["count"],
                   "train_accuracy": tot["correct"] / tot["count"], "seconds": seconds,
                   "images_per_second": tot["count"] / seconds,
                   "flip_ratio": float(optim.flip_ratio(params_before, state.params)),
                   "learning_rate": current_learning_rate(state)}
            if hasattr(train_iter, "skipped"):
                row["skipped_images"] = int(train_iter.skipped)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['train_accuracy']:.4f}")
            if eval_data is not None and (step == steps or (eval_every and step % eval_every == 0)):
                ev = _evaluate_stream(state, eval_data, eval_step, mesh, pipeline)
                row.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
            history.append(row)
            if log_path is not None and jax.process_index() == 0:
                with open(log_path, "a") as f:  # before the checkpoint: a later row is dropped on resume
                    f.write(json.dumps(row) + "\n")
            if manager is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
                import grain
                import orbax.checkpoint as ocp

                manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(serialization.to_state_dict(state)),
                    data=grain.checkpoint.CheckpointSave(train_iter)), force=True)
            if log_fn is not None:
                log_fn(row)
            if stop_after_step is not None and step >= stop_after_step:
                break
    finally:
        bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return state, history


def _evaluate_stream(state, eval_data, eval_step, mesh, pipeline) -> dict:
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
