#!/usr/bin/env python3
"""Peer side: larq-zoo's logits in float64 for the weights and batch ``zoo_reference.py`` wrote.

Runs in the peer virtualenv (larq, larq-zoo, TensorFlow; never a bnnjax dependency), next to
``../shared/peers/zoo_reference.py``:

    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python TF_USE_LEGACY_KERAS=1 \
        /tmp/peer/bin/python experiments/zoo_reference_float64.py REFDIR [MODEL ...]

For each model it builds larq-zoo's model with Keras' floatx set to float64, loads REFDIR/NAME.h5, runs
REFDIR/NAME.npz's batch and writes the logits (the input of the final softmax, which larq-zoo pins to
float32) to REFDIR/NAME.logits64.npy. ``experiments/zoo_parity.py REFDIR --float64`` compares bnnjax's
float64 logits with them: with random weights a float32 value within rounding of a binarizing sign
can come out with either sign, so float32 references of deep random BNNs are not bit-stable; float64
ones are.
"""
import os
import sys

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import larq_zoo as lqz  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    refdir, names = sys.argv[1], sys.argv[2:]
    names = names or [n for n in dir(lqz.literature) + dir(lqz.sota) if n[0].isupper()]
    tf.keras.backend.set_floatx("float64")
    for name in names:
        tf.keras.backend.clear_session()
        ctor = getattr(lqz.literature, name, None) or getattr(lqz.sota, name)
        model = ctor(weights=None)
        model.load_weights(f"{refdir}/{name}.h5")
        x = np.load(f"{refdir}/{name}.npz")["x"].astype(np.float64)
        logits = tf.keras.Model(model.inputs, model.layers[-2].output).predict(x, verbose=0)
        np.save(f"{refdir}/{name}.logits64.npy", logits.astype(np.float64))
        print(name, logits.shape, flush=True)


if __name__ == "__main__":
    main()
