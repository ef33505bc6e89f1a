"""Seed 004: ABC-Net — train the notebook's float CNN, convert its convs to ABC layers, fine-tune.

Float CNN: conv5x5(32) -> pool -> BN -> ReLU -> conv5x5(64) -> pool -> BN -> ReLU -> dense 1024 ->
dropout -> dense 10, inputs in [0, 1]. Conversion keeps each float kernel as the latent kernel of an
ABC layer with M binary weight bases (alphas by least squares every forward pass) and N shifted
binary activations; then fine-tunes. ``--from-scratch`` trains the ABC model from initialization;
``--sweep`` converts and fine-tunes for every M, N in ``--sweep-bases`` (1,3,5) and prints the table.

    python experiments/abcnet.py --dataset fashion_mnist --float-epochs 2 --epochs 1 --sweep
"""
import dataclasses
import json
from pathlib import Path

import optax
from flax import linen as nn

from bnnjax import experiment, layers

CONVS = {"conv1": 32, "conv2": 64}


class ABCNetCNN(nn.Module):
    num_weight_bases: int | None = None  # None: the float CNN
    num_act_bases: int | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for name, features in CONVS.items():
            if self.num_weight_bases is None:  # a float conv (QuantConv without quantizers: the fast CPU path)
                x = layers.QuantConv(features, (5, 5), padding="SAME", name=name)(x)
            else:
                x = layers.ABCConv(features, (5, 5), num_weight_bases=self.num_weight_bases,
                                   num_act_bases=self.num_act_bases, name=name)(x)
            x = layers.BatchNorm(use_running_average=not train)(layers.MaxPool((2, 2))(x))
            x = layers.Activation("relu")(x)
        x = layers.Activation("relu")(nn.Dense(1024)(layers.Flatten()(x)))
        return nn.Dense(10)(nn.Dropout(0.5, deterministic=not train)(x))


@dataclasses.dataclass(frozen=True)
class Config(experiment.Config):
    num_weight_bases: int = 5
    num_act_bases: int = 5
    float_epochs: int = 5
    epochs: int = 5  # fine-tuning (or from-scratch) epochs
    batch_size: int = 50
    learning_rate: float = 1e-4  # the notebook's Adam rate
    from_scratch: bool = False
    sweep: bool = False
    sweep_bases: tuple[int, ...] = (1, 3, 5)  # the M and N values of the sweep


def convert(float_params, m, n):
    params = dict(float_params)
    for name, features in CONVS.items():
        float_conv = layers.QuantConv(features, (5, 5), padding="SAME")
        _, params[name] = layers.abc_from_float(float_conv, float_params[name], m, n)
    return params


def train_and_evaluate(config: Config, workdir: str) -> dict:
    data = experiment.load_data(config, "[0, 1]")
    tx = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
    run = lambda name, model, cfg, sub, **kw: experiment.run(name, model, tx(), cfg, str(Path(workdir) / sub), data, **kw)
    if config.from_scratch:
        return run("abcnet_scratch", ABCNetCNN(config.num_weight_bases, config.num_act_bases), config, "scratch")
    from bnnjax import train
    float_cfg = dataclasses.replace(config, epochs=config.float_epochs)
    base = run("abcnet_float", ABCNetCNN(), float_cfg, "float")
    restored = train.restore_checkpoint(Path(workdir) / "float", train.create_train_state(ABCNetCNN(), tx(), data[0][0][:1]))
    fp, stats = restored[0].params, restored[0].batch_stats
    bases = config.sweep_bases
    grid = [(m, n) for m in bases for n in bases] if config.sweep else [(config.num_weight_bases, config.num_act_bases)]
    rows = []
    for m, n in grid:
        r = run("abcnet_finetune", ABCNetCNN(m, n), config, f"M{m}_N{n}", params=convert(fp, m, n), batch_stats=stats,
                extra={"num_weight_bases": m, "num_act_bases": n, "float_test_accuracy": base["test_accuracy"]})
        rows.append(r)
    print("| M \\ N | " + " | ".join(f"N={n}" for n in sorted({n for _, n in grid})) + " |")
    for m in sorted({m for m, _ in grid}):
        print(f"| M={m} | " + " | ".join(f"{r['test_accuracy']:.4f}" for r in rows if r["num_weight_bases"] == m) + " |")
    result = {**rows[-1], "experiment": "abcnet", "sweep": [{k: r[k] for k in ("num_weight_bases", "num_act_bases",
              "test_accuracy")} for r in rows], "float_test_accuracy": base["test_accuracy"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    experiment.cli(Config, train_and_evaluate, description=__doc__.splitlines()[0])
