import io
import logging
import math

import jax
import numpy as np
import pytest
from PIL import Image

from bnnjax import pipeline as pl


def make_image_folder(root, classes=4, per_class=10, seed=0):
    """``classes`` folders of ``per_class`` small images: JPEG and PNG, 32x32 and 40x28, plus odd modes."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (32, 32) if i % 3 else (28, 40)
            im = Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8))
            if i == 1:
                im = im.convert("L")  # grayscale JPEG
            if i == 2:
                im = im.convert("CMYK")  # CMYK JPEG, as a few ImageNet files are
            if i == 3:
                im = im.convert("RGBA")
            im.save(d / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


class ArraySource:
    """In-memory source whose label is the record index: shows which records a loader read."""

    def __init__(self, n, size=(12, 10)):
        rng = np.random.default_rng(n)
        self.images = rng.integers(0, 256, (n,) + size + (3,), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i}


def take(it, k):
    return [next(it) for _ in range(k)]


# --- resize / crops --------------------------------------------------------------------------------

def direct_tf1_bicubic(image, oh, ow):
    """TF1 legacy bicubic straight from its definition: per output pixel, 4x4 taps, float64."""
    a = -0.75
    h, w, c = image.shape

    def kernel(t):
        t = abs(t)
        return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    def taps(o, n_in, n_out):
        src = np.float32(o) * (np.float32(n_in) / np.float32(n_out))
        lo = math.floor(src)
        d = round(float(src - np.float32(lo)) * 1024) / 1024  # TF reads its kernel from a 1/1024 table
        return [(min(max(lo + m, 0), n_in - 1), kernel(d - m)) for m in (-1, 0, 1, 2)]

    out = np.zeros((oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            for yi, wy in taps(i, h, oh):
                for xj, wx in taps(j, w, ow):
                    out[i, j] += wy * wx * image[yi, xj].astype(np.float64)
    return out


@pytest.mark.parametrize("shape,out", [((5, 7, 3), (3, 4)), ((9, 6, 2), (13, 17)), ((16, 16, 3), (7, 7)),
                                       ((1, 5, 1), (4, 4)), ((8, 7, 3), (35, 33))])
def test_resize_matches_direct_formula(shape, out):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    got = pl.resize_bicubic_tf1(image, out)
    assert got.dtype == np.float32 and got.shape == out + shape[2:]
    np.testing.assert_allclose(got, direct_tf1_bicubic(image, *out), atol=2e-3)


def test_resize_identity_and_constant():
    image = np.random.default_rng(1).integers(0, 256, (11, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pl.resize_bicubic_tf1(image, (11, 13)), image.astype(np.float32))
    const = np.full((9, 6, 3), 77, np.uint8)
    np.testing.assert_allclose(pl.resize_bicubic_tf1(const, 20), 77, atol=1e-3)


# tf.compat.v1.image.resize_bicubic(img[None], [4, 5]) computed with TensorFlow 2.19
TF_RESIZE_4x5 = [
    [[0.0, 37.0], [105.3986, 160.8545], [228.2212, 29.7388], [33.7787, 95.3667], [164.5908, 201.5908]],
    [[9.0, 46.0], [114.3985, 169.8545], [237.2212, 38.7388], [42.7787, 104.3667], [173.5908, 210.5908]],
    [[18.0, 55.0], [123.3986, 178.8545], [246.2212, 47.7388], [51.7787, 113.3667], [182.5908, 219.5908]],
    [[27.5625, 64.5625], [132.961, 188.417], [255.7838, 57.3013], [61.3412, 122.9292], [192.1533, 229.1534]]]


def test_resize_matches_tensorflow():
    image = ((np.arange(6 * 7 * 2).reshape(6, 7, 2) * 37) % 256).astype(np.uint8)
    np.testing.assert_allclose(pl.resize_bicubic_tf1(image, (4, 5)), TF_RESIZE_4x5, atol=1e-4)  # 4 decimals
    assert pl.resize_bicubic_tf1(image, (9, 11))[0, 5, 1] == pytest.approx(-3.4129, abs=1e-3)  # overshoot kept


def test_center_crop_resize_matches_larq_zoo():
    # larq_zoo.training.data.preprocess_input(big) (larq-zoo 2.4.0, TensorFlow 2.19.1): channel means, pixels
    h, w = 300, 260
    yy, xx, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    big = ((yy * 7 + xx * 13 + cc * 50 + (yy * xx) % 11) % 256).astype(np.uint8)
    assert pl.center_crop_box(h, w) == (37, 17, 227, 227)
    out = np.asarray(pl.normalize(pl.center_crop_resize(big)))
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(0, 1)), [0.06472037732, 0.19650177657, 0.41845425963], atol=1e-6)
    expected = {(0, 0): [1.7522904, -1.6855743, -0.5844008], (0, 223): [-0.5111884, 0.4822157, 1.5737544],
                (111, 57): [1.8542407, -1.5253372, -0.4386126], (223, 223): [0.3768423, 1.3900685, 2.4775722],
                (200, 3): [0.4644543, 1.4796362, 2.9134731]}
    for (i, j), v in expected.items():
        np.testing.assert_allclose(out[i, j], v, atol=1e-5)


def test_random_crop_box_follows_the_constraints():
    h, w = 375, 500
    boxes = [pl.random_crop_box(h, w, np.random.default_rng([7, i])) for i in range(300)]
    assert boxes == [pl.random_crop_box(h, w, np.random.default_rng([7, i])) for i in range(300)]
    for top, left, ch, cw in boxes:
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        assert 0.1 * h * w <= ch * cw <= h * w
        assert 0.74 <= cw / ch <= 1.34
    areas = np.array([b[2] * b[3] for b in boxes]) / (h * w)
    assert 0.3 < areas.mean() < 0.47  # TF's sampler gives 0.384 on this image
    assert pl.random_crop_box(1, 1000, np.random.default_rng(0)) is None  # no attempt fits: center crop


# --- sources ---------------------------------------------------------------------------------------

def test_image_folder_layout_and_labels(tmp_path, folder):
    src = pl.ImageFolder(folder)
    assert src.classes == [f"n{c:08d}" for c in range(4)] and len(src) == 40
    assert [src[i]["label"] for i in range(0, 40, 10)] == [0, 1, 2, 3]
    assert src.path(0).name == "img00.jpg" and str(src.path(0)) == src.describe(0)
    root = make_image_folder(tmp_path / "t", classes=2, per_class=1)
    (root / "n00000001" / "notes.txt").write_text("not an image")
    (root / "n00000001" / ".hidden.jpg").write_bytes(b"")
    (root / "n00000001" / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(root / "n00000001" / "sub" / "x.JPEG")
    (root / ".cache").mkdir()  # hidden folders are not classes
    src = pl.ImageFolder(root)
    assert src.classes == ["n00000000", "n00000001"] and len(src) == 3
    assert [src[i]["label"] for i in range(3)] == [0, 1, 1]
    assert src.path(2).relative_to(root).as_posix() == "n00000001/sub/x.JPEG"


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        pl.ImageFolder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class folders"):
        pl.ImageFolder(tmp_path / "flat")
    root = make_image_folder(tmp_path / "r", classes=1, per_class=1)
    (root / "zzz_empty").mkdir()
    (root / "zzz_empty" / "readme.txt").write_text("")
    with pytest.raises(ValueError, match="zzz_empty: empty class folder"):
        pl.ImageFolder(root)


def test_decode_converts_to_rgb(folder):
    src = pl.ImageFolder(folder)
    for i in range(4):  # RGB, grayscale, CMYK, RGBA
        img = pl.decode_image(src[i]["image"], src.describe(i))
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    gray = pl.decode_image(src[1]["image"])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    pal = Image.new("P", (5, 3))
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert pl.decode_image(buf.getvalue()).shape == (3, 5, 3)
    assert pl.decode_image(np.zeros((4, 6), np.uint8)).shape == (4, 6, 3)
    assert pl.decode_image(np.zeros((4, 6, 4), np.uint8)).shape == (4, 6, 3)
    with pytest.raises(pl.CorruptImageError, match="expected a uint8 image"):
        pl.decode_image(np.zeros((4, 6, 3), np.float32))


def test_corrupt_image_is_named_or_skipped(tmp_path, caplog):
    root = make_image_folder(tmp_path / "c", classes=2, per_class=4)
    bad = root / "n00000001" / "img02.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    src = pl.ImageFolder(root)
    it = pl.train_loader(src, 4, image_size=8, num_workers=0, seed=0)
    with pytest.raises(pl.CorruptImageError, match=r"img02\.jpg.*skip_corrupt=True"):
        take(it, 2)
    it = pl.train_loader(src, 4, image_size=8, num_workers=0, seed=0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="bnnjax.pipeline"):
        batches = take(it, 4)  # two epochs of 7 good images: 16 images read, the bad one twice
    assert it.skipped == 2 and "img02.jpg" in caplog.text
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
    assert it.get_state()["skipped"] == 2
    ev = pl.eval_loader(src, 3, image_size=8, num_workers=0, skip_corrupt=True)
    batches = list(ev)
    assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 7


def test_split_smaller_than_a_batch_and_bad_arguments(folder):
    src = pl.ImageFolder(folder)
    with pytest.raises(ValueError, match="batch_size 41 but shard 0 of 1 has 40 images"):
        pl.train_loader(src, 41, num_workers=0)
    with pytest.raises(ValueError, match="shard 1 of 2 has 10 images"):
        pl.train_loader(ArraySource(21), 11, num_workers=0, shard=(1, 2))
    with pytest.raises(ValueError, match="no records"):
        pl.eval_loader(ArraySource(0), 4, num_workers=0)
    with pytest.raises(ValueError, match="must be in"):
        pl.shard_indices(10, 2, 2, drop_remainder=False)


# --- loaders ---------------------------------------------------------------------------------------

def test_train_stream_is_deterministic_epoch_shuffled_and_resumable():
    src = ArraySource(10)
    kw = dict(image_size=6, seed=5, num_workers=0)
    a = take(pl.train_loader(src, 4, **kw), 5)  # 20 records: two epochs
    b = take(pl.train_loader(src, 4, **kw), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["image"].shape == (4, 6, 6, 3) and x["image"].dtype == np.uint8 and x["label"].dtype == np.int32
    labels = np.concatenate([x["label"] for x in a])
    assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:]) == list(range(10))
    assert list(labels[:10]) != list(labels[10:])  # each epoch has its own order
    other = np.concatenate([x["label"] for x in take(pl.train_loader(src, 4, **{**kw, "seed": 6}), 3)])
    assert list(other) != list(labels[:12])
    it = pl.train_loader(src, 4, **kw)
    take(it, 2)  # stop in the middle of the first epoch
    state = it.get_state()
    resumed = pl.train_loader(src, 4, **kw)
    resumed.set_state(state)
    for x, y in zip(take(resumed, 3), a[2:]):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_shards_are_disjoint_and_cover_the_data():
    for n in (10, 11, 17):
        for count in (1, 2, 3, 4):
            for drop in (False, True):
                shards = [list(pl.shard_indices(n, i, count, drop_remainder=drop)) for i in range(count)]
                flat = sorted(sum(shards, []))
                assert len(flat) == len(set(flat))
                assert flat == (list(range(n)) if not drop else flat) and len(flat) >= n - count + 1
                if drop:
                    assert len({len(s) for s in shards}) == 1
    src = ArraySource(11)
    seen = []
    for i in range(3):  # three simulated hosts, one epoch each
        it = pl.train_loader(src, 3, image_size=4, num_workers=0, shard=(i, 3))
        seen.append(set(np.concatenate([b["label"] for b in take(it, 1)]).tolist()))
    assert all(len(s) == 3 for s in seen) and not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])
    evals = [list(pl.eval_loader(src, 2, image_size=4, num_workers=0, shard=(i, 3))) for i in range(3)]
    assert {len(e) for e in evals} == {2}  # ceil(ceil(11 / 3) / 2): every host steps the same number of times
    labels = [int(l) for e in evals for b in e for l, m in zip(b["label"], b["mask"]) if m]
    assert sorted(labels) == list(range(11))


def test_eval_loader_is_larq_zoo_center_crop_rounded(folder):
    src = pl.ImageFolder(folder)
    batches = list(pl.eval_loader(src, 16, image_size=12, num_workers=0))
    assert len(batches) == 3 and [int(b["mask"].sum()) for b in batches] == [16, 16, 8]
    assert not batches[-1]["image"][8:].any()
    images = np.concatenate([b["image"] for b in batches])[:40]
    labels = np.concatenate([b["label"] for b in batches])[:40]
    np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 10))
    for i in (0, 1, 2, 3, 5, 39):
        expected = pl.center_crop_resize(pl.decode_image(src[i]["image"]), 12)
        np.testing.assert_array_equal(images[i], np.clip(np.rint(expected), 0, 255).astype(np.uint8))
    assert len(list(pl.eval_loader(src, 16, image_size=12, num_workers=0))) == 3  # re-iterable


def test_worker_processes_give_the_same_stream_and_resume(folder):
    src = pl.ImageFolder(folder)
    kw = dict(image_size=16, seed=2)
    ref = take(pl.train_loader(src, 8, num_workers=0, **kw), 6)
    it = pl.train_loader(src, 8, num_workers=2, **kw)
    try:
        first = take(it, 3)
        state = it.get_state()
    finally:
        it.close()
    resumed = pl.train_loader(src, 8, num_workers=2, **kw)
    try:
        resumed.set_state(state)
        rest = take(resumed, 3)
    finally:
        resumed.close()
    for x, y in zip(first + rest, ref):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# --- devices ---------------------------------------------------------------------------------------

def test_global_batch_and_normalize():
    batch = {"image": np.arange(2 * 4 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 4, 3, 3, 3),
             "label": np.arange(8, dtype=np.int32).reshape(2, 4)}
    out = pl.global_batch(batch, batch_axis=1)
    assert out["image"].shape == (2, 4, 3, 3, 3) and isinstance(out["label"], jax.Array)
    np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
    assert out["image"].sharding.spec == jax.sharding.PartitionSpec(None, "batch")
    flat = pl.global_batch({"x": batch["image"][0]})
    assert flat["x"].sharding.spec == jax.sharding.PartitionSpec("batch")
    x = batch["image"][0]
    expected = (x.astype(np.float32) - np.float32(pl.MEAN_RGB)) / np.float32(pl.STDDEV_RGB)
    np.testing.assert_allclose(np.asarray(jax.jit(pl.normalize)(x)), expected, rtol=1e-6)


# --- tfds ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")

    class BnnjaxTestImages(tfds.core.GeneratorBasedBuilder):
        """Six PNG-encoded images; stored as bytes because encoding an Image feature needs TensorFlow."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(0)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(buf, "PNG")
                yield i, {"image": buf.getvalue(), "label": i % 3}

    BnnjaxTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_reads_array_records(tfds_dir):
    src = pl.TfdsSource("bnnjax_test_images", "train", tfds_dir)
    assert len(src) == 6 and src.classes == ["a", "b", "c"]
    assert isinstance(src[0]["image"], bytes) and src[0]["label"] in (0, 1, 2)
    assert pl.decode_image(src[0]["image"], src.describe(0)).shape == (9, 13, 3)
    batch = next(pl.train_loader(src, 4, image_size=8, num_workers=0))
    assert batch["image"].shape == (4, 8, 8, 3)
    assert [int(b["mask"].sum()) for b in pl.eval_loader(src, 4, image_size=8, num_workers=0)] == [4, 2]
    import pickle  # transport to worker processes only: the open record reader is not part of the state
    clone = pickle.loads(pickle.dumps(src))
    assert clone[5]["label"] == src[5]["label"]


def test_tfds_source_errors(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
        pl.TfdsSource("no_such_dataset_xyz", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared.*tfds build mnist"):
        pl.TfdsSource("mnist", "train", tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):
        pl.TfdsSource("bnnjax_test_images", "test", tfds_dir)
