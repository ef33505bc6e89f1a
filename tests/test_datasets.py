import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_download import FileServer, dead_url

from bnnjax import _download
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
    # No test may reach the real hosts: an accidental download hits a closed local port, fast.
    monkeypatch.setenv("BNNJAX_DATASET_MIRROR", dead_url())
    monkeypatch.setattr(_download, "_BACKOFF_S", 0.0)


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.stop()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def host(monkeypatch, server, name, files: dict[str, bytes], base=None, mirror=False):
    """Serve ``files`` as ``name``'s remotes (digests of these fixtures) from ``base`` (default the server
    standing in for the canonical host) and, with ``mirror``, at ``<server>/<name>/<file>``."""
    base = base or server.url + "/host/"
    for f, body in files.items():
        server.files[("/" if mirror else "/host/") + (f"{name}/{f}" if mirror else f)] = body
    remotes = tuple(D.Remote(base + f, hashlib.sha256(b).hexdigest(), mirror_path=f"{name}/{f}")
                    for f, b in files.items())
    monkeypatch.setitem(D.DATASETS, name, {**D.DATASETS[name], "remotes": remotes, "debian": None})
    if mirror:
        monkeypatch.setenv("BNNJAX_DATASET_MIRROR", server.url)
    else:
        monkeypatch.delenv("BNNJAX_DATASET_MIRROR")


def idx_files(n=7, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {s: (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)) for s in ("train", "t10k")}
    files = {}
    for s, (x, y) in arrays.items():
        files[f"{s}-images-idx3-ubyte.gz"], files[f"{s}-labels-idx1-ubyte.gz"] = idx_bytes(x), idx_bytes(y)
    return arrays, files


def cifar_tar(folder: str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name if name.startswith(("/", "..")) else f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def cifar100_records(n, seed):
    rng = np.random.default_rng(seed)
    coarse, fine = rng.integers(0, 20, (n, 1), dtype=np.uint8), rng.integers(0, 100, (n, 1), dtype=np.uint8)
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return np.concatenate([coarse, fine, chw.reshape(n, -1)], 1).tobytes(), coarse[:, 0], fine[:, 0], chw


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


def test_download_fetches_only_the_split_then_works_offline(server, tmp_path, monkeypatch):
    arrays, files = idx_files()
    host(monkeypatch, server, "mnist", files)
    x, y = D.load_dataset("mnist", "test", progress=False)
    np.testing.assert_array_equal(x[..., 0], arrays["t10k"][0])
    np.testing.assert_array_equal(y, arrays["t10k"][1])
    cache = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    server.stop()  # cache hit: no network needed any more
    np.testing.assert_array_equal(D.load_dataset("mnist", "test")[1], arrays["t10k"][1])


def test_mirror_variable_serves_the_cache_layout(server, tmp_path, monkeypatch):
    arrays, files = idx_files(seed=1)
    host(monkeypatch, server, "fashion_mnist", files, base=dead_url() + "/canonical/", mirror=True)
    x, y = D.load_dataset("fashion_mnist", "train", progress=False)
    np.testing.assert_array_equal(x[..., 0], arrays["train"][0])
    assert server.hits["/fashion_mnist/train-images-idx3-ubyte.gz"] == 1


def test_download_checksum_mismatch_deletes_the_file(server, tmp_path, monkeypatch):
    _, files = idx_files()
    host(monkeypatch, server, "mnist", files)
    server.files["/host/t10k-labels-idx1-ubyte.gz"] = b"tampered"
    with pytest.raises(D.ChecksumError) as e:
        D.load_dataset("mnist", "test", progress=False)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value) and hashlib.sha256(b"tampered").hexdigest() in str(e.value)
    assert not (tmp_path / "cache" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_unreachable_host_says_url_mirror_and_where_to_put_files(tmp_path, monkeypatch):
    url = dead_url()
    monkeypatch.setenv("BNNJAX_DATASET_MIRROR", url)
    with pytest.raises(D.DownloadError) as e:
        D.load_dataset("mnist", "train", progress=False, tfds_data_dir=str(tmp_path / "tfds"))
    msg = str(e.value)
    assert isinstance(e.value, D.DataError)
    assert f"{url}/mnist/train-images-idx3-ubyte.gz" in msg and "Connection refused" in msg
    assert str(tmp_path / "cache" / "mnist") in msg and "train-labels-idx1-ubyte.gz" in msg
    assert "BNNJAX_DATASET_MIRROR" in msg and "data_dir" in msg and "\n" not in msg
    assert not any((tmp_path / "cache" / "mnist").iterdir())  # no partial file


def test_tfds_errors_are_truthful(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(D.DatasetNotFoundError, match=r"tensorflow-datasets \(not installed"):
        D.load_dataset("mnist", "train", download=False)
    monkeypatch.delitem(sys.modules, "tensorflow_datasets")
    pytest.importorskip("tensorflow_datasets")

    def needs_tensorflow(*args):
        raise ImportError("This requires TensorFlow: pip install tensorflow")

    monkeypatch.setattr(D, "_from_tfds", needs_tensorflow)
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("mnist", "train", download=False)
    msg = str(e.value)
    assert "not installed" not in msg and "installed, but" in msg and "requires TensorFlow" in msg
    assert "tfds build mnist" in msg and "needs TensorFlow" in msg


def test_prepared_tfds_data_is_preferred_to_a_download(server, tmp_path, monkeypatch):
    _, files = idx_files()
    host(monkeypatch, server, "mnist", files)
    (tmp_path / "tfds" / "mnist").mkdir(parents=True)
    seen = []

    def prepared(name, split, tfds_data_dir, label_mode):
        seen.append((name, split, tfds_data_dir))
        return np.zeros((2, 28, 28, 1), np.uint8), np.arange(2)

    monkeypatch.setattr(D, "_from_tfds", prepared)
    assert D.load_dataset("mnist", "test", tfds_data_dir=str(tmp_path / "tfds"))[0].shape == (2, 28, 28, 1)
    assert seen == [("mnist", "test", str(tmp_path / "tfds"))] and not server.hits


def test_cifar100_download_fine_and_coarse_labels_from_the_archive(server, tmp_path, monkeypatch):
    train, _, fine_tr, _ = cifar100_records(6, 0)
    test, coarse, fine, chw = cifar100_records(3, 1)
    # Members outside the folder (path traversal attempts) are ignored: nothing is extracted to disk.
    archive = cifar_tar("cifar-100-binary", {"train.bin": train, "test.bin": test, "../evil.bin": b"x",
                                             "/tmp/evil.bin": b"x", "fine_label_names.txt": b"apple\n"})
    host(monkeypatch, server, "cifar100", {"cifar-100-binary.tar.gz": archive})
    x, y = D.load_dataset("cifar100", "test", progress=False)
    np.testing.assert_array_equal(x, chw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, fine)
    np.testing.assert_array_equal(D.load_dataset("cifar100", "test", label_mode="coarse")[1], coarse)
    np.testing.assert_array_equal(D.load_dataset("cifar100", "train")[1], fine_tr)
    assert [p.name for p in (tmp_path / "cache" / "cifar100").iterdir()] == ["cifar-100-binary.tar.gz"]
    assert not (tmp_path / "cache" / "evil.bin").exists() and server.hits["/host/cifar-100-binary.tar.gz"] == 1
    with pytest.raises(ValueError, match="label_mode"):
        D.load_dataset("cifar10", "test", label_mode="coarse")


def test_cifar10_archive_in_data_dir_and_truncated_archive(tmp_path):
    rng = np.random.default_rng(2)
    members = {f: np.concatenate([rng.integers(0, 10, (2, 1)), rng.integers(0, 256, (2, 3072))], 1)
               .astype(np.uint8).tobytes() for f in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]}
    archive = cifar_tar("cifar-10-batches-bin", members)
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(archive)
    x, y = D.load_dataset("cifar10", "train", tmp_path)
    assert x.shape == (10, 32, 32, 3)
    assert y.tolist() == [members[f"data_batch_{i}.bin"][j * 3073] for i in range(1, 6) for j in range(2)]
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(archive[: len(archive) // 2])
    with pytest.raises(D.CorruptDatasetError, match="cifar-10-binary.tar.gz.*corrupt or truncated"):
        D.load_dataset("cifar10", "test", tmp_path)


def test_registry_matches_tensorflow_datasets_checksums():
    """The URLs, sizes and digests are tensorflow-datasets' own (its url_checksums/*.txt)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    listed = {}
    for f in (Path(tfds.__file__).parent / "url_checksums").glob("*.txt"):
        for line in f.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 3:
                listed[fields[0]] = (int(fields[1]), fields[2])
    for name, spec in D.DATASETS.items():
        assert spec["remotes"], name
        for r in spec["remotes"]:
            assert listed[r.url] == (r.size, r.sha256), r.url
            assert r.mirror_path == f"{name}/{r.filename}"
    assert D.DATASETS["cifar100"]["shape"] == (32, 32, 3) and D.DATASETS["cifar100"]["classes"] == 100


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
