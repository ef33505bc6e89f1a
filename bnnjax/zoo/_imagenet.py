"""larq-zoo's ImageNet pre- and post-processing: ``preprocess_input`` and ``decode_predictions``.

``preprocess_input`` is larq-zoo's (``larq_zoo.preprocess_input``, i.e.
``larq_zoo.training.data.preprocess_input``): the center crop with crop padding 32, TF1's legacy bicubic
resize to 224x224 and ImageNet's mean/std — the geometry is :mod:`bnnjax.pipeline`'s
(:func:`~bnnjax.pipeline.center_crop_resize`, TF1's resize reproduced in float32 operation for
operation), the normalization larq-zoo's float32 ``(x - mean) / std`` with the pipeline's constants.

``decode_predictions`` is Keras' (which larq-zoo calls): the top classes of each row of a
``(N, 1000)`` prediction array as ``(wnid, name, score)``, with Keras' ImageNet class index
``imagenet_class_index.json`` (downloaded once, SHA-256 checked, cached; or a local copy).

Label order: class ``i`` of the index is the ``i``-th ImageNet synset (wnid) in sorted order — the
wnids of the index are sorted — so it is also the label :class:`bnnjax.pipeline.ImageFolder` gives a
``<wnid>/`` folder of ImageNet's 1000 and the label order of tfds' ``imagenet2012``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["preprocess_input", "decode_predictions", "load_class_index", "class_index_path", "CLASS_INDEX_URL",
           "CLASS_INDEX_SHA256"]

IMAGE_SIZE = 224  # larq-zoo's IMAGE_SIZE
CROP_PADDING = 32  # larq-zoo's CROP_PADDING

# Keras' ImageNet class index: {"0": ["n01440764", "tench"], ..., "999": ["n15075141", "toilet_tissue"]}.
CLASS_INDEX_URL = "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json"
# SHA-256 of the 35,363 bytes whose MD5 is c2c37ea517e94d9795004a39431a14cb, the digest Keras checks the
# download against (keras.applications.imagenet_utils). Computed offline: the file was rebuilt byte for
# byte (json.dumps of the 1000 sorted synsets with their first WordNet lemma, spaces as "_", from the
# synset lists timm 1.0.31 ships) and its MD5 equals Keras'. If this is ever None, downloads are refused
# and decode_predictions needs class_index=.
CLASS_INDEX_SHA256: str | None = "a1e7a966a1f601d39e4b43e119b3e7dd4a2ad3ea08cf69847cbaf021013767bc"
CLASS_INDEX_SIZE = 35363
_CLASS_INDEX_FILE = "imagenet_class_index.json"
_NUM_CLASSES = 1000


def preprocess_input(image, *, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """larq-zoo's ``preprocess_input``: center crop, TF1 bicubic resize, ImageNet mean/std, float32.

    Crops a centered square of side ``int(224 / 256 * min(H, W))`` (:func:`bnnjax.pipeline.center_crop_box`),
    resizes it to ``image_size`` x ``image_size`` with TF1's legacy bicubic interpolation
    (:func:`bnnjax.pipeline.resize_bicubic_tf1`) and returns ``(x - mean) / std`` with ImageNet's RGB mean
    and std times 255, in float32 on the host (numpy). Output equals larq-zoo's (TensorFlow 2.19) bit for
    bit on the images compared (``tests/test_zoo_imagenet.py``: uint8 and float32, upscaling and
    downscaling); :func:`bnnjax.pipeline.normalize` on a device may differ from it in the last bit
    (XLA's division), <= 2.4e-7 there.

    Args:
      image: one RGB image ``(height, width, 3)``: uint8 (0-255) or float pixel values on the same
        scale (other real dtypes are converted to float32 first, as TensorFlow's resize does).
      image_size: output side (larq-zoo: always 224; the crop padding stays 32).

    Returns:
      float32 ``(image_size, image_size, 3)``, ready for a zoo model (add the batch axis).

    Raises:
      ValueError: not a 3-D array (larq-zoo's "Input must be of size [height, width, C>0]"), not 3
        channels, or an empty image.
    """
    from bnnjax import pipeline

    x = np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"Input must be of size [height, width, C>0]; got shape {x.shape} (one image, not a batch: "
                         "map preprocess_input over a batch's images).")
    if x.shape[2] != 3 or 0 in x.shape:
        raise ValueError(f"preprocess_input takes an RGB image (height, width, 3), got shape {x.shape}.")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"preprocess_input takes uint8 or float pixel values, got dtype {x.dtype}.")
    out = pipeline.center_crop_resize(x, image_size, CROP_PADDING)
    # numpy's float32 subtract and divide: larq-zoo's _normalize arithmetic, exactly
    return (out - np.asarray(pipeline.MEAN_RGB, np.float32)) / np.asarray(pipeline.STDDEV_RGB, np.float32)


def _parse_class_index(data, source: str) -> tuple[tuple[str, str], ...]:
    try:
        entries = tuple((str(data[str(i)][0]), str(data[str(i)][1])) for i in range(_NUM_CLASSES))
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{source}: not an ImageNet class index; expected Keras' imagenet_class_index.json layout "
                         f'{{"0": ["n01440764", "tench"], ..., "999": [wnid, name]}} ({type(e).__name__}: {e}).') from e
    if len(data) != _NUM_CLASSES:
        raise ValueError(f"{source}: an ImageNet class index has {_NUM_CLASSES} entries, this one {len(data)}.")
    return entries


@functools.lru_cache(maxsize=8)
def _read_class_index(path: str, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    del mtime_ns  # part of the cache key only: a replaced file is read again
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the ImageNet class index ({type(e).__name__}: {e}).") from e
    return _parse_class_index(data, path)


def class_index_path(*, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local copy of Keras' ``imagenet_class_index.json``, downloaded on first use.

    From :data:`CLASS_INDEX_URL` or ``$BNNJAX_DATASET_MIRROR/zoo/imagenet_class_index.json``, SHA-256
    checked, cached under ``cache_dir`` (default ``$BNNJAX_DATA_DIR/zoo``, beside the zoo's weights).

    Raises:
      bnnjax.datasets.DataError: no SHA-256 to check it against (:data:`CLASS_INDEX_SHA256` is None), or
        the download failed (``DownloadError`` / ``ChecksumError``; the message says where to put the file).
    """
    from bnnjax import _download, datasets

    if CLASS_INDEX_SHA256 is None:
        raise _download.DataError(
            "bnnjax has no SHA-256 for ImageNet's class index, so it does not download it; pass "
            f"class_index= a local copy of Keras' {_CLASS_INDEX_FILE} (from {CLASS_INDEX_URL}) or a dict like it.")
    cache = Path(cache_dir) if cache_dir is not None else datasets.default_cache_dir() / "zoo"
    remote = _download.Remote(CLASS_INDEX_URL, CLASS_INDEX_SHA256, _CLASS_INDEX_FILE, size=CLASS_INDEX_SIZE,
                              mirror_path=f"zoo/{_CLASS_INDEX_FILE}")
    return _download.fetch(remote, cache, progress=progress)


def load_class_index(class_index=None, *, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> tuple[tuple[str, str], ...]:
    """ImageNet's 1000 classes as ``(wnid, name)`` pairs; entry ``i`` is label ``i``.

    Args:
      class_index: None (Keras' ``imagenet_class_index.json``, downloaded once: :func:`class_index_path`),
        the path of such a file, or a dict in its layout (``{"0": ["n01440764", "tench"], ...}``).
      cache_dir: where the download is cached (default ``$BNNJAX_DATA_DIR/zoo``).
      progress: show the download's progress bar.

    Raises:
      ValueError: a file or dict that is not a 1000-class index in Keras' layout.
      FileNotFoundError: ``class_index`` names no file.
      bnnjax.datasets.DataError: the download failed or cannot be verified (see :func:`class_index_path`).
    """
    if isinstance(class_index, dict):
        return _parse_class_index(class_index, "class_index")
    path = Path(class_index) if class_index is not None else class_index_path(cache_dir=cache_dir, progress=progress)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (class_index must be the path of Keras' {_CLASS_INDEX_FILE} "
                                "or a dict in its layout).")
    return _read_class_index(str(path.resolve()), path.stat().st_mtime_ns)


def decode_predictions(preds, top: int = 5, *, class_index=None) -> list[list[tuple[str, str, float]]]:
    """Keras' ``decode_predictions``: each row's ``top`` classes as ``(wnid, name, score)``, best first.

    Ties are ordered by class index (lower first); ``score`` is the row's value as a Python float
    (probabilities from a zoo model's softmax, or logits: the ranking is the same).

    Args:
      preds: ``(N, 1000)`` predictions (numpy or jax array).
      top: how many classes per row.
      class_index: as :func:`load_class_index` (default: Keras' file, downloaded once).

    Returns:
      one list per row of ``top`` tuples ``(wnid, name, score)`` sorted by decreasing score.

    Raises:
      ValueError: ``preds`` is not ``(N, 1000)``, ``top`` is not a positive integer, or a bad class index.
      bnnjax.datasets.DataError: the class index cannot be downloaded or verified.
    """
    p = np.asarray(preds)
    if p.ndim != 2 or p.shape[1] != _NUM_CLASSES:
        raise ValueError("`decode_predictions` expects a batch of predictions (i.e. a 2D array of shape "
                         f"(samples, 1000)). Received array with shape: {p.shape}")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}.")
    classes = load_class_index(class_index)
    order = np.argsort(-p.astype(np.float64), axis=1, kind="stable")[:, :top]
    return [[(*classes[i], float(row[i])) for i in idx] for row, idx in zip(p, order)]
