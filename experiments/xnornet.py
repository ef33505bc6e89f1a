"""An XNOR-Net style CNN: BN -> sign -> binary conv with per-channel weight scales -> pool.

Real first and last layers; every other layer binarizes its input with ste_sign and its kernel with
xnor_weight_scale (mean|W| per output channel times sign(W), gradient through the scale), BatchNorm
before each binary layer as in the paper's block order. Works on 28x28x1 and 32x32x3 inputs.

    python experiments/xnornet.py --dataset fashion_mnist --epochs 10
"""
import dataclasses

import optax
from flax import linen as nn

import bnnjax
from bnnjax import experiment
from bnnjax.layers import BatchNorm, Flatten, MaxPool, QuantConv, QuantDense


class XNORNet(nn.Module):
    widths: tuple[int, ...] = (64, 128, 256)
    dense: int = 512
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda: BatchNorm(use_running_average=not train, momentum=0.9)
        xnor = dict(input_quantizer="ste_sign", kernel_quantizer="xnor_weight_scale", use_bias=False)
        # the real first conv: a QuantConv without quantizers, which takes bnnjax's fast CPU conv path
        x = MaxPool((2, 2))(QuantConv(self.widths[0], (3, 3), padding="SAME", use_bias=False)(x))
        for width in self.widths[1:]:
            x = MaxPool((2, 2))(QuantConv(width, (3, 3), padding="SAME", **xnor)(bn()(x)))
        x = QuantDense(self.dense, **xnor)(bn()(Flatten()(x)))
        return nn.Dense(self.num_classes)(bn()(x))


@dataclasses.dataclass(frozen=True)
class Config(experiment.Config):
    dataset: str = "cifar10"
    widths: tuple[int, ...] = (64, 128, 256)
    dense: int = 512
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3


def train_and_evaluate(config: Config, workdir: str) -> dict:
    (x, _), _ = data = experiment.load_data(config, "[-1, 1]")
    steps = experiment.steps_per_epoch(config, len(x)) * config.epochs
    lr = optax.cosine_decay_schedule(config.learning_rate, max(steps, 1))
    tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=lr), bnnjax.weight_clip(1.0))
    return experiment.run("xnornet", XNORNet(config.widths, config.dense), tx, config, workdir, data)


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
