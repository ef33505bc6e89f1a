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

from bnnjax import experiment
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
    return experiment.run("larq_report", ReportBNN(), tx, config, workdir, loss=one_hot_cross_entropy,
                          scale=config.input_scale, extra={"input_scale": config.input_scale})


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
