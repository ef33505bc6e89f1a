"""Inference benchmark: float, Flax eval, packed and exported-artifact paths, seed 000 and QuickNet.

Prints one JSON line per (model, path, batch): ``img_s``, ``latency_ms`` (median of repeated calls, the
paths timed round-robin),
``predictions_identical`` (argmax equal to the float path's on the evaluation batch) and ``bytes``
where a file exists. Paths:

- ``float``: ``model.apply`` on the trained variables with the packed training forward off
  (:func:`bnnjax.ops.float_forward`): plain float32 products of ±1 values;
- ``flax_eval``: ``model.apply`` on the trained variables as training runs it (packed forward on CPU);
- ``packed``: ``model.apply`` on ``bnnjax.export.pack``'s variables (``bytes``: the packed variables);
- ``packed_closure``: the same, jitted with the packed variables closed over (XLA sees the weights as
  constants, as in the artifact);
- ``artifact``: the ``save_artifact`` file, deserialized and called (``bytes``: the file);
- ``iree``: the same StableHLO compiled by IREE for this CPU at that batch size (extra ``iree``;
  ``bytes``: the batch-1 module).

seed 000 is trained briefly on Fashion-MNIST (``--train-steps``) and evaluated on the test set;
QuickNet (larq-zoo's architecture, 224x224) uses random weights with randomized BatchNorm statistics
and a random batch.

    python experiments/bench_inference.py [--models seed000,quicknet] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnnjax
from bnnjax import datasets, export, ops, train, zoo


def interleaved_ms(fns: dict, x, repeats: int) -> dict:
    """Median milliseconds per call of each function on ``x``, timed round-robin (one call of each per
    round) so that the machine's speed drifting during the run affects every path alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(x))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}


def seed000(a):
    (xtr, ytr), (xte, _) = [datasets.load_dataset("fashion_mnist", s, a.data_dir) for s in ("train", "test")]
    xtr, xte = datasets.preprocess(xtr), datasets.preprocess(xte)
    model = bnnjax.models.LarqTutorialCNN()
    state = train.create_train_state(model, optax.chain(optax.adam(1e-3), bnnjax.weight_clip()), xtr[:1])
    n = a.train_steps * 64
    state, _ = train.fit(state, (xtr[:n], ytr[:n]), None, epochs=1, batch_size=64, progress=False)
    return model, {"params": state.params, "batch_stats": state.batch_stats}, jnp.asarray(xte), (1, 1000)


def quicknet(a):
    model = zoo.QuickNet()
    x = jnp.asarray(np.random.default_rng(1).uniform(-2, 2, (16, 224, 224, 3)).astype(np.float32))
    variables = jax.jit(model.init)(jax.random.key(0), x[:1])
    rng = np.random.default_rng(2)
    stats = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype), variables["batch_stats"])
    return model, {**variables, "batch_stats": stats}, x, (1, 16)


def run(name, build, a):
    model, variables, xs, batches = build(a)
    packed = export.pack(model, variables, xs[:1])
    float_apply = jax.jit(model.apply)
    with ops.float_forward():
        float_fn = jax.jit(lambda v, x: model.apply(v, x))
        ref = {b: float_fn.lower(variables, xs[:b]).compile() for b in batches}  # traced inside the block
    tmp = tempfile.mkdtemp()
    path = Path(tmp) / f"{name}.stablehlo"
    file_bytes = export.save_artifact(path, model, packed, xs[:2])
    deployed = export.load_artifact(path)
    paths = {
        "float": (lambda b: (lambda x: ref[b](variables, x)), None),
        "flax_eval": (lambda b: (lambda x: float_apply(variables, x)), None),
        "packed": (lambda b: (lambda x: float_apply(packed, x)), export.packed_bytes(packed)),
        "packed_closure": (lambda b: jax.jit(lambda x: model.apply(packed, x)), export.packed_bytes(packed)),
        "artifact": (lambda b: jax.jit(deployed.call), file_bytes),
    }
    if a.iree:
        try:
            vmfbs = {b: export.compile_iree(model, packed, xs[:b]) for b in batches}  # static batch sizes
        except ImportError as e:
            print(json.dumps({"model": name, "path": "iree", "skipped": str(e)}))
        else:
            paths["iree"] = (lambda b: export.load_iree(vmfbs[b]), len(vmfbs[batches[0]]))
    for b in batches:
        evals = [xs[i:i + b] for i in range(0, len(xs) - b + 1, b)][: max(1, 2000 // b)]
        want = np.concatenate([np.asarray(ref[b](variables, x)).argmax(-1) for x in evals])
        fns = {pname: make(b) for pname, (make, _) in paths.items()}
        identical = {pname: bool(np.array_equal(np.concatenate([np.asarray(fn(x)).argmax(-1) for x in evals]), want))
                     for pname, fn in fns.items()}
        ms = interleaved_ms(fns, evals[0], a.repeats if b == 1 else max(3, a.repeats // 5))
        for pname, (_, nbytes) in paths.items():
            row = {"model": name, "path": pname, "batch": b, "img_s": round(1e3 * b / ms[pname], 1),
                   "latency_ms": round(ms[pname], 3), "predictions_identical": identical[pname],
                   "images_compared": int(want.size), "backend": jax.default_backend()}
            if nbytes is not None:
                row["bytes"] = int(nbytes)
            print(json.dumps(row), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="seed000,quicknet")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--iree", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args(argv)
    builders = {"seed000": seed000, "quicknet": quicknet}
    for name in a.models.split(","):
        run(name, builders[name], a)


if __name__ == "__main__":
    main()
