"""Datasets as numpy arrays: local IDX / npz / CIFAR binary files first, then tensorflow-datasets.

``load_dataset(name, split)`` returns ``(images, labels)``: ``uint8`` images in NHWC layout and
``int32`` labels. Sources are tried in order:

1. ``data_dir`` when given: a directory of IDX files (``train-images-idx3-ubyte[.gz]``, ...), a
   directory holding ``{name}.npz``, a ``.npz`` file (Keras' keys ``x_train, y_train, x_test,
   y_test``), or for CIFAR-10 the binary release (``data_batch_{1..5}.bin``, ``test_batch.bin``).
2. Known local copies: ``$BNNJAX_DATA_DIR/{name}`` (default ``~/.cache/bnnjax/{name}``) and, for
   Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``).
3. ``tensorflow_datasets.data_source`` (no TensorFlow needed; install the ``data`` extra), which may
   download when the machine is online.

No source found: one ``DatasetNotFoundError`` listing every place tried and how to provide the data.
This module does not import jax.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["load_dataset", "read_idx", "preprocess", "batches", "DatasetNotFoundError", "CorruptDatasetError",
           "DATASETS", "default_cache_dir", "epoch_permutation"]

DATASETS = {
    "mnist": {"shape": (28, 28, 1), "classes": 10, "tfds": "mnist", "debian": None},
    "fashion_mnist": {"shape": (28, 28, 1), "classes": 10, "tfds": "fashion_mnist",
                      "debian": "/usr/share/datasets/fashion-mnist"},
    "cifar10": {"shape": (32, 32, 3), "classes": 10, "tfds": "cifar10", "debian": None},
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFoundError(FileNotFoundError):
    """No source could provide the dataset; the message lists what was tried."""


class CorruptDatasetError(ValueError):
    """A data file exists but cannot be parsed; the message names the file."""


def default_cache_dir() -> Path:
    """``$BNNJAX_DATA_DIR`` or ``~/.cache/bnnjax``."""
    return Path(os.environ.get("BNNJAX_DATA_DIR", Path.home() / ".cache" / "bnnjax"))


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptDatasetError(f"{path}: cannot read ({e}); the file is corrupt or truncated — "
                                  "delete it and fetch it again.") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (MNIST's format), gzipped or raw.

    Raises:
      CorruptDatasetError: bad magic number, unknown element type, or a size that does not match the
        header (truncated or padded file); the message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDatasetError(f"{path}: truncated IDX header.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise CorruptDatasetError(f"{path}: header says shape {shape} ({expected} bytes) but the file has "
                                  f"{len(raw)} bytes — truncated or corrupt; fetch it again.")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem, directory / stem.replace("-idx", ".idx")):
        if candidate.exists():
            return candidate
    return None


def _from_idx_dir(directory: Path, name: str, split: str):
    prefix = _IDX_PREFIX[split]
    img = _find(directory, f"{prefix}-images-idx3-ubyte")
    lab = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        return None
    x, y = read_idx(img), read_idx(lab)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise CorruptDatasetError(f"{img} / {lab}: images {x.shape} and labels {y.shape} do not match.")
    return x[..., None], y


def _from_npz(path: Path, split: str):
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[f"x_{split}"], data[f"y_{split}"]
    except KeyError as e:
        raise CorruptDatasetError(f"{path}: needs arrays x_train, y_train, x_test, y_test ({e}).") from e
    except (OSError, ValueError, zlib.error) as e:
        raise CorruptDatasetError(f"{path}: not a readable .npz file ({e}).") from e


def _from_cifar_bin(directory: Path, split: str):
    files = [directory / f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else [directory / "test_batch.bin"]
    if not all(f.exists() for f in files):
        return None
    xs, ys = [], []
    for f in files:
        raw = np.frombuffer(_read_bytes(f), np.uint8)
        if raw.size % 3073:
            raise CorruptDatasetError(f"{f}: size {raw.size} is not a whole number of 3073-byte CIFAR records.")
        rec = raw.reshape(-1, 3073)
        ys.append(rec[:, 0])
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(xs), np.concatenate(ys)


def _from_directory(directory: Path, name: str, split: str):
    if directory.is_file() and directory.suffix == ".npz":
        return _from_npz(directory, split)
    if not directory.is_dir():
        return None
    if (directory / f"{name}.npz").exists():
        return _from_npz(directory / f"{name}.npz", split)
    if name == "cifar10":
        for sub in (directory, directory / "cifar-10-batches-bin"):
            found = _from_cifar_bin(sub, split)
            if found is not None:
                return found
        return None
    return _from_idx_dir(directory, name, split)


def _from_tfds(name: str, split: str, tfds_data_dir, download: bool):
    import tensorflow_datasets as tfds  # optional extra: imported only when local copies are missing

    source = tfds.data_source(DATASETS[name]["tfds"], split=split, data_dir=tfds_data_dir, download=download)
    records = [source[i] for i in range(len(source))]
    x = np.stack([np.asarray(r["image"]) for r in records])
    y = np.asarray([r["label"] for r in records])
    return x, y


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                 tfds_data_dir: str | None = None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a whole split as numpy arrays.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
      split: ``"train"`` or ``"test"``.
      data_dir: a directory or ``.npz`` file to read first (see the module docstring).
      tfds_data_dir: ``data_dir`` for tensorflow-datasets.
      download: let tensorflow-datasets download (only helps online).

    Returns:
      ``(images, labels)``: uint8 ``(N, H, W, C)`` and int32 ``(N,)``.

    Raises:
      ValueError: unknown name or split.
      DatasetNotFoundError: no source has the data (offline, nothing local); lists every source tried.
      CorruptDatasetError: a local file exists but is corrupt or truncated (names the file).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    if split not in _IDX_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    tried = []
    candidates = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    candidates.append(default_cache_dir() / name)
    if DATASETS[name]["debian"]:
        candidates.append(Path(DATASETS[name]["debian"]))
    found = None
    for directory in candidates:
        tried.append(str(directory))
        found = _from_directory(directory, name, split)
        if found is not None:
            break
    if found is None:
        try:
            found = _from_tfds(name, split, tfds_data_dir, download)
        except ImportError:
            tried.append("tensorflow-datasets (not installed: pip install 'bnnjax[data]')")
        except Exception as e:  # tfds raises many types when offline or unprepared
            tried.append(f"tensorflow-datasets ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if found is None:
        hint = ("install Debian's dataset-fashion-mnist, or " if name == "fashion_mnist" else "")
        raise DatasetNotFoundError(
            f"dataset {name!r} ({split}) not found. Tried: " + "; ".join(tried) + ". To provide it, "
            + hint + f"put the files in {default_cache_dir() / name} (IDX files, {name}.npz, or CIFAR's binary "
            "batches), pass data_dir=..., or run once online so tensorflow-datasets can download it.")
    x, y = found
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != DATASETS[name]["shape"]:
        raise CorruptDatasetError(f"{name} {split}: images have shape {x.shape[1:]}, expected "
                                  f"{DATASETS[name]['shape']}; is {tried[-1]} the right dataset?")
    return x.astype(np.uint8), np.asarray(y).astype(np.int32)


def preprocess(images: np.ndarray, scale: str = "[-1, 1]", flatten: bool = False) -> np.ndarray:
    """uint8 images to float32 in ``[-1, 1]`` (``x / 127.5 - 1``) or ``[0, 1]`` (``x / 255``).

    Raises:
      ValueError: unknown ``scale``.
    """
    x = images.astype(np.float32)
    if scale.replace(" ", "") == "[-1,1]":
        x = x / 127.5 - 1
    elif scale.replace(" ", "") == "[0,1]":
        x = x / 255.0
    else:
        raise ValueError(f"scale must be '[-1, 1]' or '[0, 1]', got {scale!r}.")
    return x.reshape(len(x), -1) if flatten else x


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffling order of one epoch: a pure function of (seed, epoch), so resumed runs repeat it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int | None = None, epoch: int = 0,
            drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x, y)`` batches, shuffled by ``epoch_permutation(seed, epoch)`` when ``seed`` is set.

    The last partial batch is kept unless ``drop_last`` (evaluation sees every example).
    """
    n = len(x)
    order = epoch_permutation(n, seed, epoch) if seed is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i: i + batch_size]
        yield x[idx], y[idx]
