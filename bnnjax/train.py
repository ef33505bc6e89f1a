"""Training engine: train state, compiled train/eval steps, ``fit`` with logs, checkpoints and resume.

``fit`` is Keras' ``fit`` for Flax models whose ``__call__`` takes a ``train`` keyword: it shuffles
with a seeded per-epoch order, runs several optimizer steps per compiled call (``lax.scan``), shows a
tqdm bar with loss and accuracy, evaluates, appends one JSON line per epoch to ``workdir/log.jsonl``
and writes a msgpack checkpoint (no pickle). Re-running with the same ``workdir`` resumes after the
last finished epoch and, on CPU, ends with parameters bit-identical to an uninterrupted run.

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
           "make_train_step", "make_eval_step", "evaluate", "fit", "save_checkpoint", "restore_checkpoint",
           "data_mesh", "current_learning_rate"]


class TrainState(train_state.TrainState):
    """Flax's TrainState plus BatchNorm statistics and the PRNG key data (uint32) of dropout and
    stochastic quantizers."""

    batch_stats: Any = None
    rng: jax.Array = None


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
                       params=None, batch_stats=None) -> TrainState:
    """Initialize the model (``model.init(..., train=False)``) and optimizer.

    Args:
      model: a Flax module whose ``__call__(x, train)`` returns logits.
      tx: the optax transform (chain ``bnnjax.weight_clip()`` for latent binary kernels).
      example_input: one batch (or a ``ShapeDtypeStruct``) that fixes the input shape.
      seed: PRNG seed for initialization and the training key.
      params: initial parameters to use instead of the model's initializers (e.g. converted ones).
      batch_stats: initial BatchNorm statistics to use likewise.

    Warns (once): binary kernels with neither ``weight_clip`` nor ``bop`` in ``tx``.
    """
    init_key, train_key = jax.random.split(jax.random.key(seed))
    variables = model.init({"params": init_key, "dropout": init_key, "quantizer": init_key},
                           jnp.zeros(example_input.shape, example_input.dtype), train=False)
    params = variables["params"] if params is None else params
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                              batch_stats=variables.get("batch_stats", {}) if batch_stats is None else batch_stats,
                              rng=jax.random.key_data(train_key))  # raw uint32: serializable
    optim.warn_if_unclipped(state.params, state.opt_state)
    return state


def _forward(state, params, x, train, rng):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if train:
        rngs = {"dropout": rng, "quantizer": jax.random.fold_in(rng, 1)}
        logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
        return logits, upd.get("batch_stats", state.batch_stats)
    return state.apply_fn(variables, x, train=False), state.batch_stats


def make_train_step(loss="cross_entropy"):
    """``step(state, x, y) -> (state, metrics)`` for one batch; metrics are sums over the batch."""
    loss_fn = _loss(loss)

    def step(state: TrainState, x, y):
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


def make_eval_step(loss="cross_entropy"):
    """``eval_step(state, x, y) -> metrics`` (sums) in inference mode (running BatchNorm statistics)."""
    loss_fn = _loss(loss)

    def eval_step(state, x, y):
        logits, _ = _forward(state, state.params, x, False, None)
        return {"loss": loss_fn(logits, y) * x.shape[0], "correct": jnp.sum(jnp.argmax(logits, -1) == y),
                "count": x.shape[0]}

    return eval_step


@functools.lru_cache(maxsize=None)
def _compiled(loss):
    """The jitted chunk and eval steps of one loss, shared by every ``fit`` call so that a second run of
    the same model (a benchmark after its warm-up, a resumed run) does not compile again."""
    return jax.jit(_scan_steps(make_train_step(loss)), donate_argnums=0), jax.jit(make_eval_step(loss))


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
        state = serialization.from_state_dict(template, raw["state"])
        return state, int(raw["epoch"])
    except Exception as e:
        raise ValueError(f"{path}: cannot restore the checkpoint ({type(e).__name__}: {e}); it is corrupt or "
                         "from a different model — delete it or use another workdir.") from e


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is redone
        if row.get("epoch", 0) <= upto_epoch:
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
    state = jax.device_put(state, NamedSharding(mesh, P()))
    run_chunk, eval_step = _compiled(loss)
    history, start = [], 0
    log_path = Path(workdir) / "log.jsonl" if workdir is not None else None
    if workdir is not None and resume:
        restored = restore_checkpoint(workdir, jax.device_get(state))
        if restored is not None:
            state, start = restored
            state = jax.device_put(state, NamedSharding(mesh, P()))
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
