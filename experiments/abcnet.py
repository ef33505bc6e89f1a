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
from flax import nnx

from bnnjax import experiment, layers
from bnnjax import nnx as bnx

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


class NNXABCNetCNN(nnx.Module):
    """ABCNetCNN in Flax NNX."""

    def __init__(self, input_shape, num_weight_bases: int | None = None, num_act_bases: int | None = None, *,
                 rngs: nnx.Rngs):
        h, w, c = input_shape
        conv = lambda cin, cout: (bnx.QuantConv(cin, cout, (5, 5), padding="SAME", rngs=rngs) if num_weight_bases is None
                                  else bnx.ABCConv(cin, cout, (5, 5), num_weight_bases=num_weight_bases,
                                                   num_act_bases=num_act_bases, rngs=rngs))
        self.conv1, self.bn1 = conv(c, CONVS["conv1"]), bnx.BatchNorm(CONVS["conv1"], rngs=rngs)
        self.conv2, self.bn2 = conv(CONVS["conv1"], CONVS["conv2"]), bnx.BatchNorm(CONVS["conv2"], rngs=rngs)
        self.pool, self.relu, self.flatten = bnx.MaxPool((2, 2)), bnx.Activation("relu"), bnx.Flatten()
        self.dense1 = nnx.Linear(h // 4 * (w // 4) * CONVS["conv2"], 1024, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.dense2 = nnx.Linear(1024, 10, rngs=rngs)

    def __call__(self, x):
        x = self.relu(self.bn1(self.pool(self.conv1(x))))
        x = self.relu(self.bn2(self.pool(self.conv2(x))))
        x = self.relu(self.dense1(self.flatten(x)))
        return self.dense2(self.dropout(x))


def convert_nnx(float_model: NNXABCNetCNN, input_shape, m, n, seed: int) -> NNXABCNetCNN:
    """The ABC model with the float model's variables: each float conv kernel becomes the latent kernel its
    bases approximate (shifts and betas at their defaults), every other layer copied."""
    abc = NNXABCNetCNN(input_shape, m, n, rngs=nnx.Rngs(seed))
    for name in CONVS:
        for v in ("kernel", "bias"):
            getattr(getattr(abc, name), v).set_value(getattr(getattr(float_model, name), v).get_value())
    for name in ("bn1", "bn2", "dense1", "dense2"):
        nnx.update(getattr(abc, name), nnx.state(getattr(float_model, name)))
    return abc


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
    shape = data[0][0].shape[1:]
    tx = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
    run = lambda name, model, cfg, sub, **kw: experiment.run(name, model, tx(), cfg, str(Path(workdir) / sub), data, **kw)
    nnx_api = config.api == "nnx"
    cnn = (lambda m=None, n=None: NNXABCNetCNN(shape, m, n, rngs=nnx.Rngs(config.seed))) if nnx_api else ABCNetCNN
    if config.from_scratch:
        return run("abcnet_scratch", cnn(config.num_weight_bases, config.num_act_bases), config, "scratch")
    from bnnjax import train
    float_cfg = dataclasses.replace(config, epochs=config.float_epochs)
    base = run("abcnet_float", cnn(), float_cfg, "float")
    template = train.create_train_state(cnn(), tx(), data[0][0][:1])
    trained, _ = train.restore_checkpoint(Path(workdir) / "float", template)
    bases = config.sweep_bases
    grid = [(m, n) for m in bases for n in bases] if config.sweep else [(config.num_weight_bases, config.num_act_bases)]
    rows = []
    for m, n in grid:
        extra = {"num_weight_bases": m, "num_act_bases": n, "float_test_accuracy": base["test_accuracy"]}
        if nnx_api:
            r = run("abcnet_finetune", convert_nnx(train.trained_model(trained), shape, m, n, config.seed), config,
                    f"M{m}_N{n}", extra=extra)
        else:
            r = run("abcnet_finetune", ABCNetCNN(m, n), config, f"M{m}_N{n}", params=convert(trained.params, m, n),
                    batch_stats=trained.batch_stats, extra=extra)
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
