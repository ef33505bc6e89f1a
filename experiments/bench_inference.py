"""Inference benchmark: float, Flax eval, packed and exported-artifact paths, seed 000 and QuickNet.

Prints one JSON line per (model, path, batch): ``img_s``, ``latency_ms`` (median of repeated calls, the
paths timed round-robin, ``--burst`` back-to-back calls of each per round),
``predictions_identical`` (argmax equal to the float path's on the evaluation batch) and ``bytes``
where a file exists. Paths:

- ``float``: ``model.apply`` on the trained variables with the packed training forward off
  (:func:`bnnjax.ops.float_forward`): plain float32 products of ±1 values;
- ``flax_eval``: ``model.apply`` on the trained variables as training runs it (packed forward on CPU);
- ``packed``: ``model.apply`` on ``bnnjax.export.pack``'s variables (``bytes``: the packed variables);
- ``packed_closure``: the same, jitted with the packed variables closed over (XLA sees the weights as
  constants, as in the artifact);
- ``artifact``: the ``save_artifact`` file, deserialized and called (``bytes``: the file);
- ``artifact_default_options``: the same, jitted without :func:`bnnjax.packing.compiler_options`
  (every other path compiles with them: 512-bit vectors on an AVX-512 CPU);
- ``iree``: the same StableHLO compiled by IREE for this CPU at that batch size (extra ``iree``;
  ``bytes``: the batch-1 module).

``bound_ms`` is what this machine's own kernels allow, measured in the same run: the model's binary MACs
(``bnnjax.summary``) at the packed XNOR-popcount rate plus its other MACs at the float32 dot rate, both
from ``bench_kernels``' 2048^3 case timed in the same rounds as the paths (median; ``packed_2048_ms``,
``f32_2048_ms``); ``ratio_to_bound`` is each path's latency over it (1.0: as fast as the two matmul
kernels alone could go). ``strict_bound_ms`` and ``ratio_to_strict_bound`` take the kernels' fastest
calls instead of their medians (the paths' latencies stay medians).

seed 000 is trained briefly on Fashion-MNIST (``--train-steps``) and evaluated on the test set;
QuickNet (larq-zoo's architecture, 224x224) uses random weights with randomized BatchNorm statistics
and a random batch.

    python experiments/bench_inference.py [--models seed000,quicknet] [--repeats 30] [--burst 3] [--out results/FILE.jsonl]
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
from bnnjax import datasets, export, ops, packing, train, zoo


def interleaved_ms(fns: dict, x, repeats: int, burst: int = 1, budget_s: float = 20.0, fastest=None) -> dict:
    """Median milliseconds per call of each function on ``x``, timed round-robin so that the machine's
    speed drifting during the run affects every path alike: each round calls every path ``burst``
    times in a row (a serving loop's back-to-back calls, as the peers' scripts and the kernel rates
    are timed), ``repeats`` rounds, after one untimed call: the first call after another path (the
    float path's large temporaries) starts with cold caches, which a serving loop does not see, and
    in a fixed order the same path would always pay it (seed 000's ``packed`` after ``flax_eval``:
    5.2 against 4.4 ms). Fewer rounds (at least 3, at most ``repeats``) where ``repeats`` would take more than
    ``budget_s`` (the float paths at large batches). ``fastest``, a dict, receives each one's fastest call."""
    t0 = time.perf_counter()
    for fn in fns.values():
        jax.block_until_ready(fn(x))
    rounds = min(repeats, max(3, int(budget_s / ((burst + 1) * (time.perf_counter() - t0)))))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            jax.block_until_ready(fn(x))
            for _ in range(burst):
                t = time.perf_counter()
                jax.block_until_ready(fn(x))
                times[name].append(time.perf_counter() - t)
    if fastest is not None:
        fastest.update({name: 1e3 * min(ts) for name, ts in times.items()})
    return {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}


def kernel_fns() -> dict:
    """The two kernels the bound comes from, at 2048^3 (±1 data, as ``bench_kernels.py`` runs them):
    the packed XNOR-popcount matmul and XLA's float32 dot, each with XLA's default options and with
    :func:`bnnjax.packing.compiler_options`. Timed in the same rounds as the paths (the machine's speed
    drifts within a run: a rate measured once at the start made one run's bound 1.5x another's)."""
    n = 2048
    rng = np.random.default_rng(0)
    x, y = (np.where(rng.random((n, n)) < 0.5, 1.0, -1.0).astype(np.float32) for _ in range(2))
    xf, yf, xp, yp = jnp.asarray(x), jnp.asarray(y), packing.pack_bits(x), packing.pack_bits(y)
    fns = {}
    for tag, opts in (("default", {}), ("options", packing.compiler_options())):
        f32 = jax.jit(lambda u, v: jnp.dot(u, v.T), compiler_options=opts)
        packed = jax.jit(lambda u, v: packing.xnor_matmul(u, v, n), compiler_options=opts)
        fns[f"kernel:f32:{tag}"] = lambda _, f=f32: f(xf, yf)
        fns[f"kernel:packed:{tag}"] = lambda _, f=packed: f(xp, yp)
    return fns


def rates_from(ms: dict) -> dict:
    """MACs per second of each kernel, the faster of its two option sets (the tighter bound)."""
    n = 2048
    packed_ms = min(v for k, v in ms.items() if k.startswith("kernel:packed:"))
    f32_ms = min(v for k, v in ms.items() if k.startswith("kernel:f32:"))
    return {"binary_macs_per_s": n ** 3 / (packed_ms / 1e3), "float_macs_per_s": n ** 3 / (f32_ms / 1e3),
            "packed_2048_ms": round(packed_ms, 3), "f32_2048_ms": round(f32_ms, 3)}


def model_macs(model, x1) -> dict:
    """Binary and other MACs per image, from :func:`bnnjax.summary`."""
    r = bnnjax.summary(model, x1, print_fn=None)
    binary = r["macs_by_bits"].get(1, 0)
    return {"binary_macs": int(binary), "other_macs": int(r["total_macs"] - binary)}


def bound_ms(macs: dict, rates: dict) -> float:
    """Milliseconds per image at the kernels' rates: binary MACs / packed rate + other MACs / f32 rate."""
    return 1e3 * (macs["binary_macs"] / rates["binary_macs_per_s"] + macs["other_macs"] / rates["float_macs_per_s"])


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
    macs = model_macs(model, xs[:1])
    kernels = kernel_fns()
    packed = export.pack(model, variables, xs[:1])
    opts = packing.compiler_options()  # every path compiles as the docs tell users to
    float_apply = jax.jit(model.apply, compiler_options=opts)
    with ops.float_forward():
        float_fn = jax.jit(lambda v, x: model.apply(v, x), compiler_options=opts)
        ref = {b: float_fn.lower(variables, xs[:b]).compile() for b in batches}  # traced inside the block
    tmp = tempfile.mkdtemp()
    path = Path(tmp) / f"{name}.stablehlo"
    file_bytes = export.save_artifact(path, model, packed, xs[:2])
    deployed = export.load_artifact(path)
    paths = {
        "float": (lambda b: (lambda x: ref[b](variables, x)), None),
        "flax_eval": (lambda b: (lambda x: float_apply(variables, x)), None),
        "packed": (lambda b: (lambda x: float_apply(packed, x)), export.packed_bytes(packed)),
        "packed_closure": (lambda b: jax.jit(lambda x: model.apply(packed, x), compiler_options=opts),
                           export.packed_bytes(packed)),
        "artifact": (lambda b: jax.jit(deployed.call, compiler_options=opts), file_bytes),
        "artifact_default_options": (lambda b: jax.jit(deployed.call), file_bytes),
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
        fastest = {}
        ms = interleaved_ms({**fns, **kernels}, evals[0], a.repeats, a.burst, fastest=fastest)
        rates = rates_from(ms)
        per_image_ms = bound_ms(macs, rates)
        strict_ms = bound_ms(macs, rates_from(fastest))  # the kernels' fastest calls: a stricter bound
        for pname, (_, nbytes) in paths.items():
            row = {"model": name, "path": pname, "batch": b, "img_s": round(1e3 * b / ms[pname], 1),
                   "latency_ms": round(ms[pname], 3), "predictions_identical": identical[pname],
                   "images_compared": int(want.size), "backend": jax.default_backend(),
                   "bound_ms": round(per_image_ms * b, 3), "ratio_to_bound": round(ms[pname] / (per_image_ms * b), 2),
                   "strict_bound_ms": round(strict_ms * b, 3),
                   "ratio_to_strict_bound": round(ms[pname] / (strict_ms * b), 2),
                   **macs, **{k: v for k, v in rates.items() if k.endswith("_ms")}}
            if nbytes is not None:
                row["bytes"] = int(nbytes)
            if a.out:
                from _results import append  # experiments/ is on sys.path when this script runs

                row = append(a.out, row)
            print(json.dumps(row), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="seed000,quicknet")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=30, help="rounds of the round-robin timing")
    p.add_argument("--burst", type=int, default=3, help="back-to-back calls of each path per round")
    p.add_argument("--iree", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=None, help="also append each line, with its provenance, to this results file")
    a = p.parse_args(argv)
    builders = {"seed000": seed000, "quicknet": quicknet}
    for name in a.models.split(","):
        run(name, builders[name], a)


if __name__ == "__main__":
    main()
