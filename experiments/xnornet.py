"""An XNOR-Net style CNN: BN -> sign -> binary conv with per-channel weight scales -> pool.

Real first and last layers; every other layer binarizes its input with ste_sign and its kernel with
xnor_weight_scale (mean|W| per output channel times sign(W), gradient through the scale), BatchNorm
before each binary layer as in the paper's block order. Works on 28x28x1 and 32x32x3 inputs.

    python experiments/xnornet.py --dataset fashion_mnist --epochs 10
"""
import dataclasses

import optax
from flax import linen as nn
from flax import nnx

import bnnjax
from bnnjax import experiment
from bnnjax import nnx as bnx
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


class NNXXNORNet(nnx.Module):
    """XNORNet in Flax NNX."""

    def __init__(self, input_shape, widths=(64, 128, 256), dense: int = 512, num_classes: int = 10, *,
                 rngs: nnx.Rngs):
        h, w, c = input_shape
        xnor = dict(input_quantizer="ste_sign", kernel_quantizer="xnor_weight_scale", use_bias=False, rngs=rngs)
        self.conv1 = bnx.QuantConv(c, widths[0], (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.convs = nnx.List([bnx.QuantConv(a, b, (3, 3), padding="SAME", **xnor) for a, b in zip(widths, widths[1:])])
        self.bns = nnx.List([bnx.BatchNorm(a, momentum=0.9, rngs=rngs) for a in widths[:-1]])
        self.pool, self.flatten = bnx.MaxPool((2, 2)), bnx.Flatten()
        features = (h >> len(widths)) * (w >> len(widths)) * widths[-1]
        self.bn_flat = bnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        self.dense = bnx.QuantLinear(features, dense, **xnor)
        self.bn_dense = bnx.BatchNorm(dense, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.pool(self.conv1(x))
        for conv, bn in zip(self.convs, self.bns):
            x = self.pool(conv(bn(x)))
        x = self.dense(self.bn_flat(self.flatten(x)))
        return self.head(self.bn_dense(x))


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
    if config.api == "nnx":
        model = NNXXNORNet(x.shape[1:], config.widths, config.dense, rngs=nnx.Rngs(config.seed))
    else:
        model = XNORNet(config.widths, config.dense)
    return experiment.run("xnornet", model, tx, config, workdir, data)


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
