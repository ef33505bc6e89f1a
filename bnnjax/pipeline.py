"""Streaming input pipeline: image folders and tfds records to augmented uint8 batches, per host.

For datasets that do not fit in memory (ImageNet). Built on grain (deterministic, multi-worker,
checkpointable iterators); it knows images and labels, never models.

Sources (random access: ``len(source)``, ``source[i] -> {"image": encoded bytes or uint8 array,
"label": int}``):

- :class:`ImageFolder`: ``root/<class>/<image>`` (ImageNet's ``train/`` and ``val/``); the class index
  is the position of the folder name in sorted order, ImageNet's standard label order.
- :class:`TfdsSource`: ``tfds.data_source`` records (array_record, random access, no TensorFlow).

Loaders: :func:`train_loader` (an endless, shuffled, augmented stream of full batches; a grain
iterator with ``get_state``/``set_state``, so a checkpoint can resume it mid-epoch at the exact next
sample) and :func:`eval_loader` (one pass, larq-zoo's center crop, every image exactly once with a
``mask`` marking the padding of the last batch). Both yield numpy batches ``{"image": uint8 (B, H, W,
3), "label": int32 (B,)}`` for this host; :func:`global_batch` assembles the global array over the
mesh with ``jax.make_array_from_process_local_data`` and :func:`normalize` applies ImageNet's mean/std
on the device, so that one byte per pixel crosses the host-device link.

Preprocessing is larq-zoo's (``larq_zoo/training/data.py``): evaluation center-crops a square of side
``int(size / (size + crop_padding) * min(h, w))`` and resizes it with TF1's legacy bicubic resize
(:func:`resize_bicubic_tf1`, ``tf.compat.v1.image.resize_bicubic``'s float32 arithmetic in its order);
training samples a crop like ``tf.image.sample_distorted_bounding_box`` (area 0.08-1 of the image, at
least 10 % covered, aspect 3/4-4/3, 10 attempts, else the center crop), resizes it the same way and
flips it with probability 1/2. The batches are uint8: for the same decoded pixels, rounding the
resized float image and clipping it to [0, 255] (bicubic overshoots) is the only difference from
larq-zoo's float evaluation pipeline. What is not the same: the JPEG decoder (Pillow's libjpeg-turbo,
not TensorFlow's) and the training crops' random numbers (numpy's generator; TensorFlow's sampling
distribution). Random choices come from a generator seeded by ``(seed, epoch, record index)``, so they
do not depend on the worker count, the batch size or where a run was resumed.

Hosts: process ``i`` of ``n`` reads records ``i, i + n, i + 2n, ...`` (:func:`shard_indices`); one
process is the case ``(0, 1)`` of the same code.

Bad input: a file that cannot be read or decoded raises :class:`CorruptImageError` naming it; with
``skip_corrupt=True`` it is left out of its batch (the batch is filled from the next records),
logged (logger ``bnnjax.pipeline``) and counted in the iterator's ``skipped`` attribute (kept in its
checkpointed state).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

__all__ = ["ImageFolder", "TfdsSource", "CorruptImageError", "train_loader", "eval_loader", "global_batch",
           "normalize", "resize_bicubic_tf1", "center_crop_box", "center_crop_resize", "random_crop_box",
           "decode_image", "shard_indices", "IMAGE_EXTENSIONS", "MEAN_RGB", "STDDEV_RGB"]

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

_log = logging.getLogger(__name__)


class CorruptImageError(ValueError):
    """An image cannot be read or decoded; the message names the file or record."""


# --- sources --------------------------------------------------------------------------------------

class ImageFolder:
    """Random-access source over an ImageFolder directory: ``root/<class name>/<image file>``.

    Class folders are the non-hidden subdirectories of ``root``; the label of a class is its position
    in the sorted folder names (ImageNet's synset folders sort into the standard label order). Images
    are the files with an extension in :data:`IMAGE_EXTENSIONS` (any case) anywhere below a class
    folder, in sorted order; other files are ignored. Records are ``{"image": the file's bytes,
    "label": int}``; reading and decoding happen in the loader's workers.

    Args:
      root: the directory (e.g. ImageNet's ``train/`` or ``val/``).

    Raises:
      FileNotFoundError: ``root`` is not a directory.
      ValueError: no class folders, or a class folder without images (names the folder).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such directory; an ImageFolder is root/<class>/<image> "
                                    "(e.g. ImageNet's train/ with one folder per synset).")
        with os.scandir(self.root) as entries:
            self.classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"{self.root}: no class folders; expected root/<class>/<image> with one folder "
                             "per class.")
        files, labels = [], []
        for label, name in enumerate(self.classes):
            found = sorted(_image_files(self.root / name))
            if not found:
                raise ValueError(f"{self.root / name}: empty class folder (no {'/'.join(sorted(IMAGE_EXTENSIONS))} "
                                 "files); add its images or remove the folder — every folder is a class and "
                                 "shifts the labels of the folders after it.")
            files += [os.path.join(name, f) for f in found]
            labels += [label] * len(found)
        # bytes in one numpy array: pickles to the worker processes as a single buffer (1.28 M paths)
        self._files = np.array([os.fsencode(f) for f in files])
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.path(index).read_bytes(), "label": int(self._labels[index])}

    def path(self, index: int) -> Path:
        """The file of record ``index``."""
        return self.root / os.fsdecode(self._files[index])

    def describe(self, index: int) -> str:
        """How errors name record ``index``: its path."""
        return str(self.path(index))

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}: {len(self)} images, {len(self.classes)} classes)"


def _image_files(directory: Path):
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, directory)
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                yield f if rel == "." else os.path.join(rel, f)


class TfdsSource:
    """Random-access source over a prepared tensorflow-datasets split (``tfds.data_source``).

    The dataset must have been prepared in a random-access format (array_record or parquet), e.g.
    ``tfds build imagenet2012 --file_format=array_record``; TensorFlow is not needed to read it. The
    image feature is read undecoded (``tfds.decode.SkipDecoding``) and decoded by the loader like a file.
    tensorflow-datasets is imported on first use, and each worker process opens the records itself.

    Args:
      name: the tfds name, e.g. ``"imagenet2012"`` (``"name/config:version"`` works too).
      split: e.g. ``"train"``, ``"validation"``, ``"train[:10%]"``.
      data_dir: where it was prepared (default: tfds' own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      image_key: the image feature.
      label_key: the label feature.

    Raises:
      ImportError: tensorflow-datasets is not installed.
      ValueError: unknown dataset or split, or a format without random access; the message says what to do.
      FileNotFoundError: the dataset is known but not prepared in ``data_dir``.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                 image_key: str = "image", label_key: str = "label"):
        self.name, self.split, self.data_dir = name, split, None if data_dir is None else str(data_dir)
        self.image_key, self.label_key = image_key, label_key
        tfds = _import_tfds()
        try:
            builder = tfds.builder(name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(f"unknown tfds dataset {name!r}: tensorflow-datasets has no builder of that name and "
                             f"none is prepared under data_dir={self.data_dir!r}. Check the spelling (e.g. "
                             "'imagenet2012'; tfds.list_builders() lists them) or pass the data_dir it was "
                             "prepared in.") from e
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once with "
                f"`tfds build {name.split(':')[0]} --file_format=array_record"
                + (f" --data_dir={self.data_dir}`" if self.data_dir else "`")
                + " (ImageNet: first put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                  "<data_dir>/downloads/manual), or pass the data_dir where it is prepared.")
        fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        if fmt not in ("array_record", "parquet"):
            raise ValueError(f"tfds dataset {name!r} in {builder.data_dir} is stored as {fmt}, which has no random "
                             f"access; prepare it again with `tfds build {name.split(':')[0]} "
                             "--file_format=array_record` (in another data_dir, or after deleting this copy).")
        if split.split("[")[0] not in builder.info.splits:
            raise ValueError(f"tfds dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}.")
        feature = builder.info.features[label_key] if label_key in builder.info.features else None
        self.classes = list(getattr(feature, "names", None) or []) or None
        self._len = len(self._open())

    def _open(self):
        if getattr(self, "_source", None) is None:
            tfds = _import_tfds()
            self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                                            decoders={self.image_key: tfds.decode.SkipDecoding()})
        return self._source

    def __getstate__(self):
        # open record readers do not cross process boundaries: each worker reopens the files
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        record = self._open()[int(index)]
        return {"image": record[self.image_key], "label": int(record[self.label_key])}

    def describe(self, index: int) -> str:
        """How errors name record ``index``: ``name/split[index]``."""
        return f"tfds {self.name}/{self.split}[{index}]"

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}: {len(self)} records)"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # optional: only TfdsSource needs it
    except ImportError as e:
        raise ImportError("TfdsSource needs tensorflow-datasets: pip install 'bnnjax[data]' "
                          "(TensorFlow itself is not needed).") from e
    return tfds


# --- decoding and geometry -------------------------------------------------------------------------

def decode_image(data, name: str = "image") -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, ...) with Pillow, or check a decoded one, to uint8 RGB (H, W, 3).

    Grayscale, CMYK, palette and RGBA images are converted to RGB (alpha is dropped, like TensorFlow's
    ``decode_*(channels=3)``). EXIF orientation is ignored, as TensorFlow does. Decoding is full size
    (no ``Image.draft``), so pixels are the decoder's exact output.

    Args:
      data: encoded bytes, or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
      name: the file or record, for error messages.

    Raises:
      CorruptImageError: not decodable (truncated, not an image, unsupported); names ``name``.
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (1, 3, 4)):
            raise CorruptImageError(f"{name}: expected a uint8 image (H, W[, 1|3|4]), got {data.dtype} {data.shape}.")
        if data.ndim == 2:
            data = data[..., None]
        return np.repeat(data, 3, axis=2) if data.shape[2] == 1 else data[..., :3]
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.mode == "P" or "transparency" in im.info:
                im = im.convert("RGBA")  # Pillow's advice for transparency; RGBA -> RGB below drops alpha
            if im.mode != "RGB":
                im = im.convert("RGB")
            array = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{name}: cannot decode the image ({type(e).__name__}: {e}); the file is corrupt, "
                                "truncated or not an image — replace or delete it, or pass skip_corrupt=True "
                                "to skip such files.") from e
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise CorruptImageError(f"{name}: decoded to shape {array.shape}, not an RGB image.")
    return array


_TABLE_SIZE = 1024  # TF's legacy bicubic kernel is tabulated at 1/1024 steps of the fractional offset


@functools.lru_cache(maxsize=1)
def _cubic_table() -> np.ndarray:
    # TF's InitCoeffsTable(a=-0.75): x in float32, the polynomial in double, stored as float32
    a = -0.75
    table = np.empty((_TABLE_SIZE + 1, 2), np.float32)
    for i in range(_TABLE_SIZE + 1):
        x = float(np.float32(i / _TABLE_SIZE))
        table[i, 0] = ((a + 2) * x - (a + 3)) * x * x + 1
        x = float(np.float32(x) + np.float32(1.0))
        table[i, 1] = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return table


@functools.lru_cache(maxsize=4096)
def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """TF1's bicubic interpolation along one axis: (n_out, 4) source indices and float32 weights (cached)."""
    table = _cubic_table()
    scale = np.float32(n_in) / np.float32(n_out)  # legacy scaler: source = dst * in / out, in float32
    src = np.arange(n_out, dtype=np.float32) * scale
    lo = np.floor(src)
    offset = np.rint((src - lo) * np.float32(_TABLE_SIZE)).astype(np.int64)  # lrintf: half to even
    weights = np.stack([table[offset, 1], table[offset, 0], table[_TABLE_SIZE - offset, 0],
                        table[_TABLE_SIZE - offset, 1]], axis=1)
    taps = np.clip(lo.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)  # edges repeat
    taps.setflags(write=False)
    weights.setflags(write=False)
    return taps, weights


def _resize_rows(x: np.ndarray, n_out: int) -> np.ndarray:
    # each output row is a 4-tap weighted sum of input rows, summed in TF's order (w0 v0 + w1 v1 + ...)
    taps, weights = _resize_taps(x.shape[0], n_out)
    out = weights[:, 0, None] * x[taps[:, 0]]
    for k in range(1, 4):
        out += weights[:, k, None] * x[taps[:, k]]
    return out


def resize_bicubic_tf1(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize like TF1's ``tf.compat.v1.image.resize_bicubic`` (align_corners=False, half_pixel_centers=False).

    Output pixel ``o`` samples source coordinate ``o * in / out`` (float32) with Keys' cubic kernel
    (a = -0.75) over the 4 nearest source pixels, indices clamped at the edges; like TF, the kernel is
    read from a table at 1/1024 steps of the fractional offset. Separable, rows then columns as TF
    does: along each axis the (out, in) interpolation matrix is applied through its 4 nonzeros per row
    (cached indices and weights; a dense matrix product does ~50x the work), with TF's float32
    operations in TF's order: the output equaled TF 2.19's bit for bit on every image compared (sizes
    3 to 500, up- and downscaling). A size equal to the input's returns the input unchanged.

    Args:
      image: (H, W, C) array (any real dtype).
      size: output ``(height, width)`` or one int for a square.

    Returns:
      float32 (height, width, C), not clipped (bicubic overshoots the input range).
    """
    oh, ow = (size, size) if isinstance(size, int) else size
    h, w, c = image.shape
    x = _resize_rows(np.asarray(image, np.float32).reshape(h, w * c), oh)
    x = _resize_rows(x.reshape(oh, w, c).transpose(1, 0, 2).reshape(w, oh * c), ow)
    return np.ascontiguousarray(x.reshape(ow, oh, c).transpose(1, 0, 2))


def center_crop_box(height: int, width: int, size: int = 224, crop_padding: int = 32) -> tuple[int, int, int, int]:
    """larq-zoo's evaluation crop ``(top, left, side, side)``: a centered square of side
    ``int(size / (size + crop_padding) * min(height, width))`` at offset ``((h - side) + 1) // 2``."""
    side = int(np.float32(size / (size + crop_padding)) * np.float32(min(height, width)))
    side = max(side, 1)
    return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


def center_crop_resize(image: np.ndarray, size: int = 224, crop_padding: int = 32) -> np.ndarray:
    """larq-zoo's evaluation geometry: :func:`center_crop_box`, then :func:`resize_bicubic_tf1` to (size, size).

    This is larq-zoo's ``preprocess_input`` / eval pipeline before its mean/std step (apply
    :func:`normalize` for that).

    Args:
      image: uint8 (H, W, 3).
      size: output side.
      crop_padding: larq-zoo's 32.

    Returns:
      float32 (size, size, 3), not clipped or rounded.
    """
    top, left, h, w = center_crop_box(image.shape[0], image.shape[1], size, crop_padding)
    return resize_bicubic_tf1(image[top:top + h, left:left + w], size)


def random_crop_box(height: int, width: int, rng: np.random.Generator, *, area_range=(0.08, 1.0),
                    aspect_range=(3 / 4, 4 / 3), min_covered: float = 0.1,
                    max_attempts: int = 10) -> tuple[int, int, int, int] | None:
    """A crop ``(top, left, h, w)`` drawn like ``tf.image.sample_distorted_bounding_box`` on the whole image.

    TensorFlow's algorithm with numpy's generator: per attempt an aspect ratio (width / height) uniform
    in ``aspect_range``, a height uniform among the integers whose area fits ``area_range`` of the
    image, a width rounded from it, an offset uniform in ``[0, H - h)``; a crop covering less than
    ``min_covered`` of the image is rejected. The defaults are larq-zoo's. Same distribution as
    TensorFlow's, not the same random numbers (compared with TF 2.19 on 375x500, 100x400 and 32x32
    images: mean and spread of area, aspect, offsets and the fallback rate agree within sampling error).

    Args:
      height, width: the image's size.
      rng: the generator (the loaders seed one per image).
      area_range: crop area as fractions of the image's.
      aspect_range: crop width / height.
      min_covered: smallest fraction of the image a crop must cover (``min_object_covered``).
      max_attempts: tries before giving up.

    Returns:
      the box, or None when every attempt failed (larq-zoo then takes the center crop).
    """
    for _ in range(max_attempts):
        aspect = np.float32(rng.random() * (aspect_range[1] - aspect_range[0]) + aspect_range[0])
        min_area = np.float32(area_range[0]) * width * height
        max_area = np.float32(area_range[1]) * width * height
        h = int(np.rint(np.sqrt(min_area / aspect)))
        max_h = int(np.rint(np.sqrt(max_area / aspect)))
        if int(np.rint(max_h * aspect)) > width:
            max_h = int((width + 0.5 - 1e-7) / aspect)
            while int(np.rint(max_h * aspect)) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += int(rng.integers(max_h - h + 1))
        w = int(np.rint(h * aspect))
        area = w * h
        if area < min_area:  # TF's nudges for rounding at the area limits
            h += 1
            w = int(np.rint(h * aspect))
            area = w * h
        if area > max_area:
            h -= 1
            w = int(np.rint(h * aspect))
            area = w * h
        if not (min_area <= area <= max_area and 0 < w <= width and 0 < h <= height):
            continue
        if area < min_covered * height * width:
            continue
        top = int(rng.integers(height - h)) if h < height else 0
        left = int(rng.integers(width - w)) if w < width else 0
        return top, left, h, w
    return None


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _train_image(image: np.ndarray, size: int, crop_padding: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    box = random_crop_box(h, w, rng)
    if box is None or box[2:] == (h, w):  # larq-zoo: a failed sample (the whole image) means center crop
        out = center_crop_resize(image, size, crop_padding)
    else:
        top, left, ch, cw = box
        out = resize_bicubic_tf1(image[top:top + ch, left:left + cw], size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return _to_uint8(out)


# --- sharding and loaders --------------------------------------------------------------------------

def shard_indices(num_records: int, shard_index: int, shard_count: int, *, drop_remainder: bool) -> range:
    """The records host ``shard_index`` of ``shard_count`` reads: ``shard_index, shard_index + count, ...``.

    Shards are disjoint and cover the records; with ``drop_remainder`` every shard has
    ``num_records // shard_count`` (the last few records are never read), so hosts see the same number
    of images per epoch.

    Raises:
      ValueError: ``shard_index`` outside ``[0, shard_count)``.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard {shard_index} of {shard_count}: the index must be in [0, {shard_count}).")
    stop = num_records - num_records % shard_count if drop_remainder else num_records
    return range(shard_index, stop, shard_count)


def _shard(shard) -> tuple[int, int]:
    index, count = (jax.process_index(), jax.process_count()) if shard is None else shard
    return int(index), int(count)


def _describe(source, index: int) -> str:
    describe = getattr(source, "describe", None)
    return describe(index) if describe is not None else f"record {index} of {type(source).__name__}"


class _Load:
    """Record index -> {"image": uint8 (S, S, 3), "label": int32}, or a skip marker for a bad record.

    Runs in the worker processes (cloudpickled there with its source)."""

    def __init__(self, source, *, train: bool, image_size: int, crop_padding: int, seed: int, epoch_length: int,
                 skip_corrupt: bool):
        self.source, self.train, self.image_size, self.crop_padding = source, train, image_size, crop_padding
        self.seed, self.epoch_length, self.skip_corrupt = seed, epoch_length, skip_corrupt

    def __call__(self, position: int, index) -> dict:
        index = int(index)
        try:
            try:
                record = self.source[index]
            except OSError as e:
                raise CorruptImageError(f"{_describe(self.source, index)}: cannot read ({e}).") from e
            image = decode_image(record["image"], _describe(self.source, index))
        except CorruptImageError as e:
            if self.skip_corrupt:
                return {"skipped": str(e)}
            raise
        if self.train:
            # per (seed, epoch, record): independent of workers, batch size and resumption
            rng = np.random.default_rng([self.seed, position // self.epoch_length, index])
            out = _train_image(image, self.image_size, self.crop_padding, rng)
        else:
            out = _to_uint8(center_crop_resize(image, self.image_size, self.crop_padding))
        return {"image": out, "label": np.int32(record["label"])}


class _Batches(grain.IterDataset):
    """Stacks loaded records into batches in the consuming process, leaving out skip markers.

    Batching here rather than in the workers keeps batches independent of the worker count. With
    ``num_batches`` (evaluation) it emits exactly that many batches, padding the last ones (``mask``
    False), so every host runs the same number of evaluation steps."""

    def __init__(self, parent, batch_size: int, image_size: int, num_batches: int | None = None):
        super().__init__(parent)
        self.batch_size, self.image_size, self.num_batches = batch_size, image_size, num_batches

    def __iter__(self):
        return _BatchIterator(self._parent.__iter__(), self.batch_size, self.image_size, self.num_batches)

    def __str__(self) -> str:
        return f"_Batches(batch_size={self.batch_size}, num_batches={self.num_batches})"


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, image_size: int, num_batches: int | None):
        super().__init__(parent)
        self.batch_size, self.image_size, self.num_batches = batch_size, image_size, num_batches
        self.skipped = 0
        self._emitted = 0

    def __next__(self) -> dict:
        if self.num_batches is not None and self._emitted >= self.num_batches:
            raise StopIteration
        images, labels = [], []
        while len(images) < self.batch_size:
            try:
                element = next(self._parent)
            except StopIteration:
                if self.num_batches is None:
                    raise  # an endless training stream never gets here
                break
            if "skipped" in element:
                self.skipped += 1
                _log.warning("skipped %s (%d skipped so far)", element["skipped"], self.skipped)
                continue
            images.append(element["image"])
            labels.append(element["label"])
        self._emitted += 1
        n = len(images)
        image = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8)
        label = np.zeros((self.batch_size,), np.int32)
        if n:
            image[:n] = np.stack(images)
            label[:n] = labels
        batch = {"image": image, "label": label}
        if self.num_batches is not None:
            batch["mask"] = np.arange(self.batch_size) < n
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": self.skipped, "batches": self._emitted}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.skipped, self._emitted = int(state["skipped"]), int(state["batches"])


def _check_source(source, what: str) -> int:
    try:
        n = len(source)
    except TypeError as e:
        raise TypeError(f"{what}: the source must support len() and indexing (ImageFolder, TfdsSource), "
                        f"got {type(source).__name__}.") from e
    if n == 0:
        raise ValueError(f"{what}: the source {source!r} has no records.")
    return n


def _grain_flag_workaround():
    # grain 0.2.18 reads this absl flag when it starts workers, which raises UnparsedFlagAccessError in
    # programs that never parse absl flags (google/grain#1355, fixed upstream after 0.2.18); marking
    # the flag present, as grain does for its own debug flags, makes it read as its default (False)
    from absl import flags
    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True


def _read(ds, num_workers: int, num_threads: int, buffer: int):
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer))
    if num_workers > 0:
        _grain_flag_workaround()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=8))
    return ds


def train_loader(source, batch_size: int, *, image_size: int = 224, seed: int = 0, num_workers: int = 2,
                 num_threads: int = 2, crop_padding: int = 32, shard: tuple[int, int] | None = None,
                 skip_corrupt: bool = False) -> grain.DatasetIterator:
    """An endless stream of augmented training batches for this host, checkpointable mid-epoch.

    Each epoch reads this host's records (:func:`shard_indices` with ``drop_remainder``) in a fresh
    shuffled order (grain's index shuffle, seeded by ``seed`` and the epoch); batches run across epoch
    boundaries, so no record is dropped from the stream. Each image: decode, random crop
    (:func:`random_crop_box`, larq-zoo's center crop when sampling fails), TF1 bicubic resize to
    ``image_size``, horizontal flip with probability 1/2, rounded to uint8.

    The order, the augmentation and therefore every batch are a pure function of the source, ``seed``,
    ``batch_size`` and ``shard``, whatever ``num_workers`` and ``num_threads``. ``it.get_state()`` /
    ``it.set_state(state)`` (JSON-able dicts) resume at the exact next sample; restore into a loader
    built with the same arguments (the state records the worker layout, so keep ``num_workers``).

    Args:
      source: an :class:`ImageFolder`, :class:`TfdsSource` or any ``len()``/index source of
        ``{"image": bytes or uint8 array, "label": int}``.
      batch_size: images per batch on this host (global batch = ``batch_size * shard count``).
      image_size: output side.
      seed: shuffling and augmentation seed, in [0, 2**32).
      num_workers: decoding processes (0: decode in this process's threads).
      num_threads: reading threads per process (Pillow and numpy release the GIL while working).
      crop_padding: larq-zoo's center-crop padding (the fallback crop).
      shard: ``(process_index, process_count)``; default ``(jax.process_index(), jax.process_count())``.
      skip_corrupt: leave unreadable images out (logged, counted in ``it.skipped``) instead of raising.

    Returns:
      a grain iterator of ``{"image": uint8 (B, S, S, 3), "label": int32 (B,)}`` with ``skipped``.

    Raises:
      ValueError: empty source, or a shard with fewer images than one batch.
      CorruptImageError (while iterating): an unreadable image, naming it (unless ``skip_corrupt``).
    """
    n = _check_source(source, "train_loader")
    index, count = _shard(shard)
    records = shard_indices(n, index, count, drop_remainder=True)
    if batch_size <= 0 or len(records) < batch_size:
        raise ValueError(f"train_loader: batch_size {batch_size} but shard {index} of {count} has {len(records)} "
                         f"images ({n} in the split); use a smaller batch or more data.")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    load = _Load(source, train=True, image_size=image_size, crop_padding=crop_padding, seed=seed,
                 epoch_length=len(records), skip_corrupt=skip_corrupt)
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat().map_with_index(load)
    return iter(_Batches(_read(ds, num_workers, num_threads, 2 * batch_size), batch_size, image_size))


def eval_loader(source, batch_size: int, *, image_size: int = 224, crop_padding: int = 32, num_workers: int = 2,
                num_threads: int = 2, shard: tuple[int, int] | None = None,
                skip_corrupt: bool = False) -> grain.IterDataset:
    """This host's evaluation batches with larq-zoo's center crop: every image exactly once, in order.

    Image: decode, :func:`center_crop_resize`, rounded to uint8. Host ``i`` of ``n`` reads
    :func:`shard_indices` (no remainder dropped); every host yields ``ceil(ceil(len / n) / batch_size)``
    full-size batches, the padding rows zero with ``mask`` False, so all hosts take the same number of
    steps and metrics weighted by ``mask`` count each image once.

    Args:
      source, batch_size, image_size, crop_padding, num_workers, num_threads, shard, skip_corrupt: as
        for :func:`train_loader`.

    Returns:
      a re-iterable grain dataset; each ``iter()`` is a fresh pass whose iterator yields ``{"image":
      uint8 (B, S, S, 3), "label": int32 (B,), "mask": bool (B,)}`` and is checkpointable.

    Raises:
      ValueError: empty source or a non-positive batch size.
    """
    n = _check_source(source, "eval_loader")
    if batch_size <= 0:
        raise ValueError(f"eval_loader: batch_size must be positive, got {batch_size}.")
    index, count = _shard(shard)
    records = shard_indices(n, index, count, drop_remainder=False)
    num_batches = math.ceil(math.ceil(n / count) / batch_size)
    load = _Load(source, train=False, image_size=image_size, crop_padding=crop_padding, seed=0, epoch_length=1,
                 skip_corrupt=skip_corrupt)
    ds = grain.MapDataset.source(records).map_with_index(load)
    return _Batches(_read(ds, num_workers, num_threads, 2 * batch_size), batch_size, image_size, num_batches)


# --- devices ---------------------------------------------------------------------------------------

def global_batch(batch, mesh: Mesh | None = None, *, axis: str = "batch", batch_axis: int = 0):
    """Assemble the global arrays of a batch from every host's part (``jax.make_array_from_process_local_data``).

    Each array is sharded along ``batch_axis`` over the mesh axis ``axis``; the global batch is the
    hosts' batches concatenated in process order. With one process this is a sharded ``device_put``.

    Args:
      batch: a pytree of host arrays (e.g. a loader's batch), the same shapes on every host.
      mesh: default: a 1-D mesh named ``axis`` over all devices.
      axis: the mesh axis the batch is split over.
      batch_axis: the array axis holding the examples (1 for stacked ``(steps, batch, ...)`` chunks).

    Raises:
      ValueError: a host batch that does not split evenly over this host's devices.
    """
    mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), (axis,))
    local = mesh.local_mesh.shape[axis]

    def put(a):
        a = np.asarray(a)
        if a.shape[batch_axis] % local:
            raise ValueError(f"a host batch of {a.shape[batch_axis]} does not split over this host's {local} devices "
                             f"of mesh axis {axis!r}; use a per-host batch size divisible by {local}.")
        spec = P(*([None] * batch_axis + [axis]))
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), a)

    return jax.tree.map(put, batch)


def normalize(images) -> jax.Array:
    """uint8 images to float32 ``(x - mean) / std`` with ImageNet's RGB mean and std (times 255).

    larq-zoo's ``_normalize`` arithmetic (subtract, then divide, float32); jit it into the step so the
    conversion runs on the device.
    """
    x = jnp.asarray(images).astype(jnp.float32)
    return (x - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STDDEV_RGB, jnp.float32)
