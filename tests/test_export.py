from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import bnnjax
from bnnjax import datasets, export, train
from bnnjax.layers import Flatten, MaxPool, QuantConv, QuantDense

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
B = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign")


def randomize_bn(variables, seed=0, negative_scale=False):
    """Give every BatchNorm non-trivial statistics (and optionally negative scales)."""
    rng = np.random.default_rng(seed)

    def visit(path, x):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        if name == "mean":
            return jnp.asarray(rng.normal(size=x.shape) * 3, x.dtype)
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 20, size=x.shape), x.dtype)
        if name == "scale":
            s = rng.uniform(0.2, 2, size=x.shape) * (np.where(rng.random(x.shape) < 0.5, -1, 1) if negative_scale else 1)
            return jnp.asarray(s, x.dtype)
        if name == "bias":
            return jnp.asarray(rng.normal(size=x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(visit, variables)


class Mixed(nn.Module):
    """Covers: real first layer, SAME zero- and one-padding, strides, BN before and after pooling,
    C not a multiple of 32 into Flatten, a float last layer with bias."""

    @nn.compact
    def __call__(self, x, train=False):
        bn = lambda: nn.BatchNorm(use_running_average=not train)
        x = QuantConv(20, (3, 3), padding="SAME", kernel_quantizer="ste_sign", use_bias=False)(x)
        x = bn()(MaxPool((2, 2))(x))
        x = QuantConv(40, (3, 3), padding="SAME", use_bias=False, **B)(x)  # zero padding: needs correction
        x = MaxPool((2, 2))(bn()(x))  # BN before the pool
        x = QuantConv(24, (3, 3), strides=(2, 2), padding="SAME", pad_values=1.0, use_bias=False, **B)(x)
        x = Flatten()(bn()(x))
        x = QuantDense(33, use_bias=False, **B)(x)
        x = bn()(x)
        return nn.Dense(5)(x)  # full-precision last layer


@pytest.mark.parametrize("negative_scale", [False, True])
def test_mixed_model_exports_exactly(negative_scale, tmp_path):
    model = Mixed()
    x = jax.random.normal(jax.random.key(0), (64, 15, 13, 3))
    v = randomize_bn(model.init(jax.random.key(1), x[:1]), negative_scale=negative_scale)
    packed = export.export(model, v, x)
    kinds = [op["op"] for op in packed.ops]
    assert kinds.count("bconv") == 2 and kinds.count("bdense") == 1 and "maxpool_bits" in kinds
    assert "correction" in packed.ops[kinds.index("bconv")]  # zero-padded SAME conv got LCE's correction
    ref = model.apply(v, x)
    got = packed(x)
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(ref, -1))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    path = tmp_path / "m.bnn"
    export.save_packed(path, packed)
    assert path.read_bytes()[:1] != b"\x80"  # msgpack, not a pickle stream
    np.testing.assert_array_equal(export.load_packed(path)(x), got)


def test_seed000_batch1_and_file_size(tmp_path):
    model = bnnjax.models.LarqTutorialCNN()
    x = jax.random.normal(jax.random.key(0), (32, 28, 28, 1))
    v = randomize_bn(model.init(jax.random.key(1), x[:1]))
    packed = export.export(model, v, x)
    assert all(op["op"] not in ("sign", "affine") for op in packed.ops[:-1])  # bits flow layer to layer
    np.testing.assert_allclose(packed(x[:1]), model.apply(v, x[:1]), atol=1e-4)
    size = export.save_packed(tmp_path / "s.bnn", packed)
    assert size <= 16 * 1024


@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_trained_seed000_predicts_identically_on_the_real_test_set(tmp_path):
    (x, y), (xt, yt) = [datasets.load_dataset("fashion_mnist", s) for s in ("train", "test")]
    x, xt = datasets.preprocess(x[:6400]), datasets.preprocess(xt)
    model = bnnjax.models.LarqTutorialCNN()
    state = train.create_train_state(model, optax.chain(optax.adam(1e-3), bnnjax.weight_clip()), x[:1])
    state, _ = train.fit(state, (x, y[:6400]), None, epochs=1, batch_size=64, progress=False)
    v = {"params": state.params, "batch_stats": state.batch_stats}
    export.save_packed(tmp_path / "seed000.bnn", export.export(model, v, xt[:500]))
    packed = export.load_packed(tmp_path / "seed000.bnn")
    apply = jax.jit(lambda a: model.apply(v, a))
    for i in range(0, 10000, 2000):
        ref, got = np.asarray(apply(xt[i:i + 2000])), np.asarray(packed(xt[i:i + 2000]))
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_errors_name_the_layer():
    x = jnp.ones((2, 8))

    class Unknown(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.LayerNorm()(QuantDense(4, **B)(x))

    v = Unknown().init(jax.random.key(0), x)
    with pytest.raises(export.ExportError, match="LayerNorm_0.*cannot be exported"):
        export.export(Unknown(), v, x)

    class NotBinaryInput(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return QuantDense(4, input_quantizer="dorefa", kernel_quantizer="ste_sign")(x)

    v = NotBinaryInput().init(jax.random.key(0), x)
    with pytest.raises(export.ExportError, match="QuantDense_0.*dorefa"):
        export.export(NotBinaryInput(), v, x)

    class Hidden(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = QuantDense(16, kernel_quantizer="ste_sign")(x)
            x = jnp.abs(x) - 3.0  # invisible to the exporter
            return QuantDense(3, **B)(x)

    xs = jax.random.normal(jax.random.key(3), (64, 8))
    v = Hidden().init(jax.random.key(0), xs)
    with pytest.raises(export.ExportError, match="cannot see"):
        export.export(Hidden(), v, xs)


def test_wrong_input_shape_and_bad_files(tmp_path):
    model = bnnjax.models.LarqTutorialCNN()
    x = jnp.zeros((2, 28, 28, 1))
    packed = export.export(model, model.init(jax.random.key(0), x), x)
    with pytest.raises(ValueError, match=r"\(batch, 28, 28, 1\), got \(2, 32, 32, 1\)"):
        packed(jnp.zeros((2, 32, 32, 1)))
    (tmp_path / "bad.bnn").write_bytes(b"\x93not msgpack at all")
    with pytest.raises(ValueError, match="bad.bnn"):
        export.load_packed(tmp_path / "bad.bnn")
    from flax import serialization
    (tmp_path / "other.bnn").write_bytes(serialization.msgpack_serialize({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a bnnjax packed model"):
        export.load_packed(tmp_path / "other.bnn")


class XnorStyle(nn.Module):
    """Scaled sign kernels (XNOR-Net) whose per-channel scales fold into the thresholds."""

    @nn.compact
    def __call__(self, x, train=False):
        bn = lambda: nn.BatchNorm(use_running_average=not train)
        xnor = dict(input_quantizer="ste_sign", kernel_quantizer="xnor_weight_scale", use_bias=False)
        x = MaxPool((2, 2))(nn.Conv(12, (3, 3), padding="SAME", use_bias=False)(x))
        x = MaxPool((2, 2))(QuantConv(16, (3, 3), padding="SAME", **xnor)(bn()(x)))
        x = QuantDense(24, **xnor)(bn()(Flatten()(x)))
        return nn.Dense(4)(bn()(x))


def test_xnor_scaled_kernels_export_exactly():
    model = XnorStyle()
    x = jax.random.normal(jax.random.key(0), (64, 12, 12, 2))
    v = randomize_bn(model.init(jax.random.key(1), x[:1]), seed=2, negative_scale=True)
    packed = export.export(model, v, x)
    kinds = [op["op"] for op in packed.ops]
    assert "bconv" in kinds and "bdense" in kinds and "maxpool_bits" in kinds
    np.testing.assert_array_equal(np.argmax(packed(x), -1), np.argmax(model.apply(v, x), -1))
    np.testing.assert_allclose(packed(x), model.apply(v, x), rtol=1e-5, atol=1e-4)


def _exports_like_the_model(model, variables, x, tmp_path):
    packed = export.export(model, variables, x)
    want = np.asarray(model.apply(variables, x))
    export.save_packed(tmp_path / "m.bnn", packed)
    for p in (packed, export.load_packed(tmp_path / "m.bnn")):
        got = np.asarray(p(x))
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return packed


def test_bireal_residual_net_exports_with_packed_binary_convs(tmp_path):
    """Residual blocks (identity and average-pool + 1x1 conv shortcuts, stride 2, SAME zero padding,
    odd spatial sizes, magnitude-aware kernels) run their binary convs packed and match the model."""
    model = bnnjax.models.BiRealNet(stage_sizes=(1, 2, 1), width=8)
    x = jax.random.uniform(jax.random.key(2), (16, 13, 13, 1), minval=-1, maxval=1)
    v = randomize_bn(model.init(jax.random.key(1), x[:1]))
    packed = _exports_like_the_model(model, v, x, tmp_path)
    ops = [o["op"] for o in packed.ops]
    assert ops.count("bconv") == 4 and ops.count("add") == 4 and ops.count("avgpool") == 2


class ABCModel(nn.Module):
    m: int
    n: int | None

    @nn.compact
    def __call__(self, x, train=False):
        x = bnnjax.ABCConv(6, (3, 3), strides=2, num_weight_bases=self.m, num_act_bases=self.n)(x)
        x = nn.BatchNorm(use_running_average=not train)(MaxPool((2, 2))(x))
        x = bnnjax.layers.Activation("relu")(x)
        x = bnnjax.ABCConv(5, (3, 3), padding="VALID", num_weight_bases=self.m, num_act_bases=self.n,
                           use_bias=False)(x)
        x = bnnjax.ABCDense(7, num_weight_bases=self.m, num_act_bases=self.n)(Flatten()(x))
        return nn.Dense(3)(bnnjax.layers.Activation("relu")(x))


@pytest.mark.parametrize("m,n", [(1, 1), (3, 2), (2, None)])
def test_abc_layers_export_as_m_by_n_packed_binary_ops(m, n, tmp_path):
    model = ABCModel(m, n)
    x = jax.random.uniform(jax.random.key(2), (16, 15, 15, 3))
    v = randomize_bn(model.init(jax.random.key(1), x[:1]))
    # learned shifts and betas, not the defaults
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 1.3 + 0.05 if getattr(p[-1], "key", None) in ("shift", "beta") else a, v)
    packed = _exports_like_the_model(model, v, x, tmp_path)
    ops = [o["op"] for o in packed.ops]
    assert ops.count("abc_conv") == (2 if n else 0) and ops.count("abc_dense") == (1 if n else 0)


def test_unsupported_activation_is_a_clear_export_error():
    class Tanh(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return QuantDense(3, **B)(bnnjax.layers.Activation("tanh")(x))

    x = jnp.ones((2, 4))
    with pytest.raises(export.ExportError, match="Activation_0.*'tanh'"):
        export.export(Tanh(), Tanh().init(jax.random.key(0), x), x)
