"""Datasets as numpy arrays: local files first, then a verified download, then tensorflow-datasets.

``load_dataset(name, split)`` returns ``(images, labels)``: ``uint8`` images in NHWC layout and
``int32`` labels, for ``mnist``, ``fashion_mnist``, ``cifar10`` and ``cifar100``. Sources are tried
in order:

1. ``data_dir`` when given: a directory of IDX files (``train-images-idx3-ubyte[.gz]``, ...), a
   directory holding ``{name}.npz``, a ``.npz`` file (Keras' keys ``x_train, y_train, x_test,
   y_test``), or for CIFAR the binary release (``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``
   or its extracted ``.bin`` files).
2. Known local copies, read the same way: the cache ``$BNNJAX_DATA_DIR/{name}`` (default
   ``~/.cache/bnnjax/{name}``) and, for Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist``
   (package ``dataset-fashion-mnist``).
3. Data prepared by tensorflow-datasets, when its data directory has ``{name}`` (read without
   TensorFlow: ``tensorflow_datasets.data_source``).
4. A download into the cache (``download=True``, the default) of the files tensorflow-datasets' builders
   fetch, from their canonical hosts, SHA-256 checked (:mod:`bnnjax._download`): only the split's files.
   ``$BNNJAX_DATASET_MIRROR`` replaces the hosts: the files are then fetched from
   ``$BNNJAX_DATASET_MIRROR/{name}/{file}``, the cache's own layout, so a copy of a filled cache
   directory (served over HTTP, or named by path or ``file://`` URL) is a complete mirror.
5. tensorflow-datasets once more, reading whatever it has (it never downloads here: its
   download-and-prepare step needs TensorFlow, and 4. fetches the same files without it).

No source: ``DownloadError`` (the download failed; the message names the URL, the reason, where to put
the files by hand and the mirror variable) or ``DatasetNotFoundError`` (``download=False``); both list
every place tried. No pickle is read (CIFAR comes from its binary release, never the python one). This
module does not import jax.
"""

from __future__ import annotations

import gzip
import logging
import os
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from bnnjax._download import ChecksumError, DataError, DownloadError, Remote, fetch

__all__ = ["load_dataset", "read_idx", "preprocess", "batches", "DatasetNotFoundError", "CorruptDatasetError",
           "DataError", "DownloadError", "ChecksumError", "DATASETS", "default_cache_dir", "epoch_permutation"]


def _remotes(name: str, base: str, files: dict[str, tuple[int, str]]) -> tuple[Remote, ...]:
    return tuple(Remote(base + f, sha, size=size, mirror_path=f"{name}/{f}") for f, (size, sha) in files.items())


# URLs, sizes and SHA-256 digests as tensorflow-datasets 4.9 lists them in
# tensorflow_datasets/url_checksums/{mnist,fashion_mnist,cifar10,cifar100}.txt (the files its builders
# download). Debian's /usr/share/datasets/fashion-mnist/*.gz hold the same compressed data under a
# different gzip header (no stored file name, a 2020 time stamp): with upstream's header restored they
# have exactly these digests.
_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# Fashion-MNIST's own S3 website host answers plain HTTP only; the SHA-256 check guards the content.
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
_FASHION_FILES = {
    "train-images-idx3-ubyte.gz": (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
    "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
    "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
}
_CIFAR10_FILES = {
    "cifar-10-binary.tar.gz": (170052171, "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),
}
_CIFAR100_FILES = {
    "cifar-100-binary.tar.gz": (168513733, "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
}

# "remotes": the files to download (IDX datasets: a split needs the two whose names start with its prefix).
DATASETS = {
    "mnist": {"shape": (28, 28, 1), "classes": 10, "tfds": "mnist", "debian": None,
              "remotes": _remotes("mnist", _MNIST_URL, _MNIST_FILES)},
    "fashion_mnist": {"shape": (28, 28, 1), "classes": 10, "tfds": "fashion_mnist",
                      "debian": "/usr/share/datasets/fashion-mnist",
                      "remotes": _remotes("fashion_mnist", _FASHION_URL, _FASHION_FILES)},
    "cifar10": {"shape": (32, 32, 3), "classes": 10, "tfds": "cifar10", "debian": None,
                "remotes": _remotes("cifar10", _CIFAR_URL, _CIFAR10_FILES)},
    "cifar100": {"shape": (32, 32, 3), "classes": 100, "tfds": "cifar100", "debian": None,
                 "remotes": _remotes("cifar100", _CIFAR_URL, _CIFAR100_FILES)},
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# CIFAR's binary releases: the archive, its folder, each split's files, and the label bytes that precede
# each record's 3072 image bytes (CIFAR-100: <coarse label><fine label>).
_CIFAR = {
    "cifar10": {"archive": "cifar-10-binary.tar.gz", "folder": "cifar-10-batches-bin", "label_bytes": 1,
                "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    "cifar100": {"archive": "cifar-100-binary.tar.gz", "folder": "cifar-100-binary", "label_bytes": 2,
                 "train": ("train.bin",), "test": ("test.bin",)},
}
_LABEL_MODES = ("fine", "coarse")


class DatasetNotFoundError(DataError, FileNotFoundError):
    """No source could provide the dataset; the message lists what was tried."""


class CorruptDatasetError(DataError, ValueError):
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


def _cifar_records(blobs: list[tuple[str, bytes]], label_bytes: int, label_index: int):
    """CIFAR binary records ``<label bytes><3072 image bytes, CHW>`` to NHWC images and one label byte."""
    xs, ys = [], []
    size = label_bytes + 3072
    for source, blob in blobs:
        raw = np.frombuffer(blob, np.uint8)
        if raw.size % size:
            raise CorruptDatasetError(f"{source}: size {raw.size} is not a whole number of {size}-byte CIFAR records.")
        rec = raw.reshape(-1, size)
        ys.append(rec[:, label_index])
        xs.append(rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(xs), np.concatenate(ys)


def _tar_members(archive: Path, names: list[str]) -> list[tuple[str, bytes]]:
    """The named regular files of a tar archive, read into memory (nothing is extracted to disk)."""
    found = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                key = member.name.removeprefix("./")
                if key in names and member.isfile():
                    found[key] = tar.extractfile(member).read()
                    if len(found) == len(names):
                        break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise CorruptDatasetError(f"{archive}: cannot read the archive ({e}); it is corrupt or truncated — "
                                  "delete it and fetch it again.") from e
    missing = [n for n in names if n not in found]
    if missing:
        raise CorruptDatasetError(f"{archive}: has no {', '.join(missing)}; is it the right archive?")
    return [(f"{archive}:{n}", found[n]) for n in names]


def _from_cifar(directory: Path, name: str, split: str, label_mode: str):
    spec = _CIFAR[name]
    index = 0 if label_mode == "coarse" else spec["label_bytes"] - 1
    for sub in (directory, directory / spec["folder"]):
        files = [sub / f for f in spec[split]]
        if all(f.exists() for f in files):
            return _cifar_records([(str(f), _read_bytes(f)) for f in files], spec["label_bytes"], index)
    archive = directory / spec["archive"]
    if archive.is_file():
        members = _tar_members(archive, [f"{spec['folder']}/{f}" for f in spec[split]])
        return _cifar_records(members, spec["label_bytes"], index)
    return None


def _from_directory(directory: Path, name: str, split: str, label_mode: str = "fine"):
    if directory.is_file() and directory.suffix == ".npz":
        return _from_npz(directory, split)
    if not directory.is_dir():
        return None
    if (directory / f"{name}.npz").exists():
        return _from_npz(directory / f"{name}.npz", split)
    if name in _CIFAR:
        return _from_cifar(directory, name, split, label_mode)
    return _from_idx_dir(directory, name, split)


def _split_remotes(name: str, split: str) -> tuple[Remote, ...]:
    remotes = DATASETS[name]["remotes"]
    if name in _CIFAR:
        return remotes
    return tuple(r for r in remotes if r.filename.startswith(_IDX_PREFIX[split] + "-"))


def _tfds_data_dirs(tfds_data_dir) -> list[Path]:
    dirs = [tfds_data_dir, os.environ.get("TFDS_DATA_DIR"), Path.home() / "tensorflow_datasets"]
    return [Path(d) for d in dirs if d]


def _from_tfds(name: str, split: str, tfds_data_dir, label_mode: str):
    import tensorflow_datasets as tfds  # optional: imported only when local copies and the download fail

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # tfds logs warnings about missing data that our error already states
    try:
        source = tfds.data_source(DATASETS[name]["tfds"], split=split, data_dir=tfds_data_dir, download=False)
        records = [source[i] for i in range(len(source))]
    finally:
        absl.setLevel(level)
    x = np.stack([np.asarray(r["image"]) for r in records])
    y = np.asarray([r["coarse_label" if label_mode == "coarse" else "label"] for r in records])
    return x, y


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _try_tfds(name: str, split: str, tfds_data_dir, label_mode: str):
    """``(arrays, None)`` from tensorflow-datasets, or ``(None, what went wrong)``.

    The description is truthful: "not installed" only when the package is absent; an installed package that
    fails says so, with its exception.
    """
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "tensorflow_datasets":
            return None, "tensorflow-datasets (not installed; only needed to read data prepared with it)"
        return None, f"tensorflow-datasets (installed, but importing it failed: {_first_line(e)})"
    except Exception as e:  # a broken install raises anything at import
        return None, f"tensorflow-datasets (installed, but importing it failed: {_first_line(e)})"
    try:
        return _from_tfds(name, split, tfds_data_dir, label_mode), None
    except Exception as e:  # tfds raises many types when data is not prepared
        where = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "its default data_dir"
        tfds_name = DATASETS[name]["tfds"]
        return None, (f"tensorflow-datasets {getattr(tfds, '__version__', '')} (installed, but it has no readable "
                      f"prepared {tfds_name!r} in {where}: {_first_line(e)}; preparing data with it "
                      f"(`tfds build {tfds_name}`) needs TensorFlow, which bnnjax's own download does not)")


def _download(name: str, split: str, cache: Path, progress: bool):
    for remote in _split_remotes(name, split):
        fetch(remote, cache, progress=progress)


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                 tfds_data_dir: str | None = None, download: bool = True, progress: bool = True,
                 label_mode: str = "fine") -> tuple[np.ndarray, np.ndarray]:
    """Load a whole split as numpy arrays, downloading it into the cache on first use.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` or ``"cifar100"``.
      split: ``"train"`` or ``"test"``.
      data_dir: a directory or ``.npz`` file to read first (see the module docstring).
      tfds_data_dir: ``data_dir`` of tensorflow-datasets, for data prepared with it.
      download: download the split's files into ``$BNNJAX_DATA_DIR/{name}`` (from the canonical hosts
        or ``$BNNJAX_DATASET_MIRROR``) when no local copy exists.
      progress: show a progress bar while downloading.
      label_mode: CIFAR-100's ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses) labels; a
        ``.npz`` file has only the labels it was written with.

    Returns:
      ``(images, labels)``: uint8 ``(N, H, W, C)`` and int32 ``(N,)``.

    Raises:
      ValueError: unknown name, split or label mode.
      DownloadError: nothing local and the download failed (names the URL, the reason, where to put the
        files by hand and the mirror variable; lists every source tried).
      ChecksumError: a downloaded file has the wrong SHA-256 (URL, expected and actual digests; the file
        was deleted).
      DatasetNotFoundError: nothing local and ``download=False``; lists every source tried.
      CorruptDatasetError: a local file exists but is corrupt or truncated (names the file).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    if split not in _IDX_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if label_mode not in _LABEL_MODES or (label_mode == "coarse" and name != "cifar100"):
        raise ValueError(f"label_mode must be 'fine' (or 'coarse' for cifar100), got {label_mode!r} for {name!r}.")
    cache = default_cache_dir() / name
    candidates = ([Path(data_dir)] if data_dir is not None else []) + [cache]
    if DATASETS[name]["debian"]:
        candidates.append(Path(DATASETS[name]["debian"]))
    tried, found, source = [], None, None
    for directory in candidates:
        tried.append(str(directory))
        found = _from_directory(directory, name, split, label_mode)
        if found is not None:
            source = str(directory)
            break
    tfds_tried = False
    # Data prepared by tensorflow-datasets beats downloading the same files again.
    if found is None and any((d / DATASETS[name]["tfds"]).is_dir() for d in _tfds_data_dirs(tfds_data_dir)):
        tfds_tried = True
        found, failure = _try_tfds(name, split, tfds_data_dir, label_mode)
        tried.append(failure or "tensorflow-datasets")
        source = "tensorflow-datasets"
    download_error = None
    if found is None and download:
        try:
            _download(name, split, cache, progress)
        except ChecksumError:
            raise
        except DownloadError as e:
            download_error = e
            tried.append("the download (failed as said above)")
        else:
            found, source = _from_directory(cache, name, split, label_mode), f"download into {cache}"
            if found is None:
                raise CorruptDatasetError(f"{cache}: downloaded and verified, but the {split} split cannot be "
                                          "found in it; please report this.")
    if found is None and not tfds_tried:
        found, failure = _try_tfds(name, split, tfds_data_dir, label_mode)
        if failure:
            tried.append(failure)
        source = "tensorflow-datasets"
    if found is None:
        remotes = _split_remotes(name, split)
        files = ", ".join(r.filename for r in remotes)
        origin = remotes[0].url.rsplit("/", 1)[0] + "/"
        mirror = os.environ.get("BNNJAX_DATASET_MIRROR")
        hint = "install Debian's dataset-fashion-mnist, or " if name == "fashion_mnist" else ""
        by_hand = (f"To provide it, {hint}copy {files} (from {origin}; SHA-256s in bnnjax.datasets.DATASETS) or "
                   f"{name}.npz into {cache}/, set BNNJAX_DATASET_MIRROR to a URL or directory holding "
                   f"<mirror>/{name}/<file>" + (f" (now {mirror!r})" if mirror else "") + ", or pass data_dir=DIR")
        if download_error is not None:
            e = download_error
            failed = f"from {e.url}: {e.cause}" if e.url else f": {e.cause}"
            raise DownloadError(f"dataset {name!r} ({split}) is not on this machine and could not be downloaded "
                                f"{failed}. Tried: " + "; ".join(tried) + f". {by_hand}.", e.url, e.cause) from e
        raise DatasetNotFoundError(f"dataset {name!r} ({split}) not found and download=False. Tried: "
                                   + "; ".join(tried) + f". {by_hand}, or call with download=True.")
    x, y = found
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != DATASETS[name]["shape"]:
        raise CorruptDatasetError(f"{name} {split}: images have shape {x.shape[1:]}, expected "
                                  f"{DATASETS[name]['shape']}; is {source} the right dataset?")
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
