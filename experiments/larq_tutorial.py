"""Seed 000: Larq's MNIST tutorial BNN, reproduced with bnnjax.

3 QuantConv + 2 QuantDense with ste_sign, weight clipping, BatchNorm(scale=False), max-pool before BN,
real first-layer input, Adam, batch 64, 6 epochs, inputs in [-1, 1]. Published: 97.5-97.6 % on MNIST.

    python experiments/larq_tutorial.py --dataset fashion_mnist [--export] [--api nnx]
"""
import dataclasses

import optax
from flax import nnx

import bnnjax
from bnnjax import experiment


@dataclasses.dataclass(frozen=True)
class Config(experiment.Config):
    epochs: int = 6
    learning_rate: float = 1e-3  # Keras' Adam default


def train_and_evaluate(config: Config, workdir: str) -> dict:
    (x, _), _ = data = experiment.load_data(config, "[-1, 1]")
    if config.api == "nnx":
        model = bnnjax.nnx.models.LarqTutorialCNN(x.shape[1:], rngs=nnx.Rngs(config.seed))
    else:
        model = bnnjax.models.LarqTutorialCNN()
    tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate),
                     bnnjax.weight_clip(1.0))
    return experiment.run("larq_tutorial", model, tx, config, workdir, data)


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
