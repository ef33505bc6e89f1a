"""Training-speed benchmark: the seed-000 model on Fashion-MNIST, batch 64, Adam (Larq's tutorial setup).

Prints one JSON line: seconds_per_epoch (mean of the epochs' training time, compilation excluded by a
warm-up call), images_per_second, test_accuracy, plus the backend and device count.

    python experiments/bench_train.py --epochs 1 [--data-dir DIR] [--matmul-precision float32]
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnnjax
from bnnjax import datasets, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--steps-per-call", type=int, default=50)
    p.add_argument("--matmul-precision", default=None,
                   help="jax.default_matmul_precision for the run, e.g. float32 for float32 operands in the "
                        "binary layers' backward dots (default: bfloat16 operands on CPU)")
    a = p.parse_args(argv)
    if a.matmul_precision:
        jax.config.update("jax_default_matmul_precision", a.matmul_precision)
    (xtr, ytr), (xte, yte) = [datasets.load_dataset(a.dataset, s, a.data_dir) for s in ("train", "test")]
    xtr, xte = datasets.preprocess(xtr), datasets.preprocess(xte)
    model = bnnjax.models.LarqTutorialCNN()
    tx = optax.chain(optax.adam(1e-3), bnnjax.weight_clip())
    state = train.create_train_state(model, tx, xtr[:1])
    # warm-up on a throwaway copy of the state: compile every program an epoch runs (a full chunk, the
    # shorter last chunk, the partial last batch) so that no epoch's time includes compilation
    warm = jax.tree.map(jnp.copy, state)
    full = len(xtr) // a.batch_size
    n_warm = a.batch_size * (a.steps_per_call + full % a.steps_per_call) + len(xtr) % a.batch_size
    train.fit(warm, (xtr[:n_warm], ytr[:n_warm]), (xte[:1000], yte[:1000]), epochs=1, batch_size=a.batch_size,
              steps_per_call=a.steps_per_call, progress=False)
    state, hist = train.fit(state, (xtr, ytr), (xte, yte), epochs=a.epochs, batch_size=a.batch_size,
                            steps_per_call=a.steps_per_call, progress=False)
    sec = float(np.mean([h["epoch_seconds"] for h in hist]))
    print(json.dumps({"benchmark": "train_seed000", "dataset": a.dataset, "epochs": a.epochs,
                      "batch_size": a.batch_size, "seconds_per_epoch": round(sec, 3),
                      "epoch_seconds": [round(h["epoch_seconds"], 3) for h in hist],
                      "images_per_second": round(len(xtr) / sec, 1), "test_accuracy": hist[-1]["test_accuracy"],
                      "backend": jax.default_backend(), "devices": jax.device_count(),
                      "matmul_precision": a.matmul_precision,
                      "binary_gradients": bnnjax.ops.binary_gradient_precision()}))


if __name__ == "__main__":
    main()
