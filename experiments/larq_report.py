"""Seed 001: the Larq/TensorFlow report's MNIST BNN, reproduced with bnnjax.

Two SAME-padded QuantConv (32, 64) and QuantDense 128 + 10, ste_sign on every layer's input and kernel
(the first layer too), BatchNorm then max-pool, categorical cross-entropy on one-hot labels, Adam 1e-3,
batch 64, 10 epochs, inputs scaled to [0, 1] as in the report. Note that ste_sign maps every [0, 1]
pixel to +1, so with the report's exact settings the first layer sees a constant image;
``--input-scale "[-1, 1]"`` is the fix a user wants.

    python experiments/larq_report.py --dataset fashion_mnist
"""
import dataclasses

import optax
from flax import linen as nn
from flax import nnx

from bnnjax import experiment
from bnnjax import nnx as bnx
from bnnjax.layers import Flatten, MaxPool, QuantConv, QuantDense
from bnnjax.layers import keras_batch_norm


class ReportBNN(nn.Module):
    dense_units: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        q = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False,
                 kernel_init=nn.initializers.glorot_uniform())
        for features in (32, 64):
            x = QuantConv(features, (3, 3), padding="SAME", **q)(x)
            x = MaxPool((2, 2))(keras_batch_norm(train)(x))
        x = QuantDense(self.dense_units, **q)(Flatten()(x))
        x = QuantDense(self.num_classes, **q)(keras_batch_norm(train)(x))
        return keras_batch_norm(train)(x)


class NNXReportBNN(nnx.Module):
    """ReportBNN in Flax NNX."""

    def __init__(self, input_shape, dense_units: int = 128, num_classes: int = 10, *, rngs: nnx.Rngs):
        h, w, c = input_shape
        q = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False,
                 kernel_init=nnx.initializers.glorot_uniform(), rngs=rngs)
        self.conv1, self.bn1 = bnx.QuantConv(c, 32, (3, 3), padding="SAME", **q), bnx.keras_batch_norm(32, rngs=rngs)
        self.conv2, self.bn2 = bnx.QuantConv(32, 64, (3, 3), padding="SAME", **q), bnx.keras_batch_norm(64, rngs=rngs)
        self.pool, self.flatten = bnx.MaxPool((2, 2)), bnx.Flatten()
        self.dense1 = bnx.QuantLinear(h // 4 * (w // 4) * 64, dense_units, **q)
        self.bn3 = bnx.keras_batch_norm(dense_units, rngs=rngs)
        self.dense2 = bnx.QuantLinear(dense_units, num_classes, **q)
        self.bn4 = bnx.keras_batch_norm(num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.pool(self.bn1(self.conv1(x)))
        x = self.pool(self.bn2(self.conv2(x)))
        x = self.dense2(self.bn3(self.dense1(self.flatten(x))))
        return self.bn4(x)


@dataclasses.dataclass(frozen=True)
class Config(experiment.Config):
    epochs: int = 10
    learning_rate: float = 1e-3
    input_scale: str = "[0, 1]"


def one_hot_cross_entropy(logits, labels):
    # the report's categorical_crossentropy on to_categorical labels
    return optax.softmax_cross_entropy(logits, nn.one_hot(labels, logits.shape[-1])).mean()


def train_and_evaluate(config: Config, workdir: str) -> dict:
    # the report compiles without kernel_constraint: no weight clipping, as published
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
    (x, _), _ = data = experiment.load_data(config, config.input_scale)
    model = NNXReportBNN(x.shape[1:], rngs=nnx.Rngs(config.seed)) if config.api == "nnx" else ReportBNN()
    return experiment.run("larq_report", model, tx, config, workdir, data, loss=one_hot_cross_entropy,
                          extra={"input_scale": config.input_scale})


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
