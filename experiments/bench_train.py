"""Training-speed and memory benchmark: seed 000 on Fashion-MNIST, or QuickNet at 224x224.

Prints one JSON line per measured configuration.

* ``--model seed000`` (Larq's tutorial setup: batch 64, Adam): ``seconds_per_epoch`` (mean of the epochs'
  training time, compilation excluded by a warm-up epoch on a copy of the state), ``images_per_second``,
  ``test_accuracy``. ``--api both`` trains the linen and the NNX model in alternating epochs of one
  process and adds a line with their ratio.
* ``--model quicknet`` (larq-zoo's QuickNet, 1000 classes, Adam + weight clipping, one random batch, as
  ``quicknet_train_peer.py`` measures Larq): ``step_s`` (median of ``--steps`` steps after a warm-up
  step), ``images_per_second``, ``peak_rss_MiB`` (the process's, compilation included: run one
  configuration per process), ``temp_MiB`` (XLA's compiled temporary memory of the step).
  ``--residuals float`` runs ``ops.float_forward()``: float products and float residuals, what Larq keeps.

    python experiments/bench_train.py --epochs 2 [--api both] [--data-dir DIR] [--matmul-precision float32]
    python experiments/bench_train.py --model quicknet --batch-size 32 --steps 3 [--api nnx] [--residuals float]
    python experiments/bench_train.py --model quicknet --compile-only --batch-size 256   # temp_MiB only

``--out results/FILE.jsonl`` appends the lines with their command, versions, hardware and date.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnnjax
from bnnjax import datasets, ops, packing, train, zoo


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _seed000_state(api: str, x1, tx):
    if api == "nnx":
        from flax import nnx

        model = bnnjax.nnx.models.LarqTutorialCNN(input_shape=x1.shape[1:], rngs=nnx.Rngs(0))
        return train.create_train_state(model, tx)
    return train.create_train_state(bnnjax.models.LarqTutorialCNN(), tx, x1)


def bench_seed000(a) -> list[dict]:
    (xtr, ytr), (xte, yte) = [datasets.load_dataset(a.dataset, s, a.data_dir) for s in ("train", "test")]
    xtr, xte = datasets.preprocess(xtr), datasets.preprocess(xte)
    tx = optax.chain(optax.adam(1e-3), bnnjax.weight_clip())
    apis = ("linen", "nnx") if a.api == "both" else (a.api,)
    states = {api: _seed000_state(api, xtr[:1], tx) for api in apis}
    fit = dict(batch_size=a.batch_size, steps_per_call=a.steps_per_call, progress=False)
    full = len(xtr) // a.batch_size
    n_warm = a.batch_size * (a.steps_per_call + full % a.steps_per_call) + len(xtr) % a.batch_size
    for api in apis:
        # compile every program an epoch runs (a full chunk, the shorter last chunk, the partial last
        # batch) on a throwaway copy, so that no timed epoch includes compilation
        train.fit(jax.tree.map(jnp.copy, states[api]), (xtr[:n_warm], ytr[:n_warm]), (xte[:1000], yte[:1000]),
                  epochs=1, **fit)
    hist = {api: [] for api in apis}
    for _ in range(a.epochs):  # alternate the APIs epoch by epoch: both see the same machine load
        for api in apis:
            states[api], h = train.fit(states[api], (xtr, ytr), (xte, yte), epochs=1, **fit)
            hist[api] += h
    rows = []
    for api in apis:
        sec = float(np.mean([h["epoch_seconds"] for h in hist[api]]))
        rows.append({"benchmark": "train_seed000", "api": api, "dataset": a.dataset, "epochs": a.epochs,
                     "batch_size": a.batch_size, "seconds_per_epoch": round(sec, 3),
                     "epoch_seconds": [round(h["epoch_seconds"], 3) for h in hist[api]],
                     "images_per_second": round(len(xtr) / sec, 1), "test_accuracy": hist[api][-1]["test_accuracy"],
                     "matmul_precision": a.matmul_precision,
                     "binary_gradients": bnnjax.ops.binary_gradient_precision()})
    if len(rows) == 2:
        rows.append({"benchmark": "train_seed000_nnx_over_linen",
                     "ratio": round(rows[1]["seconds_per_epoch"] / rows[0]["seconds_per_epoch"], 3)})
    return rows


def bench_quicknet(a) -> list[dict]:
    tx = optax.chain(optax.adam(1e-3), bnnjax.weight_clip())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.batch_size, 224, 224, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 1000, a.batch_size).astype(np.int32))
    ctx = ops.float_forward() if a.residuals == "float" else contextlib.nullcontext()
    with ctx:
        if a.api == "nnx":
            state = train.create_train_state(zoo.load("QuickNet", api="nnx", classifier_activation=None), tx)
        else:
            state = train.create_train_state(zoo.QuickNet(num_classes=1000, classifier_activation=None), tx, x[:1])
        options = packing.compiler_options()  # what fit's own steps compile with
        t0 = time.perf_counter()
        if a.compile_only:
            xs, ys = jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(y.shape, y.dtype)
            step = jax.jit(train.make_train_step(), donate_argnums=0, compiler_options=options).lower(state, xs, ys).compile()
        else:
            step = jax.jit(train.make_train_step(), donate_argnums=0, compiler_options=options).lower(state, x, y).compile()
        compile_s = time.perf_counter() - t0
    row = {"benchmark": "train_quicknet", "api": a.api, "residuals": a.residuals, "batch_size": a.batch_size,
           "temp_MiB": round(step.memory_analysis().temp_size_in_bytes / 2**20, 1), "compile_s": round(compile_s, 1),
           "binary_gradients": bnnjax.ops.binary_gradient_precision()}
    if not a.compile_only:
        state, m = step(state, x, y)  # warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            state, m = step(state, x, y)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        row.update(step_s=round(sec, 3), steps=[round(t, 3) for t in times],
                   images_per_second=round(a.batch_size / sec, 2), loss=float(m["loss"]) / a.batch_size)
        if a.profile:
            with jax.profiler.trace(a.profile):
                state, m = step(state, x, y)
                jax.block_until_ready((state, m))
    row["peak_rss_MiB"] = round(_peak_rss_mib(), 1)
    return [row]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("seed000", "quicknet"), default="seed000")
    p.add_argument("--api", choices=("linen", "nnx", "both"), default="linen",
                   help="the model family; 'both' (seed000 only) alternates linen and NNX epochs")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 (seed000), 32 (quicknet)")
    p.add_argument("--steps", type=int, default=3, help="quicknet: timed steps after the warm-up step")
    p.add_argument("--residuals", choices=("bits", "float"), default="bits",
                   help="quicknet: the binary layers' backward residuals ('float': ops.float_forward())")
    p.add_argument("--compile-only", action="store_true", help="quicknet: compile and report temp_MiB only")
    p.add_argument("--profile", default=None, help="quicknet: write a jax.profiler trace of one step here")
    p.add_argument("--out", default=None, help="also append each line, with its provenance, to this results file")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--steps-per-call", type=int, default=50)
    p.add_argument("--matmul-precision", default=None,
                   help="jax.default_matmul_precision for the run, e.g. float32 for float32 operands in the "
                        "binary layers' backward dots (default: bfloat16 operands on CPU)")
    a = p.parse_args(argv)
    if a.api == "both" and a.model != "seed000":
        p.error("--api both is for --model seed000; run one QuickNet configuration per process (peak RSS)")
    a.batch_size = a.batch_size or (64 if a.model == "seed000" else 32)
    if a.matmul_precision:
        jax.config.update("jax_default_matmul_precision", a.matmul_precision)
    rows = bench_seed000(a) if a.model == "seed000" else bench_quicknet(a)
    for row in rows:
        row.update(backend=jax.default_backend(), devices=jax.device_count())
        if a.out:
            from _results import append  # experiments/ is on sys.path when this script runs

            row = append(a.out, row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
