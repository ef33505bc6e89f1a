import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from bnnjax import datasets as D

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx_dir(tmp_path, n=5, gz=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", y, gz)
    return x, y


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BNNJAX_DATA_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory(tmp_path, gz):
    x, y = make_idx_dir(tmp_path, gz=gz)
    xs, ys = D.load_dataset("mnist", "test", tmp_path)
    assert xs.shape == (5, 28, 28, 1) and xs.dtype == np.uint8 and ys.dtype == np.int32
    np.testing.assert_array_equal(xs[..., 0], x)
    np.testing.assert_array_equal(ys, y)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "cache" / "mnist")
    assert D.load_dataset("mnist", "train")[0].shape == (5, 28, 28, 1)


def test_npz_file_and_directory(tmp_path):
    x = np.zeros((3, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=np.arange(3), x_test=x[:1], y_test=np.arange(1))
    assert D.load_dataset("cifar10", "train", tmp_path)[0].shape == (3, 32, 32, 3)
    assert D.load_dataset("cifar10", "test", tmp_path / "cifar10.npz")[1].tolist() == [0]


def test_cifar_binary_batches(tmp_path):
    rng = np.random.default_rng(1)
    recs = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, (4, 1), dtype=np.uint8)
        chw = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        (tmp_path / name).write_bytes(np.concatenate([labels, chw.reshape(4, -1)], 1).tobytes())
        recs[name] = (chw, labels)
    x, y = D.load_dataset("cifar10", "test", tmp_path)
    chw, labels = recs["test_batch.bin"]
    np.testing.assert_array_equal(x, chw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, labels[:, 0])
    assert D.load_dataset("cifar10", "train", tmp_path)[0].shape == (20, 32, 32, 3)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    img = tmp_path / "t10k-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-7])
    with pytest.raises(D.CorruptDatasetError, match="t10k-images-idx3-ubyte.*truncated"):
        D.load_dataset("mnist", "test", tmp_path)
    img.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 20)
    with pytest.raises(D.CorruptDatasetError, match="bad magic"):
        D.read_idx(img)
    bad_gz = tmp_path / "x.gz"
    payload = b"\x00\x00\x08\x01" + (5000).to_bytes(4, "big") + np.random.default_rng(0).bytes(5000)
    bad_gz.write_bytes(gzip.compress(payload)[:2000])
    with pytest.raises(D.CorruptDatasetError, match="x.gz.*corrupt or truncated"):
        D.read_idx(bad_gz)


def test_offline_without_local_copy_lists_every_source(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("mnist", "train", tmp_path / "nowhere", tfds_data_dir=str(tmp_path / "tfds"), download=False)
    msg = str(e.value)
    assert "nowhere" in msg and "cache" in msg and "tensorflow-datasets" in msg and "data_dir" in msg


def test_bad_name_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        D.load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("mnist", "validation")


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("fashion_mnist", (28, 28, 1))])
def test_tfds_path_with_mock_data(tmp_path, name, shape, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setitem(D.DATASETS, name, {**D.DATASETS[name], "debian": None})  # force the tfds path
    with tfds.testing.mock_data(num_examples=6):
        x, y = D.load_dataset(name, "train", tfds_data_dir=str(tmp_path / "tfds"), download=False)
    assert x.shape == (6,) + shape and x.dtype == np.uint8 and y.shape == (6,)


@pytest.mark.skipif(not (FASHION / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_real_fashion_mnist():
    x, y = D.load_dataset("fashion_mnist", "test")
    assert x.shape == (10000, 28, 28, 1) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
    xtr, ytr = D.load_dataset("fashion_mnist", "train")
    assert xtr.shape == (60000, 28, 28, 1) and 0 < xtr.mean() < 255


def test_preprocess_and_batches():
    img = np.array([[0, 255], [127, 128]], np.uint8)[None, ..., None]
    np.testing.assert_allclose(D.preprocess(img)[0, :, :, 0], [[-1, 1], [127 / 127.5 - 1, 128 / 127.5 - 1]], atol=1e-6)
    np.testing.assert_allclose(D.preprocess(img, "[0, 1]", flatten=True), [[0, 1, 127 / 255, 128 / 255]])
    with pytest.raises(ValueError, match="scale"):
        D.preprocess(img, "[0, 255]")
    x, y = np.arange(10), np.arange(10)
    sizes = [len(b[0]) for b in D.batches(x, y, 4)]
    assert sizes == [4, 4, 2]
    assert [len(b[0]) for b in D.batches(x, y, 4, drop_last=True)] == [4, 4]
    e0 = np.concatenate([b[0] for b in D.batches(x, y, 4, seed=3, epoch=0)])
    e0b = np.concatenate([b[0] for b in D.batches(x, y, 4, seed=3, epoch=0)])
    e1 = np.concatenate([b[0] for b in D.batches(x, y, 4, seed=3, epoch=1)])
    assert e0.tolist() == e0b.tolist() and e0.tolist() != e1.tolist() and sorted(e1) == list(range(10))
