"""Input-pipeline benchmark: images/s of the streaming train pipeline next to a QuickNet training step.

Generates an ImageFolder of JPEGs in a temporary directory (ImageNet-like: about 500x375, ~100 KB),
then prints one JSON line per figure:

- ``input_per_image``: one image's cost in this process, split into JPEG decode and random crop +
  TF1 bicubic resize + flip (single-threaded, median over the images);
- ``input_pipeline``: images/s of ``pipeline.train_loader`` alone (decode + augmentation at
  ``--image-size``, ``--workers`` processes), worker start-up excluded and reported separately;
- ``train_step``: seconds per training step of ``bnnjax.zoo.QuickNet`` (1000 classes, Adam + weight
  clipping, uint8 batches normalized on the device) at ``--batch-size``, compilation excluded;
- ``input_vs_compute``: which of the two bounds training here. Both were measured alone; in a real run
  they share the machine's cores, so the slower one is a bound, not a prediction.

    python experiments/bench_input.py [--images 256] [--batch-size 32] [--workers 2] [--image-size 224]
        [--threads 2] [--steps 3] [--data-dir IMAGEFOLDER] [--skip-train]
"""
import argparse
import itertools
import json
import os
import tempfile
import time

import jax
import numpy as np
import optax
from PIL import Image

import bnnjax
from bnnjax import pipeline, train

_SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 400), (640, 480)]  # (width, height)


def make_jpeg_folder(root: str, n: int, classes: int = 8, seed: int = 0) -> str:
    """``n`` JPEGs (quality 90, ~110 KiB like ImageNet's average) in ``classes`` folders: smooth random
    images with pixel noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = _SIZES[i % len(_SIZES)]
        coarse = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, np.int16) + rng.integers(-30, 31, (h, w, 3))
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)
    return root


def per_image(source, image_size: int, k: int = 64) -> dict:
    decode, augment = [], []
    for i in range(min(k, len(source))):
        data = source[i]["image"]
        t0 = time.perf_counter()
        image = pipeline.decode_image(data)
        t1 = time.perf_counter()
        pipeline._train_image(image, image_size, 32, np.random.default_rng(i))
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        augment.append(t2 - t1)
    return {"decode_ms": round(1e3 * float(np.median(decode)), 2), "augment_ms": round(1e3 * float(np.median(augment)), 2)}


def pipeline_rate(source, a) -> dict:
    t0 = time.perf_counter()
    it = pipeline.train_loader(source, a.batch_size, image_size=a.image_size, num_workers=a.workers,
                               num_threads=a.threads, seed=0)
    next(it)  # starts the workers and fills their buffers
    startup = time.perf_counter() - t0
    batches = max(1, a.images // a.batch_size)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    it.close()
    return {"images_per_second": round(batches * a.batch_size / seconds, 1), "startup_seconds": round(startup, 2),
            "timed_images": batches * a.batch_size}


def quicknet():
    try:
        from bnnjax.zoo import QuickNet
    except ImportError as e:
        raise SystemExit(f"bench_input: bnnjax.zoo.QuickNet is not importable ({e}); the train-step figure needs "
                         "it (pass --skip-train to time the input pipeline alone).") from e
    try:
        return QuickNet(num_classes=1000, classifier_activation=None)  # logits for the cross-entropy
    except TypeError:
        return QuickNet(num_classes=1000)


def train_step_time(a) -> dict:
    model = quicknet()
    tx = optax.chain(optax.adam(1e-3), bnnjax.weight_clip(1.25))  # larq-zoo clips QuickNet's kernels at 1.25
    state = train.create_train_state(model, tx, np.zeros((1, a.image_size, a.image_size, 3), np.float32))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (a.batch_size, a.image_size, a.image_size, 3), dtype=np.uint8),
             "label": rng.integers(0, 1000, a.batch_size).astype(np.int32)}
    # fit_stream's own path (host batch -> global array -> compiled step), one log row per step; the
    # first row includes compilation
    _, rows = train.fit_stream(state, itertools.repeat(batch), steps=1 + a.steps, preprocess=pipeline.normalize,
                               log_every=1, progress=False)
    times = [r["seconds"] for r in rows[1:]]
    sec = float(np.median(times))
    return {"seconds_per_step": round(sec, 3), "step_seconds": [round(t, 3) for t in times],
            "images_per_second": round(a.batch_size / sec, 1), "first_step_seconds": round(rows[0]["seconds"], 1),
            "binary_gradients": bnnjax.ops.binary_gradient_precision()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="JPEGs generated (and images timed)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--threads", type=int, default=2, help="reading threads per process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--data-dir", default=None, help="an existing ImageFolder instead of generated JPEGs")
    p.add_argument("--skip-train", action="store_true", help="time the input pipeline only")
    a = p.parse_args(argv)
    common = {"batch_size": a.batch_size, "image_size": a.image_size, "cpus": os.cpu_count(),
              "backend": jax.default_backend()}
    if not a.skip_train:
        quicknet()  # fail before the slow part when the model is missing
    with tempfile.TemporaryDirectory() as tmp:
        root = a.data_dir or make_jpeg_folder(tmp, a.images)
        source = pipeline.ImageFolder(root)
        sizes = [os.path.getsize(source.path(i)) for i in range(len(source))]
        print(json.dumps({"benchmark": "input_per_image", **per_image(source, a.image_size),
                          "mean_file_kib": round(float(np.mean(sizes)) / 1024, 1), **common}), flush=True)
        rate = pipeline_rate(source, a)
        print(json.dumps({"benchmark": "input_pipeline", **rate, "workers": a.workers, "threads": a.threads,
                          "images": len(source), **common}), flush=True)
    if a.skip_train:
        return
    step = train_step_time(a)
    print(json.dumps({"benchmark": "train_step", "model": "QuickNet", **step, **common}), flush=True)
    ratio = rate["images_per_second"] / step["images_per_second"]
    print(json.dumps({"benchmark": "input_vs_compute", "input_images_per_second": rate["images_per_second"],
                      "train_images_per_second": step["images_per_second"], "input_over_train": round(ratio, 2),
                      "bound": "compute" if ratio >= 1 else "input", **common}), flush=True)


if __name__ == "__main__":
    main()
