"""Inference benchmark: the packed seed-000 model vs the same model in float Flax eval mode.

Trains the seed-000 model briefly (or restores --workdir's checkpoint from experiments/larq_tutorial.py),
exports it, and prints one JSON object: packed_img_s and float_img_s (batch 1000 over the test set,
best of --repeats), packed_latency_ms and float_latency_ms (batch 1, median), file_bytes (the saved
packed model) and predictions_identical (argmax on every test image).

    python experiments/bench_inference.py [--train-steps 300] [--workdir DIR]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

import bnnjax
from bnnjax import datasets, export, train


def best_seconds(fn, x, repeats):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workdir", default=None, help="restore this larq_tutorial checkpoint instead of training")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    (xtr, ytr), (xte, yte) = [datasets.load_dataset(a.dataset, s, a.data_dir) for s in ("train", "test")]
    xtr, xte = datasets.preprocess(xtr), datasets.preprocess(xte)
    model = bnnjax.models.LarqTutorialCNN()
    state = train.create_train_state(model, optax.chain(optax.adam(1e-3), bnnjax.weight_clip()), xtr[:1])
    restored = train.restore_checkpoint(a.workdir, state) if a.workdir else None
    if restored is not None:
        state = restored[0]
    else:
        n = a.train_steps * 64
        state, _ = train.fit(state, (xtr[:n], ytr[:n]), None, epochs=1, batch_size=64, progress=False)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    packed = export.export(model, variables, xte[:1000])
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = export.save_packed(Path(tmp) / "seed000.bnn", packed)
        packed = export.load_packed(Path(tmp) / "seed000.bnn")  # measure what a user loads
    float_fn = jax.jit(lambda x: model.apply(variables, x))
    over_test = lambda fn: lambda x: [fn(x[i:i + 1000]) for i in range(0, len(x), 1000)]
    packed_s = best_seconds(over_test(packed), xte, a.repeats)
    float_s = best_seconds(over_test(float_fn), xte, a.repeats)
    one = xte[:1]
    lat = lambda fn: 1e3 * float(np.median([best_seconds(fn, one, 1) for _ in range(200)]))
    preds_p = np.concatenate([np.asarray(packed(xte[i:i + 1000])).argmax(-1) for i in range(0, len(xte), 1000)])
    preds_f = np.concatenate([np.asarray(float_fn(xte[i:i + 1000])).argmax(-1) for i in range(0, len(xte), 1000)])
    print(json.dumps({"benchmark": "inference_seed000", "dataset": a.dataset, "test_images": len(xte),
                      "packed_img_s": round(len(xte) / packed_s, 1), "float_img_s": round(len(xte) / float_s, 1),
                      "speedup": round(float_s / packed_s, 2), "packed_latency_ms": round(lat(packed), 4),
                      "float_latency_ms": round(lat(float_fn), 4), "file_bytes": file_bytes,
                      "predictions_identical": bool(np.array_equal(preds_p, preds_f)),
                      "test_accuracy_packed": float(np.mean(preds_p == yte)), "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
