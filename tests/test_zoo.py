"""bnnjax.zoo's loading machinery: Keras .h5 files, the registry, downloads of released weights."""

import hashlib
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnnjax
from bnnjax import zoo
from bnnjax._download import DownloadError
from bnnjax.layers import QuantParam
from bnnjax.models import LarqTutorialCNN
from bnnjax.zoo import _base


def write_keras_h5(path, layers, chunked=False):
    """A weights file in tf-keras' ``save_weights`` layout: ``layers`` is ``[(name, [(weight, array)])]``
    in ``model.layers`` order (weightless layers have an empty list)."""
    with h5py.File(path, "w") as f:
        names = np.array([n.encode() for n, _ in layers])
        if chunked:  # Keras splits attributes over 64 KiB into name0, name1, ...
            f.attrs["layer_names0"], f.attrs["layer_names1"] = names[:2], names[2:]
        else:
            f.attrs["layer_names"] = names
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.19.0"
        for name, weights in layers:
            g = f.create_group(name)
            g.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w, _ in weights])
            for w, a in weights:
                g.create_dataset(f"{name}/{w}:0", data=a)


def seed000_layers(rng):
    """Larq's seed-000 Sequential model as Keras names and orders its weights (BatchNorm(scale=False):
    beta, moving_mean, moving_variance)."""
    a = lambda *s: rng.normal(size=s).astype(np.float32)
    bn = lambda n, c: (n, [("beta", a(c)), ("moving_mean", a(c)), ("moving_variance", np.abs(a(c)) + 0.5)])
    return [("quant_conv2d", [("kernel", a(3, 3, 1, 32))]), ("max_pooling2d", []), bn("batch_normalization", 32),
            ("quant_conv2d_1", [("kernel", a(3, 3, 32, 64))]), ("max_pooling2d_1", []),
            bn("batch_normalization_1", 64), ("quant_conv2d_2", [("kernel", a(3, 3, 64, 64))]),
            bn("batch_normalization_2", 64), ("flatten", []), ("quant_dense", [("kernel", a(576, 64))]),
            bn("batch_normalization_3", 64), ("quant_dense_1", [("kernel", a(64, 10))]),
            bn("batch_normalization_4", 10), ("activation", [])]


@pytest.mark.parametrize("chunked", [False, True])
def test_keras_weights_land_in_the_flax_variables_by_layer_order(tmp_path, chunked):
    layers = seed000_layers(np.random.default_rng(0))
    write_keras_h5(tmp_path / "w.h5", layers, chunked)
    v = zoo.load_weights(LarqTutorialCNN(), tmp_path / "w.h5", input_shape=(28, 28, 1))
    w = dict(layers)
    kernel = v["params"]["QuantConv_1"]["kernel"]
    assert isinstance(kernel, QuantParam)  # the binary kernel's tag survives loading
    np.testing.assert_array_equal(kernel.value, w["quant_conv2d_1"][0][1])
    np.testing.assert_array_equal(v["params"]["QuantDense_1"]["kernel"].value, w["quant_dense_1"][0][1])
    for i in range(5):
        keras = dict(w["batch_normalization" + (f"_{i}" if i else "")])
        np.testing.assert_array_equal(v["params"][f"BatchNorm_{i}"]["bias"], keras["beta"])
        np.testing.assert_array_equal(v["batch_stats"][f"BatchNorm_{i}"]["mean"], keras["moving_mean"])
        np.testing.assert_array_equal(v["batch_stats"][f"BatchNorm_{i}"]["var"], keras["moving_variance"])


def test_depthwise_and_fixed_kernels_take_keras_layout(tmp_path):
    """Keras' depthwise kernels are (kh, kw, C, 1); Flax's (kh, kw, 1, C)."""
    model = zoo.QuickNet(num_classes=3, section_blocks=(1, 1), section_filters=(32, 64))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(1)
    dw = rng.normal(size=(3, 3, 8, 1)).astype(np.float32)
    blur = rng.normal(size=(3, 3, 32, 1)).astype(np.float32)
    # model.layers order of this QuickNet: stem conv, BN, depthwise, BN (moving stats only), 1x1 conv, BN,
    # block conv, BN, transition blur, 1x1 conv, BN, block conv, BN, dense
    a = lambda *s: rng.normal(size=s).astype(np.float32)
    bn = lambda c: [("gamma", a(c)), ("beta", a(c)), ("moving_mean", a(c)), ("moving_variance", a(c) ** 2)]
    layers = [("quant_conv2d", [("kernel", a(3, 3, 3, 8))]), ("bn0", bn(8)), ("relu", []),
              ("quant_depthwise_conv2d", [("depthwise_kernel", dw)]),
              ("bn1", [("moving_mean", a(8)), ("moving_variance", a(8) ** 2)]),
              ("quant_conv2d_1", [("kernel", a(1, 1, 8, 32))]), ("bn2", bn(32)),
              ("quant_conv2d_2", [("kernel", a(3, 3, 32, 32))]), ("bn3", bn(32)),
              ("depthwise_conv2d", [("depthwise_kernel", blur)]), ("quant_conv2d_3", [("kernel", a(1, 1, 32, 64))]),
              ("bn4", bn(64)), ("quant_conv2d_4", [("kernel", a(3, 3, 64, 64))]), ("bn5", bn(64)),
              ("quant_dense", [("kernel", a(64, 3)), ("bias", a(3))])]
    write_keras_h5(tmp_path / "q.h5", layers)
    loaded = zoo.load_weights(model, tmp_path / "q.h5", input_shape=(32, 32, 3))
    assert jax.tree.structure(loaded) == jax.tree.structure(v)
    np.testing.assert_array_equal(loaded["params"]["QuantDepthwiseConv2D_0"]["kernel"][:, :, 0, :], dw[:, :, :, 0])
    np.testing.assert_array_equal(loaded["constants"]["FixedDepthwiseConv2D_0"]["kernel"][:, :, 0, :], blur[..., 0])
    y = model.apply(loaded, jnp.ones((1, 32, 32, 3)))
    assert y.shape == (1, 3) and np.isclose(float(y.sum()), 1.0, atol=1e-5)


def test_files_that_do_not_fit_name_the_layer_and_shapes(tmp_path):
    layers = seed000_layers(np.random.default_rng(0))
    bad = [(n, [(w, a[..., :5]) if n == "quant_conv2d_2" else (w, a) for w, a in ws]) for n, ws in layers]
    write_keras_h5(tmp_path / "shape.h5", bad)
    with pytest.raises(zoo.WeightsFileError, match=r"QuantConv_2 \(QuantConv: kernel \(3, 3, 64, 64\)\).*"
                                                    r"quant_conv2d_2 \(kernel:0 \(3, 3, 64, 5\)\)"):
        zoo.load_weights(LarqTutorialCNN(), tmp_path / "shape.h5", input_shape=(28, 28, 1))
    write_keras_h5(tmp_path / "short.h5", layers[:-3])
    with pytest.raises(zoo.WeightsFileError, match="has 8 layers with weights, the model has 10"):
        zoo.load_weights(LarqTutorialCNN(), tmp_path / "short.h5", input_shape=(28, 28, 1))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(zoo.WeightsFileError, match="not a readable HDF5 file"):
        zoo.load_weights(LarqTutorialCNN(), tmp_path / "junk.h5", input_shape=(28, 28, 1))
    with h5py.File(tmp_path / "keras3.weights.h5", "w") as f:
        f.create_group("layers")
    with pytest.raises(zoo.WeightsFileError, match="Keras 3"):
        zoo.load_weights(LarqTutorialCNN(), tmp_path / "keras3.weights.h5", input_shape=(28, 28, 1))


def test_load_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown zoo model 'QuickNot'.*QuickNet"):
        zoo.load("QuickNot")
    with pytest.raises(ValueError, match="no such file"):
        zoo.load("QuickNet", weights="/nonexistent/weights.h5")
    with pytest.raises(ValueError, match="1000 classes"):
        zoo.load("QuickNet", weights="imagenet", num_classes=10)
    with pytest.raises(ValueError, match=r"\(height, width, 3\)"):
        zoo.load("QuickNet", input_shape=(224, 224, 1))


def test_registry_has_every_larq_zoo_model_with_its_released_weights():
    assert zoo.names() == sorted([
        "QuickNet", "QuickNetSmall", "QuickNetLarge", "BiRealNet", "BinaryResNetE18", "BinaryDenseNet28",
        "BinaryDenseNet37", "BinaryDenseNet37Dilated", "BinaryDenseNet45", "MeliusNet22", "RealToBinaryNet",
        "XNORNet", "DoReFaNet", "BinaryAlexNet"])
    for name in zoo.names():
        for w in zoo.WEIGHTS[name].values():
            assert w.url.startswith(_base.RELEASES + "/") and len(bytes.fromhex(w.sha256)) == 32


def test_imagenet_weights_download_once_through_the_mirror_then_load(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "zoo"
    mirror.mkdir(parents=True)
    layers = seed000_layers(np.random.default_rng(0))
    write_keras_h5(mirror / "seed000_weights.h5", layers)
    digest = hashlib.sha256((mirror / "seed000_weights.h5").read_bytes()).hexdigest()
    monkeypatch.setitem(zoo.MODELS, "Seed000", LarqTutorialCNN)
    monkeypatch.setitem(zoo.WEIGHTS, "Seed000", {True: _base.release("seed000", "v1", "seed000_weights.h5", digest)})
    monkeypatch.setenv("BNNJAX_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BNNJAX_DATASET_MIRROR", str(tmp_path / "mirror"))
    path = zoo.weights_path("Seed000", progress=False)
    assert path == tmp_path / "cache" / "zoo" / "seed000_weights.h5"
    v = zoo.load_weights(LarqTutorialCNN(), path, input_shape=(28, 28, 1))
    np.testing.assert_array_equal(v["params"]["QuantConv_0"]["kernel"].value, layers[0][1][0][1])
    os.remove(mirror / "seed000_weights.h5")  # cached: the mirror is not needed any more
    assert zoo.weights_path("Seed000", progress=False) == path
    monkeypatch.setenv("BNNJAX_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DownloadError, match="seed000_weights.h5"):
        zoo.weights_path("Seed000", progress=False)
    with pytest.raises(ValueError, match="no ImageNet weights for Seed000 with include_top=False"):
        zoo.weights_path("Seed000", include_top=False)


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_as_nnx_has_the_same_tags_and_summary(name):
    """The NNX form (the linen description through bnnjax.nnx.LinenModel) tags exactly the linen model's
    binary kernels as QuantParams and summarizes to the same figures (shapes only: nothing computed)."""
    from flax import nnx

    from bnnjax import layers as L
    from bnnjax import nnx as bnx

    model = zoo.MODELS[name]()
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)
    m = bnx.LinenModel(model, variables)
    binary = [v for v in jax.tree.leaves(variables, is_leaf=L.is_quantized) if L.is_binary(v)]
    tagged = [v for _, v in nnx.to_flat_state(nnx.state(m, bnx.QuantParam)) if v.precision == 1 and v.quantizer != "abc"]
    assert len(tagged) == len(binary) > 0
    assert len(jax.tree.leaves(nnx.state(m, nnx.Param))) == len(jax.tree.leaves(variables["params"]))
    a = bnnjax.summary(m, x, print_fn=None)
    b = bnnjax.summary(model, x, print_fn=None)
    assert a == b


def test_zoo_load_nnx_equals_linen_trains_and_packs():
    """A two-section QuickNet (stem, binary blocks, a blur-pool transition) at 32x32 with random
    BatchNorm statistics: the NNX model's outputs equal the linen model's, it takes an nnx.Optimizer
    step, and packs to the same predictions."""
    import optax
    from flax import nnx

    from bnnjax import export
    from bnnjax import nnx as bnx

    small = dict(input_shape=(32, 32, 3), num_classes=10, section_blocks=(1, 1), section_filters=(16, 32))
    model, v = zoo.load("QuickNet", classifier_activation=None, **small)
    keys = iter(jax.random.split(jax.random.key(3), 256))
    v = {**v, "batch_stats": jax.tree.map(lambda a: jax.random.uniform(next(keys), a.shape, minval=0.5, maxval=1.5),
                                          v["batch_stats"])}
    m = bnx.LinenModel(model, v)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    call = nnx.jit(lambda mm, a: mm(a))
    y = call(m, x)
    np.testing.assert_array_equal(y, jax.jit(model.apply)(v, x))
    m2 = zoo.load("QuickNet", api="nnx", **small)
    assert isinstance(m2, bnx.LinenModel) and m2.deterministic
    packed = export.pack(m, x)  # verified inside: same argmax, outputs within 1 %
    assert isinstance(packed, bnx.LinenModel)
    path, kernel = next((p, v) for p, v in nnx.to_flat_state(nnx.state(m, bnx.QuantParam)) if v.precision == 1)
    layer = path[1]  # ("vars", <the binary conv>, "kernel")
    assert isinstance(packed.linen_variables()["params"][layer]["kernel"], bnnjax.packing.PackedKernel)
    opt = nnx.Optimizer(m, optax.chain(optax.adam(1e-3), bnnjax.weight_clip(zoo.quicknet.CLIP_VALUE)), wrt=nnx.Param)

    @nnx.jit
    def step(mm, opt):
        opt.update(mm, nnx.grad(lambda mm: -jax.nn.log_softmax(mm(x))[:, 0].mean())(mm))

    m.train()
    before = np.asarray(kernel.get_value())
    step(m, opt)
    after = m.vars[layer]["kernel"].get_value()
    assert not np.array_equal(before, after) and float(jnp.abs(after).max()) <= zoo.quicknet.CLIP_VALUE
    with pytest.raises(ValueError, match="api must be"):
        zoo.load("QuickNet", api="keras")
