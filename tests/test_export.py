import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import serialization

import bnnjax
from bnnjax import datasets, export, ops, train, zoo
from bnnjax import packing as pk
from bnnjax import layers as L
from bnnjax.layers import BatchNorm, Flatten, MaxPool, QuantConv, QuantDense

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


def init(model, x):
    """The model's variables for inputs like ``x``: ``model.init`` jitted (an eager init compiles every
    op of every layer on its own, most of these tests' time)."""
    return jax.jit(model.init)(jax.random.key(1), x[:1])


def packed_kernels(tree):
    return [l for l in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, pk.PackedKernel))
            if isinstance(l, pk.PackedKernel)]


class Mixed(nn.Module):
    """Real first layer with a 1-bit kernel, SAME zero- and one-padding, strides, a dilated conv, BN
    before and after pooling, a residual add and a concatenation written as plain jnp code, C not a
    multiple of 32 into a flatten, scaled (XNOR-Net) kernels, a float last layer with bias; bnnjax's
    BatchNorm (folded by pack) and Flax's (kept)."""

    @nn.compact
    def __call__(self, x, train=False):
        flax_bn = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
        bn = lambda: BatchNorm(use_running_average=not train, epsilon=1e-3)  # noqa: E731
        x = QuantConv(20, (3, 3), padding="SAME", kernel_quantizer="ste_sign", use_bias=False)(x)
        x = flax_bn()(MaxPool((2, 2))(x))
        y = QuantConv(20, (3, 3), padding="SAME", use_bias=False, **B)(x)  # zero padding: corrected
        x = bn()(y) + x  # residual add
        y = QuantConv(12, (3, 3), kernel_dilation=2, padding="SAME", pad_values=1.0, use_bias=False, **B)(x)
        x = jnp.concatenate([x, bn()(y)], axis=-1)  # dense-block concatenation
        x = MaxPool((2, 2))(x)
        x = QuantConv(24, (3, 3), strides=(2, 2), padding="SAME", input_quantizer="ste_sign",
                      kernel_quantizer="xnor_weight_scale", use_bias=False)(x)
        x = Flatten()(bn()(x))
        x = QuantDense(33, input_quantizer="approx_sign", kernel_quantizer="magnitude_aware_sign")(x)
        x = bn()(x)
        return nn.Dense(5)(x)


@pytest.fixture(scope="module")
def mixed():
    """The Mixed model, its batch, initial variables and one jitted apply: the tests on it share its
    compiled programs (the float and the packed variable trees each compile once)."""
    model = Mixed()
    x = jax.random.normal(jax.random.key(0), (32, 15, 13, 3))
    return model, x, init(model, x), jax.jit(model.apply)


def _packs_like_the_model(model, variables, x, n_packed, apply=None):
    packed = export.pack(model, variables, x)
    assert len(packed_kernels(packed)) == n_packed
    apply = apply or jax.jit(model.apply)
    want = np.asarray(apply(variables, x))
    got = np.asarray(apply(packed, x))
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    return packed


@pytest.mark.parametrize("negative_scale", [False, True])
def test_any_flax_model_packs_and_predicts_like_the_float_model(negative_scale, mixed):
    model, x, v0, apply = mixed
    v = randomize_bn(v0, negative_scale=negative_scale)
    packed = _packs_like_the_model(model, v, x, n_packed=5, apply=apply)
    # every 1-bit kernel is stored 1 bit per weight, real-input ones too; float layers untouched
    first = packed["params"]["QuantConv_0"]["kernel"]
    assert not first.per_tap and first.words.shape == (pk.num_words(27 * 20),)
    assert packed["params"]["Dense_0"]["kernel"] is v["params"]["Dense_0"]["kernel"]
    # bnnjax's BatchNorm layers hold two folded numbers per channel; Flax's (the first) keeps its own four
    stats = {name: sorted(d) for name, d in packed["batch_stats"].items()}
    assert stats == {"BatchNorm_0": ["mean", "var"], **{f"BatchNorm_{i}": ["multiplier", "offset"] for i in range(1, 5)}}
    assert [name for name in packed["params"] if name.startswith("BatchNorm")] == ["BatchNorm_0"]
    assert packed["batch_stats"]["BatchNorm_4"]["multiplier"].shape == (33,)
    # the packed layers really run the XNOR-popcount kernels
    assert "population_count" in str(jax.make_jaxpr(model.apply)(packed, x))


def test_packed_files_roundtrip_and_old_or_foreign_files_are_refused(tmp_path, mixed):
    model, x, v0, apply = mixed
    packed = export.pack(model, randomize_bn(v0))
    path = tmp_path / "m.msgpack"
    size = export.save_packed(path, packed)
    assert size == path.stat().st_size and path.read_bytes()[:1] != b"\x80"  # msgpack, not pickle
    loaded = export.load_packed(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(packed)
    np.testing.assert_array_equal(apply(loaded, x), apply(packed, x))
    (tmp_path / "old.bnn").write_bytes(serialization.msgpack_serialize({"format": "bnnjax-packed", "version": 1}))
    with pytest.raises(ValueError, match="retired op-list exporter.*export.pack"):
        export.load_packed(tmp_path / "old.bnn")
    (tmp_path / "bad.bnn").write_bytes(b"\x93not msgpack at all")
    with pytest.raises(ValueError, match="bad.bnn"):
        export.load_packed(tmp_path / "bad.bnn")
    (tmp_path / "other.bnn").write_bytes(serialization.msgpack_serialize({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a bnnjax packed-variables file"):
        export.load_packed(tmp_path / "other.bnn")
    with pytest.raises(FileNotFoundError):
        export.load_packed(tmp_path / "missing.bnn")


@pytest.fixture(scope="module")
def seed000():
    """The seed-000 model (LarqTutorialCNN): a batch, initial and randomized variables, the latter packed
    (folded, verified on the batch: it agrees) and unfolded, and one jitted apply the tests share."""
    model = bnnjax.models.LarqTutorialCNN()
    x = jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
    v0 = init(model, x)
    v = randomize_bn(v0)
    packed = export.pack(model, v, x)  # agrees (raises ExportError otherwise)
    return dict(model=model, x=x, v0=v0, v=v, packed=packed, unfolded=export.pack(model, v), apply=jax.jit(model.apply))


def test_pack_verifies_against_the_float_model(monkeypatch, seed000):
    model, x, v = seed000["model"], seed000["x"], seed000["v"]
    assert len(packed_kernels(seed000["packed"])) == 5  # packed, verified on x: it agrees
    original = ops.packed_dense
    monkeypatch.setattr(ops, "packed_dense", lambda *a, **k: -original(*a, **k))
    with pytest.raises(export.ExportError, match="differ"):
        export.pack(model, v, x)


def test_seed000_packed_size_is_larqs_model_size(seed000):
    """The binary kernels take 1 bit per weight (in words of 32), each folded BatchNorm two numbers per
    channel: Larq's 13.19 KiB (93,088 bits and 468 float32 numbers), up to the last words' padding.
    Without an example input BatchNorm keeps mean, variance and offset."""
    model, v = seed000["model"], seed000["v0"]
    x = jnp.zeros((1, 28, 28, 1))
    packed = export.pack(model, v, jax.ShapeDtypeStruct(x.shape, x.dtype))
    words = sum(k.words.size for k in packed_kernels(packed))
    # Larq's 93,088 binary weights: 288 (first layer, contiguous), 18,432, 36,864, 36,864 (packed per
    # 32-channel tap, no padding) and 640 bits for the 10 outputs of 64 inputs
    assert words * 32 == 93_088
    bn_channels = 32 + 64 + 64 + 64 + 10
    larq_bytes = 93_088 // 8 + 4 * 2 * bn_channels
    assert export.packed_bytes(packed) == 4 * words + 4 * 2 * bn_channels == larq_bytes
    assert round(larq_bytes / 1024, 2) == 13.19
    unfolded = export.pack(model, v)
    assert export.packed_bytes(unfolded) == 4 * words + 4 * 3 * bn_channels


class ABCModel(nn.Module):
    m: int
    n: int | None

    @nn.compact
    def __call__(self, x, train=False):
        x = bnnjax.ABCConv(6, (3, 3), strides=2, num_weight_bases=self.m, num_act_bases=self.n)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(MaxPool((2, 2))(x)))
        x = bnnjax.ABCConv(5, (3, 3), padding="VALID", num_weight_bases=self.m, num_act_bases=self.n,
                           use_bias=False)(x)
        x = bnnjax.ABCDense(7, num_weight_bases=self.m, num_act_bases=self.n)(Flatten()(x))
        return nn.Dense(3)(nn.relu(x))


@pytest.mark.parametrize("m,n", [(1, 1), (3, 2), (2, None)])
def test_abc_layers_run_their_m_by_n_binary_ops_packed(m, n):
    model = ABCModel(m, n)
    x = jax.random.uniform(jax.random.key(2), (16, 15, 15, 3))
    v = randomize_bn(init(model, x))
    # learned shifts and betas, not the defaults
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 1.3 + 0.05 if getattr(p[-1], "key", None) in ("shift", "beta") else a, v)
    packed = _packs_like_the_model(model, v, x, n_packed=3 if n else 0)
    for k in packed_kernels(packed):
        assert k.words.shape[0] == m and k.alpha.shape == (m,)


def test_bireal_residual_net_packs(tmp_path):
    """Residual blocks (identity and average-pool + 1x1 conv shortcuts, stride 2, SAME zero padding,
    odd spatial sizes, magnitude-aware kernels)."""
    model = bnnjax.models.BiRealNet(stage_sizes=(1, 2, 1), width=8)
    x = jax.random.uniform(jax.random.key(2), (16, 13, 13, 1), minval=-1, maxval=1)
    v = randomize_bn(init(model, x))
    _packs_like_the_model(model, v, x, n_packed=4)


def test_quicknet_packs_at_a_small_input_size():
    """A zoo model (one-padded binary blocks, blur-pool transitions, constants collection) packs."""
    model = zoo.QuickNet(num_classes=10, section_blocks=(1, 1, 1, 1), section_filters=(32, 64, 64, 96))
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    v = randomize_bn(init(model, x))
    packed = _packs_like_the_model(model, v, x, n_packed=4)
    # the blur pools' kernels, one filter repeated over channels, are stored once
    blur = {k: d["kernel"] for k, d in packed["constants"].items()}
    assert len(blur) == 2 and all(k.shape == (3, 3, 1, 1) for k in blur.values())
    for name, k in blur.items():
        np.testing.assert_array_equal(np.broadcast_to(k, v["constants"][name]["kernel"].shape),
                                      v["constants"][name]["kernel"])


@pytest.mark.parametrize("same_filter", [True, False])
def test_fixed_depthwise_kernel_is_stored_once_only_when_every_channel_has_it(same_filter):
    model = L.FixedDepthwiseConv2D((3, 3), strides=2)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
    v = init(model, x)
    if not same_filter:  # one channel's filter differs: all five are kept
        v = {"constants": {"kernel": v["constants"]["kernel"].at[0, 0, 0, 3].add(1.0)}}
    packed = export.pack(model, v, x)
    assert packed["constants"]["kernel"].shape == ((3, 3, 1, 1) if same_filter else (3, 3, 1, 5))
    np.testing.assert_array_equal(model.apply(packed, x), model.apply(v, x))


ARTIFACT_RUNNER = """
import sys
sys.modules["bnnjax"] = None  # the artifact must run with jax alone
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(exported.call(x)))
"""


def test_artifact_runs_with_jax_alone_at_any_batch_size(tmp_path, seed000):
    model, x, v, packed, apply = (seed000[k] for k in ("model", "x", "v", "packed", "apply"))
    path = tmp_path / "seed000.stablehlo"
    size = export.save_artifact(path, model, packed, x[:2])
    assert size == path.stat().st_size < 80_000
    x5 = np.asarray(jax.random.normal(jax.random.key(3), (5, 28, 28, 1)))
    np.save(tmp_path / "x.npy", x5)
    (tmp_path / "run.py").write_text(ARTIFACT_RUNNER)
    subprocess.run([sys.executable, str(tmp_path / "run.py"), str(path), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, cwd=tmp_path, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), apply(v, x5), rtol=1e-5, atol=1e-5)
    deployed = export.load_artifact(path)
    np.testing.assert_allclose(deployed.call(x5), apply(packed, x5), rtol=1e-5, atol=1e-5)
    # the program without source locations (strip-debuginfo), smaller than jax.export's own
    text = deployed.mlir_module()
    assert ".py" not in text and "bnnjax" not in text
    assert size < len(jax.export.export(jax.jit(lambda a: model.apply(packed, a)))(
        jax.ShapeDtypeStruct((jax.export.symbolic_shape("b")[0], 28, 28, 1), jnp.float32)).serialize())
    (tmp_path / "bad.stablehlo").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="not a jax.export artifact"):
        export.load_artifact(tmp_path / "bad.stablehlo")


@pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_trained_seed000_predicts_identically_on_the_real_test_set():
    (x, y), (xt, yt) = [datasets.load_dataset("fashion_mnist", s) for s in ("train", "test")]
    n = 1920  # 30 steps of 64: a trained model (about half the test set right, a random one a tenth)
    x, xt = datasets.preprocess(x[:n]), datasets.preprocess(xt)
    model = bnnjax.models.LarqTutorialCNN()
    state = train.create_train_state(model, optax.chain(optax.adam(1e-3), bnnjax.weight_clip()), x[:1])
    state, _ = train.fit(state, (x, y[:n]), None, epochs=1, batch_size=64, progress=False)
    v = {"params": state.params, "batch_stats": state.batch_stats}
    packed = export.pack(model, v, xt[:500])
    apply = jax.jit(model.apply)
    correct = 0
    for i in range(0, 10000, 2000):
        ref, got = np.asarray(apply(v, xt[i:i + 2000])), np.asarray(apply(packed, xt[i:i + 2000]))
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
        correct += int(np.sum(ref.argmax(-1) == yt[i:i + 2000]))
    assert correct > 4000  # trained: the check is on a model that predicts, not on random weights


def test_accelerator_kernel_gives_the_same_packed_model(monkeypatch, mixed):
    """GPUs and TPUs run the packed layers with the int8-dot kernel (chosen at trace time): same outputs
    as the CPU's popcount kernel."""
    model, x, v0, apply = mixed
    packed = export.pack(model, randomize_bn(v0))
    cpu = np.asarray(apply(packed, x))
    monkeypatch.setattr(pk, "backend_kernel", lambda backend=None: "int8")
    fresh = lambda p, a: model.apply(p, a)  # noqa: E731 -- a new function: traced afresh, not a cached trace
    jaxpr = str(jax.make_jaxpr(fresh)(packed, x))
    assert "dot_general" in jaxpr and "i8[" in jaxpr  # the packed products became int8 dots
    np.testing.assert_array_equal(np.asarray(jax.jit(fresh)(packed, x)), cpu)


@pytest.mark.parametrize("target", ["host", "rpi4", "apple-m1"])
def test_iree_compiles_the_packed_model_for_this_cpu_and_arm(target, seed000):
    pytest.importorskip("iree.compiler", reason="optional extra 'iree'")
    model, x, packed = seed000["model"], seed000["x"][:4], seed000["unfolded"]
    vmfb = export.compile_iree(model, packed, x, target=target)
    assert len(vmfb) > 10_000
    if target == "host":  # runnable here: same predictions as JAX
        got = export.load_iree(vmfb)(x)
        want = np.asarray(seed000["apply"](packed, x))
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # built for another CPU: loading it here is a clear error, not IREE's "device not found"
        with pytest.raises(ValueError, match="compiled for another CPU"):
            export.load_iree(vmfb)
    with pytest.raises(ValueError, match="unknown IREE target"):
        export.compile_iree(model, packed, x, target="pdp-11")
