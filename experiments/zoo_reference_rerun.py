#!/usr/bin/env python3
"""Peer side: larq-zoo's outputs again, on TensorFlow's Eigen CPU kernels and in float64, for the weights
and batch ``../shared/peers/zoo_reference.py`` wrote.

Runs in the peer virtualenv (larq, larq-zoo, TensorFlow; never a bnnjax dependency), after
``zoo_reference.py REFDIR``:

    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python TF_USE_LEGACY_KERAS=1 \
        /tmp/peer/bin/python experiments/zoo_reference_rerun.py REFDIR [MODEL ...]

For each model it loads REFDIR/NAME.h5 into larq-zoo's model, runs REFDIR/NAME.npz's batch and writes

- REFDIR/NAME.eigen32.npy: the float32 softmax outputs with TensorFlow's oneDNN kernels turned off
  (``TF_ENABLE_ONEDNN_OPTS=0``, set before TensorFlow is imported: its Eigen kernels, another summation
  order than the oneDNN kernels ``zoo_reference.py`` ran with by default);
- REFDIR/NAME.logits64.npy: the logits (the input of the final softmax, which larq-zoo pins to float32)
  with Keras' floatx set to float64.

``experiments/zoo_parity.py REFDIR`` compares bnnjax with all three. Why: a deep BNN with random weights
meets float32 values within rounding of a binarizing sign's threshold; a different summation order may
round them to the other side and the flipped bit changes everything after it, so two correct float32
implementations (TensorFlow's two kernel sets among them) can disagree; in float64 they do not.
"""
import os
import sys

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # read when TensorFlow is imported
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np  # noqa: E402
import larq_zoo as lqz  # noqa: E402
import tensorflow as tf  # noqa: E402


def build(name, refdir):
    tf.keras.backend.clear_session()
    model = (getattr(lqz.literature, name, None) or getattr(lqz.sota, name))(weights=None)
    model.load_weights(f"{refdir}/{name}.h5")
    return model


def main():
    refdir, names = sys.argv[1], sys.argv[2:]
    names = names or [n for n in dir(lqz.literature) + dir(lqz.sota) if n[0].isupper()]
    for name in names:
        x = np.load(f"{refdir}/{name}.npz")["x"]
        tf.keras.backend.set_floatx("float32")
        np.save(f"{refdir}/{name}.eigen32.npy", build(name, refdir).predict(x, verbose=0))
        tf.keras.backend.set_floatx("float64")
        model = build(name, refdir)
        logits = tf.keras.Model(model.inputs, model.layers[-2].output).predict(x.astype(np.float64), verbose=0)
        np.save(f"{refdir}/{name}.logits64.npy", logits.astype(np.float64))
        print(name, logits.shape, flush=True)


if __name__ == "__main__":
    main()
