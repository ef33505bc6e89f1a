"""Top-1/top-5 accuracy of a zoo model on ImageNet's validation split, with larq-zoo's preprocessing.

    python experiments/zoo_eval.py --model QuickNet --weights imagenet --data-dir /data/imagenet
    python experiments/zoo_eval.py --model QuickNet --weights none --data-dir DIR --limit 500   # smoke test

``--data-dir`` holds the validation split as
- tfds ``imagenet2012`` prepared there (``DIR/imagenet2012/``, array_record: ``bnnjax.pipeline.TfdsSource``),
- an ImageFolder ``DIR/val/<wnid>/*.JPEG`` (or ``DIR/validation/``), or
- an ImageFolder ``DIR/<wnid>/*.JPEG`` itself.
Folders sorted by name are the labels: ImageNet's 1000 wnids sort into the standard label order. A folder
with another number of classes (a subset of the wnids) is mapped to ImageNet's labels through the class
index (``bnnjax.zoo.load_class_index``; ``--class-index FILE`` for a local copy); with random weights
(``--weights none``) labels are used as they are.

Top-1/top-5 rank the model's logits (the softmax's order, without its float32 ties). Images go
through ``bnnjax.pipeline.eval_loader`` (larq-zoo's center crop with padding 32, TF1's bicubic
resize, uint8) and are normalized on the device (``pipeline.normalize``); batches are split over all
devices (``pipeline.global_batch``; one process per host, each reading its share). ``--limit N``
evaluates the first N images (sorted by class and file name: the first classes). ``--packed`` runs the
model on ``bnnjax.export.pack``'s bit-packed weights and folded BatchNorms instead of the float ones: the
deployed form (same predictions up to float32 rounding at a sign's threshold). ``--weights`` is ``imagenet`` (larq-zoo's released weights, downloaded once), ``none``
(random initialization), a Keras ``.h5`` file or the ``variables.msgpack`` ``zoo_train.py`` writes.

Prints a progress bar on stderr and ends with one JSON line: ``model``, ``top1``, ``top5``, ``images``,
``images_per_second`` (end to end: reading, decoding and resizing included, compilation not),
``seconds``, ``compile_seconds`` (compilation and one warm-up batch), ``weights``, ``packed``,
``image_size``, ``batch_size``, ``devices``, ``backend``. Errors (no such directory, unknown model,
missing weights, an unreadable image) are one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec as P

from bnnjax import datasets, experiment, export, pipeline, train, zoo


@dataclasses.dataclass(frozen=True)
class Config:
    """What to evaluate where; defaults: QuickNet with larq-zoo's ImageNet weights at 224x224."""

    model: str = "QuickNet"
    weights: str | None = "imagenet"  # "imagenet", None (random), or a .h5 / .msgpack file
    data_dir: str | None = None
    limit: int | None = None  # the first N images only
    batch_size: int = 256  # global; a multiple of the device count
    image_size: int = 224
    packed: bool = False
    class_index: str | None = None  # local imagenet_class_index.json for subset folders
    workers: int = 4  # decoding processes per host (0: threads of this process)
    progress: bool = True
    seed: int = 0  # random initialization of --weights none


# --- data (shared with zoo_train.py) ---------------------------------------------------------------

def open_split(data_dir, split: str):
    """The source of ``split`` ("train" or "validation") under ``data_dir``: tfds ``imagenet2012`` records
    when ``data_dir/imagenet2012/`` exists, else the ImageFolder ``data_dir/train/`` (or
    ``val/``/``validation/``) when present, else ``data_dir`` itself as an ImageFolder.

    Raises:
      FileNotFoundError: ``data_dir`` is not a directory (or the tfds split is not prepared there).
      ValueError: no class folders, an empty class folder, an unknown tfds split.
    """
    if data_dir is None:
        raise FileNotFoundError("no data directory: pass --data-dir DIR (an ImageFolder DIR/<wnid>/*.JPEG, "
                                "DIR/val/<wnid>/..., or tfds imagenet2012 prepared under DIR).")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory; --data-dir takes an ImageFolder (DIR/<wnid>/*.JPEG or "
                                "DIR/val/<wnid>/*.JPEG) or a directory where tfds imagenet2012 is prepared.")
    if (root / "imagenet2012").is_dir():
        return pipeline.TfdsSource("imagenet2012", split, root)
    for name in ("train",) if split == "train" else ("val", "validation"):
        if (root / name).is_dir():
            return pipeline.ImageFolder(root / name)
    return pipeline.ImageFolder(root)


class View:
    """The first ``limit`` records of a source (all when None), labels mapped through ``label_map``."""

    def __init__(self, source, limit: int | None = None, label_map: np.ndarray | None = None):
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be a positive number of images, got {limit}.")
        self.source, self.label_map = source, label_map
        self._len = len(source) if limit is None else min(limit, len(source))
        self.classes = getattr(source, "classes", None)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._len:
            raise IndexError(index)
        record = self.source[index]
        if self.label_map is not None:
            record = {**record, "label": int(self.label_map[record["label"]])}
        return record

    def describe(self, index: int) -> str:
        describe = getattr(self.source, "describe", None)
        return describe(index) if describe else f"record {index}"

    def __repr__(self) -> str:
        return f"View({self.source!r}, first {self._len})"


def imagenet_labels(source, num_classes: int, class_index=None) -> np.ndarray | None:
    """Folder label -> ImageNet label when ``source`` has other classes than the model's ``num_classes``
    (a subset of ImageNet's wnids), else None (labels already ImageNet's).

    Raises:
      ValueError: a class that is not an ImageNet wnid.
    """
    classes = getattr(source, "classes", None)
    if classes is None or len(classes) == num_classes:
        return None
    position = {wnid: i for i, (wnid, _) in enumerate(zoo.load_class_index(class_index))}
    unknown = [c for c in classes if c not in position]
    if unknown:
        raise ValueError(f"{source!r} has {len(classes)} classes, the model {num_classes}, and {unknown[:3]} are not "
                         "ImageNet wnids: point --data-dir at ImageNet's validation images, one folder per wnid.")
    return np.asarray([position[c] for c in classes], np.int32)


# --- model -----------------------------------------------------------------------------------------

def load_model(name: str, weights: str | None, image_size: int, seed: int = 0, **fields):
    """``(model, variables)`` of zoo model ``name``: ``zoo.load``'s weights (None, "imagenet", a Keras
    ``.h5``) or a ``.msgpack`` of Flax variables (what zoo_train.py writes), restored into the model's
    structure; a ``model.json`` beside the ``.msgpack`` (zoo_train.py's) gives the model's class count
    and fields.

    Raises:
      ValueError: unknown model, a weights value that is none of these, a ``.msgpack`` of another model.
    """
    shape = (image_size, image_size, 3)
    if weights is not None and str(weights).endswith(".msgpack"):
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: no such weights file.")
        meta = Path(weights).with_name("model.json")  # zoo_train.py's: the architecture the variables fit
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("model") != name:
                raise ValueError(f"{weights} holds {m.get('model')} (says {meta}), not {name}.")
            fields = {"num_classes": m["num_classes"],
                      **{k: tuple(v) if isinstance(v, list) else v for k, v in m.get("fields", {}).items()}, **fields}
        model, template = zoo.load(name, None, input_shape=shape, seed=seed, **fields)
        try:
            variables = serialization.from_bytes(template, Path(weights).read_bytes())
        except Exception as e:
            raise ValueError(f"{weights}: not variables of {name} at {image_size}x{image_size} "
                             f"({type(e).__name__}: {str(e)[:300]}).") from e
        return model, jax.tree.map(jnp.asarray, variables)
    return zoo.load(name, weights, input_shape=shape, seed=seed, **fields)


@functools.lru_cache(maxsize=8)
def _step(model, k: int):
    """The jitted evaluation step (cached per model: a second evaluation in the process does not compile)."""

    @jax.jit
    def step(variables, images, labels, mask):
        out = model.apply(variables, pipeline.normalize(images))
        top = jax.lax.top_k(out.astype(jnp.float32), k)[1]
        hit1 = (top[:, 0] == labels) & mask
        hitk = jnp.any(top == labels[:, None], axis=1) & mask
        return {"top1": jnp.sum(hit1), "topk": jnp.sum(hitk), "count": jnp.sum(mask)}

    return step


# --- evaluate --------------------------------------------------------------------------------------

def evaluate(config: Config, print_fn: Callable[[str], Any] = print) -> dict:
    """Evaluate ``config.model`` on the validation split under ``config.data_dir``; returns the result dict
    (also printed as one JSON line through ``print_fn``).

    Raises:
      FileNotFoundError, ValueError, bnnjax.datasets.DataError, ImportError: bad data directory, model,
        weights, batch size or image (the message says which and what to do).
    """
    from tqdm.auto import tqdm

    if config.model not in zoo.MODELS:
        raise ValueError(f"unknown zoo model {config.model!r}; choose one of {zoo.names()}.")
    devices = jax.device_count()
    if config.batch_size <= 0 or config.batch_size % devices:
        raise ValueError(f"--batch-size {config.batch_size} must be a positive multiple of the {devices} devices.")
    source = open_split(config.data_dir, "validation")
    # ranked on the logits: a softmax that saturates rounds the other classes to exact ties at 0, which
    # top_k would break by class index (random weights do this all the time)
    model, variables = load_model(config.model, config.weights, config.image_size, config.seed,
                                  classifier_activation=None)
    num_classes = model.num_classes
    label_map = imagenet_labels(source, num_classes, config.class_index) if config.weights is not None else None
    view = View(source, config.limit, label_map)
    s = config.image_size
    if config.packed:
        variables = export.pack(model, variables, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
    mesh = train.data_mesh()
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    host_batch = config.batch_size // jax.process_count()
    loader = pipeline.eval_loader(view, host_batch, image_size=config.image_size, num_workers=config.workers)

    step = _step(model, min(5, num_classes))
    t0 = time.perf_counter()  # compile (or find compiled) before the clock of the pass starts
    zeros = pipeline.global_batch((np.zeros((host_batch, s, s, 3), np.uint8), np.zeros((host_batch,), np.int32),
                                   np.zeros((host_batch,), bool)), mesh)
    jax.block_until_ready(step(variables, *zeros))
    compile_seconds = time.perf_counter() - t0

    tot = {"top1": 0, "topk": 0, "count": 0}
    bar = tqdm(total=len(view), desc=f"{config.model} eval", unit="img",
               disable=not config.progress, file=sys.stderr)
    pending = None

    def account(m):
        for key in tot:
            tot[key] += int(m[key])
        bar.update(int(m["count"]))
        seen = max(tot["count"], 1)
        bar.set_postfix(top1=f"{tot['top1'] / seen:.4f}", top5=f"{tot['topk'] / seen:.4f}")

    t0 = time.perf_counter()
    it = iter(loader)
    try:
        for batch in it:
            arrays = pipeline.global_batch((batch["image"], batch["label"], batch["mask"]), mesh)
            m = step(variables, *arrays)
            if pending is not None:
                account(pending)  # the previous batch's counts: the device works on this one meanwhile
            pending = m
        if pending is not None:
            account(pending)
    finally:
        bar.close()
        if hasattr(it, "close"):
            it.close()
    seconds = time.perf_counter() - t0
    n = tot["count"]
    result = {"model": config.model, "top1": tot["top1"] / n, "top5": tot["topk"] / n, "images": n,
              "images_per_second": round(n / seconds, 2), "seconds": round(seconds, 2),
              "compile_seconds": round(compile_seconds, 2),
              "weights": "none" if config.weights is None else str(config.weights), "packed": config.packed,
              "image_size": config.image_size, "batch_size": config.batch_size, "devices": devices,
              "backend": jax.default_backend()}
    if jax.process_index() == 0:
        print_fn(json.dumps(result))
    return result


def _weights_flag(value: str) -> str | None:
    return None if value.lower() == "none" else value


def main(argv=None) -> dict:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d.model, help=f"zoo model: {', '.join(zoo.names())}")
    p.add_argument("--weights", type=_weights_flag, default=d.weights,
                   help="imagenet (larq-zoo's, downloaded once), none (random), or a .h5 / .msgpack file")
    p.add_argument("--data-dir", default=d.data_dir, help="validation images: DIR/<wnid>/*.JPEG, DIR/val/<wnid>/..., "
                                                          "or tfds imagenet2012 prepared under DIR")
    p.add_argument("--limit", type=int, default=d.limit, help="evaluate the first N images")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (a multiple of the devices)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=d.packed,
                   help="run on bnnjax.export.pack's bit-packed weights")
    p.add_argument("--class-index", default=d.class_index, help="local imagenet_class_index.json (subset folders)")
    p.add_argument("--workers", type=int, default=d.workers, help="decoding processes per host")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    p.add_argument("--seed", type=int, default=d.seed, help="random initialization of --weights none")
    experiment.add_distributed_flags(p)
    args = vars(p.parse_args(argv))
    experiment.start_distributed(args)
    config = Config(**args)
    try:
        return evaluate(config)
    except (datasets.DataError, OSError, ValueError, ImportError, train.PeerLostError) as e:
        experiment.fail(str(e))  # the message says what is wrong and what to do; a traceback would bury it


if __name__ == "__main__":
    main()
