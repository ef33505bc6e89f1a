"""BinaryNet (Courbariaux et al. 2016) MNIST MLP: binary weights and activations, BN, squared hinge loss.

Real-valued input to the first layer, then ste_sign activations into every following layer, ste_sign
kernels clipped to [-1, 1], BatchNorm after every layer, dropout 0.2 on the input and 0.5 on hidden
layers, Adam with the learning rate decayed exponentially from 3e-3 to 3e-7 over training, batch 100.
Paper: 3 x 4096 units, 0.96 % test error on MNIST (1000 epochs).

    python experiments/binarynet_mlp.py --dataset fashion_mnist --hidden 1024,1024,1024 --epochs 10
"""
import dataclasses

import optax
from flax import linen as nn
from flax import nnx

import bnnjax
from bnnjax import experiment
from bnnjax import nnx as bnx
from bnnjax.layers import BatchNorm, QuantDense


class BinaryNetMLP(nn.Module):
    hidden: tuple[int, ...] = (4096, 4096, 4096)
    dropout_in: float = 0.2
    dropout_hidden: float = 0.5
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda: BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-4)
        x = nn.Dropout(self.dropout_in, deterministic=not train)(x)
        for i, width in enumerate(self.hidden):
            x = QuantDense(width, input_quantizer=None if i == 0 else "ste_sign", kernel_quantizer="ste_sign",
                           use_bias=False)(x)
            x = nn.Dropout(self.dropout_hidden, deterministic=not train)(bn()(x))
        x = QuantDense(self.num_classes, input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False)(x)
        return bn()(x)


class NNXBinaryNetMLP(nnx.Module):
    """BinaryNetMLP in Flax NNX."""

    def __init__(self, in_features: int, hidden=(4096, 4096, 4096), dropout_in: float = 0.2,
                 dropout_hidden: float = 0.5, num_classes: int = 10, *, rngs: nnx.Rngs):
        widths = (in_features, *hidden, num_classes)
        self.dense = nnx.List([bnx.QuantLinear(a, b, input_quantizer=None if i == 0 else "ste_sign",
                                               kernel_quantizer="ste_sign", use_bias=False, rngs=rngs)
                               for i, (a, b) in enumerate(zip(widths, widths[1:]))])
        self.bn = nnx.List([bnx.BatchNorm(b, momentum=0.9, epsilon=1e-4, rngs=rngs) for b in widths[1:]])
        self.drop_in = nnx.Dropout(dropout_in, rngs=rngs)
        self.drop = nnx.Dropout(dropout_hidden, rngs=rngs)

    def __call__(self, x):
        x = self.drop_in(x)
        for i, (dense, bn) in enumerate(zip(self.dense, self.bn)):
            x = bn(dense(x))
            if i < len(self.dense) - 1:
                x = self.drop(x)
        return x


@dataclasses.dataclass(frozen=True)
class Config(experiment.Config):
    hidden: tuple[int, ...] = (4096, 4096, 4096)
    dropout_in: float = 0.2
    dropout_hidden: float = 0.5
    epochs: int = 1000
    batch_size: int = 100
    lr_start: float = 3e-3
    lr_end: float = 3e-7


def train_and_evaluate(config: Config, workdir: str) -> dict:
    (x, y), test = data = experiment.load_data(config, "[-1, 1]", flatten=True)
    steps = experiment.steps_per_epoch(config, len(x))
    decay = (config.lr_end / config.lr_start) ** (1 / max(config.epochs, 1))  # per epoch, as the paper
    lr = optax.exponential_decay(config.lr_start, transition_steps=steps, decay_rate=decay, staircase=True)
    tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=lr), bnnjax.weight_clip(1.0))
    if config.api == "nnx":
        model = NNXBinaryNetMLP(x.shape[-1], config.hidden, config.dropout_in, config.dropout_hidden,
                                rngs=nnx.Rngs(config.seed))
    else:
        model = BinaryNetMLP(config.hidden, config.dropout_in, config.dropout_hidden)
    return experiment.run("binarynet_mlp", model, tx, config, workdir, data, loss="squared_hinge",
                          extra={"hidden": list(config.hidden)})


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
