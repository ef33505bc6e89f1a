#!/usr/bin/env python3
"""Peer measurement, run in the Larq virtualenv (never imported by bnnjax): the size of LCE's .tflite of
larq-zoo's QuickNet with its initial BatchNorm statistics and with random ones.

    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python TF_USE_LEGACY_KERAS=1 /tmp/peer/bin/python \\
        experiments/peer_lce_size.py | python experiments/_results.py results/peer_quicknet_tflite_size.jsonl \\
        --command "experiments/peer_lce_size.py"

Initial statistics (mean 0, variance 1, scale 1, offset 0) let LCE's converter fold every BatchNorm
away; ``bench_inference.py`` packs QuickNet with random running statistics (uniform in [0.5, 2], as
here), which LCE must keep as per-channel multipliers and offsets. Prints one JSON line.
"""
import json
import os
from importlib import metadata

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import larq_compute_engine as lce  # noqa: E402
import larq_zoo as lqz  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    model = lqz.sota.QuickNet(weights=None)
    res = {"peer": "larq-zoo/lce", "model": "QuickNet", "tflite_bytes_initial_stats": len(lce.convert_keras_model(model))}
    rng = np.random.default_rng(2)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.uniform(0.5, 2.0, layer.moving_mean.shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape).astype(np.float32))
    res["tflite_bytes_random_stats"] = len(lce.convert_keras_model(model))
    res.update({name: metadata.version(name) for name in ("larq-zoo", "larq-compute-engine", "tensorflow")})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
