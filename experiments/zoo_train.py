"""Train a zoo model on ImageNet (or any ImageFolder) with larq-zoo's recipe, streaming, resumable.

    python experiments/zoo_train.py --model QuickNet --data-dir /data/imagenet --workdir runs/quicknet
    python experiments/zoo_train.py --model QuickNet --data-dir DIR --image-size 32 --steps 20 \\
        --batch-size 8 --section-blocks 1,1 --section-filters 16,32          # smoke test

Recipes (``RECIPES``; ``--recipe generic`` forces the generic one), from larq-zoo 2.x's
``larq_zoo/training``:

- QuickNet, QuickNetSmall, QuickNetLarge (``sota_experiments.TrainQuickNet``): 600 epochs, batch 2048;
  Larq's CaseOptimizer: Adam for the binary kernels, peak learning rate 1e-2, and SGD with momentum 0.9
  for everything else, peak 0.1, both with larq-zoo's ``CosineDecayWithWarmup`` (linear warm-up from 0
  over 5 epochs, then cosine decay to 0 at the end); binary kernels clipped to the family's
  ``CLIP_VALUE`` (1.25).
- BiRealNet (``basic_experiments.TrainBiRealNet``, larq-zoo's default settings): 300 epochs, batch 512,
  Adam 5e-3 decaying linearly to 0 over the run (larq-zoo writes 750,684 steps: 300 epochs of ImageNet
  at 512). The Bi-Real Net paper initializes from a pretrained real-valued network instead; larq-zoo's
  recipe trains from scratch, as this script does.
- BinaryResNetE18, BinaryDenseNet28/37/37Dilated/45, XNORNet, DoReFaNet, BinaryAlexNet: larq-zoo's
  ``basic_experiments`` (Adam with per-epoch step schedules; XNORNet with its L2 of 5e-7 on every
  kernel; DoReFaNet without weight clipping, as larq-zoo).
- MeliusNet22 and RealToBinaryNet (larq-zoo trains these with other tooling: a multi-stage distillation
  for RealToBinaryNet) and ``--recipe generic``: Adam (Keras' epsilon 1e-7), peak learning rate 2e-3,
  linear warm-up over 5 epochs, cosine decay to 0, batch 256, 120 epochs, binary kernels clipped to the
  family's ``CLIP_VALUE``. Not a published recipe: a sound default.

Common to all: softmax cross-entropy on the logits (larq-zoo's sparse categorical cross-entropy on the
softmax), no label smoothing or weight decay beyond the above, larq-zoo's augmentation
(``pipeline.train_loader``: random-resized crop and flip, TF1 bicubic resize) with uint8 batches
normalized on the device, ``steps_per_epoch = train images // batch`` as larq-zoo's schedules count.
Optimizers are optax's with Keras' arithmetic where it differs: SGD's velocity accumulates ``lr * g``
(``v = 0.9 v - lr g``), Adam's epsilon is Keras' 1e-7 unless a recipe sets it (optax adds it to the
bias-corrected root, Keras to the raw one: the same after the first few thousand steps).

Training is ``bnnjax.train.fit_stream``: data-parallel over all devices (the global ``--batch-size`` is
split over them; each host reads its share), a JSON line per ``--log-every`` steps in
``workdir/log.jsonl``, an orbax checkpoint (state + input position) every ``--checkpoint-every``
steps, evaluation every ``--eval-every`` steps on the validation split (``--val-dir``, or
``DATA_DIR/val``/``validation`` or tfds ``imagenet2012`` under ``--data-dir``). Re-running with the same
``--workdir`` resumes at the last checkpoint, at the exact next sample. At the end the trained variables
go to ``workdir/variables.msgpack`` (evaluate them with ``zoo_eval.py --weights
workdir/variables.msgpack``), the result to ``workdir/result.json`` and one JSON line to stdout.

``--data-dir`` is read as ``zoo_eval.py`` reads it (``DIR/train/<wnid>/...``, tfds ``imagenet2012``, or
``DIR/<class>/...`` itself). Smoke-test knobs: ``--image-size`` (e.g. 32), ``--steps``, ``--num-classes``
(default: the training folders' count), and for the QuickNet family ``--section-blocks`` /
``--section-filters`` (e.g. ``1,1`` and ``16,32``) for a tiny network.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import serialization

import bnnjax
from bnnjax import datasets, experiment, pipeline, train, zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_eval  # noqa: E402  (open_split and View: the data layout both scripts read)


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run; None means the model's recipe's value."""

    model: str = "QuickNet"
    data_dir: str | None = None
    val_dir: str | None = None
    recipe: str | None = None  # None: larq-zoo's for this model when it has one, else "generic"
    image_size: int = 224
    batch_size: int | None = None  # global, split over all devices
    epochs: int | None = None
    steps: int | None = None  # total optimizer steps, instead of epochs
    learning_rate: float | None = None  # the recipe's (binary kernels' for QuickNet) peak/initial rate
    other_learning_rate: float | None = None  # QuickNet: SGD's peak rate for the rest (others: unused)
    warmup_epochs: float | None = None  # QuickNet and generic recipes: 5
    seed: int = 0
    checkpoint_every: int = 1000
    eval_every: int | None = None
    log_every: int = 100
    eval_batch_size: int | None = None  # default: --batch-size
    steps_per_call: int = 1
    workers: int = 4
    resume: bool = True
    progress: bool = True
    num_classes: int | None = None
    section_blocks: tuple[int, ...] | None = None
    section_filters: tuple[int, ...] | None = None


# --- recipes ---------------------------------------------------------------------------------------

def cosine_decay_with_warmup(peak: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
    """larq-zoo's ``CosineDecayWithWarmup``: linear from 0 at step 0 to ``peak`` at step ``warmup_steps - 1``,
    then cosine decay from ``peak`` to 0 over ``decay_steps - warmup_steps - 1`` steps (no warm-up when
    ``warmup_steps < 2``)."""
    if warmup_steps < 2:
        return optax.cosine_decay_schedule(peak, max(decay_steps - 1, 1))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps - 1),
                                 optax.cosine_decay_schedule(peak, max(decay_steps - warmup_steps - 1, 1))],
                                [warmup_steps])


def _cosine_warmup(lr, warmup_steps, steps_per_epoch, total_steps):
    return cosine_decay_with_warmup(lr, warmup_steps, total_steps)


def _linear_to_zero(lr, warmup_steps, steps_per_epoch, total_steps):
    return optax.linear_schedule(lr, 0.0, total_steps)  # Keras' PolynomialDecay(lr, total, end=0, power=1)


def _per_epoch(rate: Callable):
    """Keras' ``LearningRateScheduler``: ``rate(lr, epoch)`` for the 0-based epoch ``step // steps_per_epoch``."""
    def schedule(lr, warmup_steps, steps_per_epoch, total_steps):
        return lambda step: rate(lr, step // steps_per_epoch)

    return schedule


def _epoch_steps(bounds, factors):
    """``lr * factors[i]`` from epoch ``bounds[i - 1]`` on (``factors[0]`` before ``bounds[0]``)."""
    return _per_epoch(lambda lr, epoch: lr * jnp.asarray(factors, jnp.float32)[jnp.sum(epoch >= jnp.asarray(bounds))])


def _dorefanet_rate(lr, epoch):
    fast = lr * 0.2 * 0.2 * 0.1 ** ((epoch - 82) // 2 + 1)
    return jnp.where(epoch < 60, lr, jnp.where(epoch < 75, lr * 0.2, jnp.where(epoch < 82, lr * 0.2 * 0.2, fast)))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe (:func:`make_optimizer` builds its optax transform).

    Attributes:
      source: where it comes from.
      batch_size: global batch.
      epochs: length of the run.
      learning_rate: the peak (warm-up schedules) or initial rate of the (binary kernels') Adam.
      schedule: ``schedule(lr, warmup_steps, steps_per_epoch, total_steps) -> optax schedule``.
      adam_eps: Adam's epsilon (Keras' default 1e-7 unless larq-zoo sets it).
      other_learning_rate: when set, Larq's CaseOptimizer: Adam for the binary kernels, Keras' SGD with
        momentum 0.9 (same schedule, this peak) for every other parameter.
      warmup_epochs: linear warm-up of the cosine schedules.
      kernel_l2: Keras' ``l2(c)`` on every conv and dense kernel (``c * sum(w**2)`` added to the loss).
      clip: clip binary kernels to the model family's ``CLIP_VALUE`` (larq-zoo's ``WeightClip``).
    """

    source: str
    batch_size: int
    epochs: int
    learning_rate: float
    schedule: Callable
    adam_eps: float = 1e-7
    other_learning_rate: float | None = None
    warmup_epochs: float = 0
    kernel_l2: float = 0.0
    clip: bool = True


_QUICKNET = Recipe("larq-zoo sota_experiments.TrainQuickNet", 2048, 600, 1e-2, _cosine_warmup,
                   other_learning_rate=0.1, warmup_epochs=5)
_DENSENET = "larq-zoo basic_experiments.TrainBinaryDenseNet"
RECIPES: dict[str, Recipe] = {
    "QuickNet": _QUICKNET,
    "QuickNetSmall": dataclasses.replace(_QUICKNET, source="larq-zoo sota_experiments.TrainQuickNetSmall"),
    "QuickNetLarge": dataclasses.replace(_QUICKNET, source="larq-zoo sota_experiments.TrainQuickNetLarge"),
    "BiRealNet": Recipe("larq-zoo basic_experiments.TrainBiRealNet", 512, 300, 5e-3, _linear_to_zero),
    "BinaryResNetE18": Recipe("larq-zoo basic_experiments.TrainBinaryResNetE18", 1024, 120, 4e-3,
                              _epoch_steps((70, 90, 110), (1, 0.3, 0.3 ** 2, 0.3 ** 3)), adam_eps=1e-8),
    "BinaryDenseNet28": Recipe(_DENSENET + "28", 256, 120, 4e-3, _epoch_steps((100, 110), (1, 0.1, 0.01)),
                               adam_eps=1e-8),
    "BinaryDenseNet37": Recipe(_DENSENET + "37", 192, 120, 4e-3, _epoch_steps((100, 110), (1, 0.1, 0.01)),
                               adam_eps=1e-8),
    "BinaryDenseNet37Dilated": Recipe(_DENSENET + "37Dilated", 256, 80, 4e-3,
                                      _epoch_steps((60, 70), (1, 0.1, 0.01)), adam_eps=1e-8),
    "BinaryDenseNet45": Recipe(_DENSENET + "45", 384, 125, 8e-3, _epoch_steps((80, 100), (1, 0.1, 0.01)),
                               adam_eps=1e-8),
    "XNORNet": Recipe("larq-zoo basic_experiments.TrainXNORNet", 1200, 100, 1e-3,
                      _epoch_steps((19, 30, 44, 53, 66, 76, 86),
                                   (1, 0.5, 0.1, 0.1 * 0.5, 0.01, 0.01 * 0.5, 0.01 * 0.1, 0.001 * 0.1)),
                      kernel_l2=zoo.xnornet.KERNEL_L2),
    "DoReFaNet": Recipe("larq-zoo basic_experiments.TrainDoReFaNet", 256, 90, 2e-4, _per_epoch(_dorefanet_rate),
                        adam_eps=1e-5, clip=False),
    "BinaryAlexNet": Recipe("larq-zoo basic_experiments.TrainBinaryAlexNet", 512, 150, 1e-2,
                            _per_epoch(lambda lr, epoch: lr * 0.5 ** (epoch // 10))),
}
GENERIC = Recipe("generic (bnnjax): Adam, 5-epoch warm-up, cosine decay", 256, 120, 2e-3, _cosine_warmup,
                 warmup_epochs=5)


def recipe_for(config: Config) -> Recipe:
    """The recipe ``config`` asks for (``config.recipe``: None, ``"larq-zoo"`` or ``"generic"``).

    Raises:
      ValueError: an unknown recipe name, or ``"larq-zoo"`` for a model larq-zoo has none for.
    """
    if config.recipe not in (None, "larq-zoo", "generic"):
        raise ValueError(f"recipe must be 'larq-zoo' or 'generic' (default: larq-zoo's where it has one), "
                         f"got {config.recipe!r}.")
    if config.recipe == "generic" or (config.recipe is None and config.model not in RECIPES):
        return GENERIC
    if config.model not in RECIPES:
        raise ValueError(f"larq-zoo has no training recipe for {config.model} here; use --recipe generic.")
    return RECIPES[config.model]


def _adam(learning_rate, eps):
    # inject_hyperparams: the current rate is in the optimizer state, so fit_stream logs it
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, eps=eps)


def _keras_sgd(learning_rate, momentum):
    """Keras' SGD with momentum: ``v = momentum * v - lr * g; w += v``."""
    return optax.chain(optax.scale_by_learning_rate(learning_rate), optax.trace(decay=momentum))


def _kernel_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params,
                                            is_leaf=lambda x: isinstance(x, bnnjax.layers.QuantParam))


@functools.lru_cache(maxsize=16)
def make_optimizer(recipe: Recipe, learning_rate: float, other_learning_rate: float | None, warmup_epochs: float,
                   steps_per_epoch: int, total_steps: int, clip_value: float | None) -> optax.GradientTransformation:
    """The optax transform of ``recipe`` at these rates and lengths (cached: the transform is part of the
    train state's static structure, so a resumed run in the same process reuses the compiled steps).

    ``clip_value``: the model family's ``CLIP_VALUE`` (None: no clipping)."""
    warmup = int(round(warmup_epochs * steps_per_epoch))
    schedule = lambda lr: recipe.schedule(lr, warmup, steps_per_epoch, total_steps)  # noqa: E731
    tx = _adam(schedule(learning_rate), recipe.adam_eps)
    if recipe.kernel_l2:
        # Keras' l2(c) adds c * sum(w**2) to the loss: gradient 2 c w, before Adam
        tx = optax.chain(optax.add_decayed_weights(2 * recipe.kernel_l2, mask=_kernel_mask), tx)
    if other_learning_rate is not None:
        other = optax.inject_hyperparams(_keras_sgd)(learning_rate=schedule(other_learning_rate), momentum=0.9)
        tx = bnnjax.case_optimizer(tx, other)
    if recipe.clip and clip_value:
        tx = optax.chain(tx, bnnjax.weight_clip(clip_value))
    return tx


# --- training --------------------------------------------------------------------------------------

def _model(config: Config, num_classes: int):
    if config.model not in zoo.MODELS:
        raise ValueError(f"unknown zoo model {config.model!r}; choose one of {zoo.names()}.")
    cls = zoo.MODELS[config.model]
    fields = {k: v for k in ("section_blocks", "section_filters") if (v := getattr(config, k)) is not None}
    names = {f.name for f in dataclasses.fields(cls)}
    for k in fields:
        if k not in names:
            raise ValueError(f"--{k.replace('_', '-')} is a field of the QuickNet family only; "
                             f"{config.model} has none.")
    return cls(num_classes=num_classes, classifier_activation=None, **fields), fields


def _validation(config: Config):
    if config.val_dir is not None:
        return zoo_eval.open_split(config.val_dir, "validation")
    root = Path(config.data_dir)
    if any((root / d).is_dir() for d in ("imagenet2012", "val", "validation")):
        return zoo_eval.open_split(root, "validation")
    return None


def train_and_evaluate(config: Config, workdir: str, *, stop_after_step: int | None = None,
                       print_fn: Callable[[str], Any] = print) -> dict:
    """Train ``config.model`` with its recipe under ``workdir`` (resuming there); returns the result dict.

    The result (``workdir/result.json``, printed as one JSON line): ``experiment``, ``model``,
    ``recipe``, ``steps``, ``epochs`` (steps / steps per epoch), ``batch_size``, ``image_size``,
    ``num_classes``, ``train_loss``/``train_accuracy`` (the last log row's), ``test_accuracy`` (the last
    evaluation, when there is a validation split), ``seconds`` (this invocation), ``devices``, ``backend``.
    With ``stop_after_step`` (tests: a killed run) it returns after that step with ``"stopped": True``
    and writes no variables.

    Raises:
      FileNotFoundError, ValueError, bnnjax.datasets.DataError, ImportError: bad data directory, model,
        recipe, batch size or image.
    """
    recipe = recipe_for(config)
    source = zoo_eval.open_split(config.data_dir, "train")
    classes = getattr(source, "classes", None)
    num_classes = config.num_classes or (len(classes) if classes else 1000)
    model, fields = _model(config, num_classes)
    devices = jax.device_count()
    batch = config.batch_size or recipe.batch_size
    if batch % devices:
        raise ValueError(f"--batch-size {batch} must be a multiple of the {devices} devices.")
    spe = max(1, len(source) // batch)  # larq-zoo's steps_per_epoch
    steps = config.steps or (config.epochs or recipe.epochs) * spe
    clip = getattr(sys.modules[type(model).__module__], "CLIP_VALUE", None)
    lr = config.learning_rate or recipe.learning_rate
    other_lr = config.other_learning_rate or recipe.other_learning_rate
    warmup = config.warmup_epochs if config.warmup_epochs is not None else recipe.warmup_epochs
    tx = make_optimizer(recipe, lr, other_lr if recipe.other_learning_rate is not None else None, warmup, spe,
                        steps, clip if recipe.clip else None)
    size = config.image_size
    with warnings.catch_warnings():
        if not (recipe.clip and clip):  # DoReFaNet: larq-zoo trains its scaled kernels unclipped, on purpose
            warnings.filterwarnings("ignore", "binary kernels are trained without weight clipping")
        state = train.create_train_state(model, tx, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                                         seed=config.seed)
    host = jax.process_count()
    stream = pipeline.train_loader(source, batch // host, image_size=size, seed=config.seed,
                                   num_workers=config.workers)
    val = _validation(config)
    eval_data = None if val is None else pipeline.eval_loader(
        val, (config.eval_batch_size or batch) // host, image_size=size, num_workers=config.workers)
    header = {"model": config.model, "recipe": recipe.source, "steps": steps, "steps_per_epoch": spe,
              "batch_size": batch, "learning_rate": lr, "image_size": size, "num_classes": num_classes,
              "train_images": len(source), "devices": devices}
    print_fn(json.dumps({"config": header}))
    t0 = time.perf_counter()
    state, history = train.fit_stream(
        state, stream, steps=steps, preprocess=pipeline.normalize, eval_data=eval_data,
        eval_every=config.eval_every, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
        workdir=workdir, resume=config.resume, steps_per_call=config.steps_per_call, progress=config.progress,
        log_fn=lambda row: print_fn(json.dumps(row)), stop_after_step=stop_after_step)
    last = history[-1] if history else {}
    evals = [r for r in history if "test_accuracy" in r]
    result = {"experiment": "zoo_train", "model": config.model, "recipe": recipe.source, "steps": int(state.step),
              "epochs": round(int(state.step) / spe, 3), "batch_size": batch, "image_size": size,
              "num_classes": num_classes, "train_loss": last.get("train_loss"),
              "train_accuracy": last.get("train_accuracy"),
              "test_accuracy": evals[-1]["test_accuracy"] if evals else None,
              "seconds": round(time.perf_counter() - t0, 2), "devices": devices, "backend": jax.default_backend()}
    out = Path(workdir)
    if stop_after_step is not None and int(state.step) < steps:
        result["stopped"] = True
    elif jax.process_index() == 0:
        variables = {**state.extra_variables, "params": state.params, "batch_stats": state.batch_stats}
        (out / "variables.msgpack").write_bytes(serialization.to_bytes(jax.device_get(variables)))
        (out / "model.json").write_text(json.dumps({"model": config.model, "num_classes": num_classes,
                                                    "image_size": size, "fields": fields}) + "\n")
        (out / "result.json").write_text(json.dumps(result) + "\n")
    if jax.process_index() == 0:
        print_fn(json.dumps(result))
    return result


def _cli_run(config: Config, workdir: str) -> dict:
    try:
        return train_and_evaluate(config, workdir)
    except (datasets.DataError, OSError, ValueError, ImportError) as e:
        experiment.fail(str(e))  # the message says what to do; a traceback would bury it


def main(argv=None) -> dict:
    return experiment.cli(Config, _cli_run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
