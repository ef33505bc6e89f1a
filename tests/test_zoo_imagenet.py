"""bnnjax.zoo.preprocess_input / decode_predictions: larq-zoo's and Keras' ImageNet pre- and post-processing."""

import hashlib
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bnnjax import _download, datasets, pipeline, zoo
from bnnjax.zoo import _imagenet


def formula_image(h=37, w=53):
    yy, xx, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return ((yy * 29 + xx * 17 + cc * 71 + (yy * xx) % 13) % 256).astype(np.uint8)


# Reference outputs of larq-zoo 2.4.0's larq_zoo.preprocess_input (TensorFlow 2.19.1, CPU) on formula_image()
# (a 37x53 image, so the 32x32 center crop is upscaled to 224) as uint8, and as float32 "x * 0.5 + 3.25";
# generated once with the peer virtualenv (PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python
# TF_USE_LEGACY_KERAS=1): the SHA-256 of the float32 (224, 224, 3) output's little-endian bytes, and a
# few of its pixels. tests/test_pipeline.py checks the downscaling geometry (300x260) the same way.
LARQ_ZOO = {
    "uint8": ("dadcf6e05d3f45592f1ed30c3ceb79afaf67fcaf76339f34aac0b0453c808565",
              {(0, 0): [-1.689785122871399, -0.3550420105457306, 1.1062309741973877],
               (111, 57): [-0.18191353976726532, 1.1864879131317139, -1.618274450302124],
               (223, 223): [0.8916910290718079, 2.2840561866760254, -0.7282734513282776]}),
    "float32": ("8cbbd7aafefd1cebb24eb5c0eb013f629a1bb4a559900cf628675f7a56cb5a21",
                {(0, 223): [-1.700390100479126, -0.9873822331428528, -0.1420353204011917],
                 (5, 150): [-0.7610231637954712, 0.2250048965215683, -1.4787789583206177]}),
}


@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_preprocess_input_is_larq_zoos_bit_for_bit(kind):
    img = formula_image()
    x = img if kind == "uint8" else img.astype(np.float32) * 0.5 + 3.25
    out = zoo.preprocess_input(x)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32 and isinstance(out, np.ndarray)
    digest, pixels = LARQ_ZOO[kind]
    for (i, j), v in pixels.items():
        np.testing.assert_array_equal(out[i, j], np.float32(v))
    assert hashlib.sha256(np.ascontiguousarray(out, "<f4").tobytes()).hexdigest() == digest
    # the streaming pipeline's device-side normalize: the same up to XLA's last-bit division
    on_device = np.asarray(pipeline.normalize(pipeline.center_crop_resize(x)))
    np.testing.assert_allclose(on_device, out, rtol=0, atol=3e-7)


def test_preprocess_input_shapes_dtypes_and_errors():
    img = formula_image(40, 30)
    out = zoo.preprocess_input(img)
    # crop, resize and normalize as documented, whatever the integer dtype
    expected = (pipeline.center_crop_resize(img) - np.float32(pipeline.MEAN_RGB)) / np.float32(pipeline.STDDEV_RGB)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(zoo.preprocess_input(img.astype(np.int64)), out)
    np.testing.assert_array_equal(zoo.preprocess_input(jnp.asarray(img)), out)
    small = zoo.preprocess_input(img, image_size=32)
    assert small.shape == (32, 32, 3) and small.dtype == np.float32
    # a constant image maps to (c - mean) / std everywhere (the resize keeps constants, up to rounding)
    grey = zoo.preprocess_input(np.full((50, 60, 3), 128, np.uint8))
    want = (128 - np.float32(pipeline.MEAN_RGB)) / np.float32(pipeline.STDDEV_RGB)
    np.testing.assert_allclose(grey, np.broadcast_to(want, grey.shape), atol=1e-5)
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"Input must be of size \[height, width, C>0\]"):
            zoo.preprocess_input(bad)
    for bad in (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 1), np.uint8), np.zeros((0, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match="RGB image"):
            zoo.preprocess_input(bad)
    with pytest.raises(ValueError, match="dtype"):
        zoo.preprocess_input(np.full((8, 8, 3), "a"))


# --- decode_predictions ----------------------------------------------------------------------------

def fake_index():
    """A 1000-class index in Keras' layout, wnids sorted as in the real file (n00000000, n00000017, ...)."""
    return {str(i): [f"n{i * 17:08d}", f"class_{i}"] for i in range(1000)}


def test_decode_predictions_like_keras():
    index = fake_index()
    preds = np.random.default_rng(0).random((3, 1000)).astype(np.float32)
    preds[1, [7, 500]] = 2.0  # a tie: lower class index first
    got = zoo.decode_predictions(preds, top=5, class_index=index)
    assert len(got) == 3 and all(len(r) == 5 for r in got)
    for row, p in zip(got, preds):
        scores = [s for _, _, s in row]
        assert scores == sorted(scores, reverse=True)
        top = np.argsort(p)[::-1][:5]
        assert {w for w, _, _ in row} == {index[str(i)][0] for i in top}
        for wnid, name, score in row:
            i = int(name.split("_")[1])
            assert index[str(i)][0] == wnid and score == float(p[i]) and isinstance(score, float)
    assert [w for w, _, _ in got[1][:2]] == ["n00000119", "n00008500"]
    assert zoo.decode_predictions(jnp.asarray(preds), top=1, class_index=index) == [r[:1] for r in got]
    for bad in (preds[0], preds[:, :10], preds[None]):
        with pytest.raises(ValueError, match=r"shape \(samples, 1000\)"):
            zoo.decode_predictions(bad, class_index=index)
    for top in (0, 1.5, True):
        with pytest.raises(ValueError, match="top"):
            zoo.decode_predictions(preds, top=top, class_index=index)
    with pytest.raises(ValueError, match="not an ImageNet class index"):
        zoo.decode_predictions(preds, class_index={"0": ["n0", "x"]})


def test_class_index_download_through_the_mirror_then_cache(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "zoo").mkdir(parents=True)
    blob = json.dumps(fake_index()).encode()
    (mirror / "zoo" / "imagenet_class_index.json").write_bytes(blob)
    monkeypatch.setattr(_imagenet, "CLASS_INDEX_SHA256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(_imagenet, "CLASS_INDEX_SIZE", len(blob))
    monkeypatch.setenv("BNNJAX_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BNNJAX_DATASET_MIRROR", str(mirror))
    preds = np.zeros((1, 1000), np.float32)
    preds[0, 999] = 1.0
    assert zoo.decode_predictions(preds, top=1) == [[("n00016983", "class_999", 1.0)]]
    cached = tmp_path / "cache" / "zoo" / "imagenet_class_index.json"
    assert cached.read_bytes() == blob
    (mirror / "zoo" / "imagenet_class_index.json").unlink()  # from now on the cache serves it
    classes = zoo.load_class_index()
    assert len(classes) == 1000 and classes[3] == ("n00000051", "class_3")
    assert zoo.load_class_index(str(cached)) == classes  # a local copy, by path
    # a wrong digest is caught: the cached copy is replaced by a download, which the mirror no longer has
    monkeypatch.setattr(_imagenet, "CLASS_INDEX_SHA256", "0" * 64)
    with pytest.raises(datasets.DataError):
        zoo.load_class_index(progress=False)
    monkeypatch.setattr(_imagenet, "CLASS_INDEX_SHA256", None)
    with pytest.raises(_download.DataError, match="class_index="):
        zoo.decode_predictions(preds)
    with pytest.raises(FileNotFoundError):
        zoo.load_class_index(tmp_path / "missing.json")


def test_class_index_order_is_image_folders_label_order(tmp_path):
    # label i = the i-th wnid of the index = the i-th folder of an ImageFolder of ImageNet's 1000 wnids;
    # the index's wnids are sorted (they are in Keras' file too; CLASS_INDEX_SHA256 pins that file)
    index = fake_index()
    wnids = [index[str(i)][0] for i in range(1000)]
    assert wnids == sorted(wnids)
    png = tmp_path / "px.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(png)
    for w in reversed(wnids):  # creation order does not matter
        (tmp_path / "val" / w).mkdir(parents=True)
        (tmp_path / "val" / w / "a.png").write_bytes(png.read_bytes())
    folder = pipeline.ImageFolder(tmp_path / "val")
    assert folder.classes == wnids
    assert [folder[i]["label"] for i in (0, 17, 999)] == [0, 17, 999]
