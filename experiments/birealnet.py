"""Seed 002's guide applied: a Bi-Real-style binary ResNet for CIFAR-10, trained with Adam or Bop.

Full-precision stem and classifier, BatchNorm after every binary conv, a real-valued shortcut around
every binary conv (average-pool + real 1x1 conv + BN when the shape changes), approx_sign activations
and magnitude-aware sign kernels. ``--optimizer bop`` trains the binary kernels with Bop and the rest
with Adam (Larq's CaseOptimizer); ``adam`` uses Adam with weight clipping everywhere.
Defaults are Bi-Real Net 18 (stage sizes 4,4,4,4, width 64).

    python experiments/birealnet.py --dataset cifar10 --epochs 100 [--optimizer bop]
"""
import dataclasses

import optax
from flax import nnx

import bnnjax
from bnnjax import experiment, optim, train
from bnnjax.models import BiRealNet


@dataclasses.dataclass(frozen=True)
class Config(experiment.Config):
    dataset: str = "cifar10"
    stage_sizes: tuple[int, ...] = (4, 4, 4, 4)
    width: int = 64
    optimizer: str = "adam"  # adam | bop
    epochs: int = 100
    batch_size: int = 128
    learning_rate: float = 1e-3
    bop_threshold: float = 1e-8
    bop_gamma: float = 1e-4


def train_and_evaluate(config: Config, workdir: str) -> dict:
    (x, _), _ = data = experiment.load_data(config, "[-1, 1]")
    steps = experiment.steps_per_epoch(config, len(x)) * config.epochs
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=optax.cosine_decay_schedule(config.learning_rate,
                                                                                          max(steps, 1)))
    if config.api == "nnx":
        model = bnnjax.nnx.models.BiRealNet(config.stage_sizes, config.width, in_features=x.shape[-1],
                                            rngs=nnx.Rngs(config.seed))
    else:
        model = BiRealNet(config.stage_sizes, config.width)
    params = None
    if config.optimizer == "bop":
        tx = bnnjax.case_optimizer(bnnjax.bop(config.bop_threshold, config.bop_gamma), adam)
        if config.api == "nnx":
            optim.sign_kernels(model)  # Bop starts from binary kernels: set in place
        else:
            params = optim.sign_kernels(train.create_train_state(model, tx, x[:1], seed=config.seed).params)
    elif config.optimizer == "adam":
        tx = optax.chain(adam, bnnjax.weight_clip(1.0))
    else:
        raise ValueError(f"optimizer must be 'adam' or 'bop', got {config.optimizer!r}.")
    return experiment.run("birealnet", model, tx, config, workdir, data, params=params,
                          extra={"optimizer": config.optimizer, "stage_sizes": list(config.stage_sizes),
                                 "width": config.width})


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
