"""bnnjax.nnx: every layer equals its linen twin (outputs and gradients, same variables); tags, modes,
optimizers, summary and packing on NNX models; the linen bridge; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import bnnjax
from bnnjax import export, layers as L
from bnnjax import nnx as bnx
from bnnjax.nnx.models import load_linen_variables

KEY = jax.random.key(0)
RNGS = lambda: nnx.Rngs(0)

QUANTIZERS = [  # (input, kernel)
    (None, None),
    ("ste_sign", "ste_sign"),
    (bnnjax.quantizers.SteSign(clip_value=1.25), bnnjax.quantizers.SteSign(clip_value=1.25)),
    ("approx_sign", "magnitude_aware_sign"),
    ("swish_sign", "xnor_weight_scale"),
    ("ste_heaviside", "ste_tern"),
    ("dorefa", "dorefa"),
    (None, "ste_sign"),
    (None, "stochastic_sign"),  # deterministic without a key: evaluation mode
]


def _dense(qi, qk):
    return (L.QuantDense(6, input_quantizer=qi, kernel_quantizer=qk, bias_init=nn.initializers.normal()),
            bnx.QuantLinear(37, 6, input_quantizer=qi, kernel_quantizer=qk, rngs=RNGS()), (3, 37))


def _conv(qi, qk, **kw):
    return (L.QuantConv(5, (3, 3), input_quantizer=qi, kernel_quantizer=qk, bias_init=nn.initializers.normal(), **kw),
            bnx.QuantConv(4, 5, (3, 3), input_quantizer=qi, kernel_quantizer=qk, rngs=RNGS(), **kw), (2, 9, 8, 4))


LAYER_CASES = (
    [pytest.param(*_dense(qi, qk), id=f"dense-{i}") for i, (qi, qk) in enumerate(QUANTIZERS)]
    + [pytest.param(*_conv(qi, qk), id=f"conv-{i}") for i, (qi, qk) in enumerate(QUANTIZERS)]
    + [
        pytest.param(*_conv("ste_sign", "ste_sign", pad_values=1.0, strides=2), id="conv-onepad-stride2"),
        pytest.param(*_conv("ste_sign", "ste_sign", kernel_dilation=2), id="conv-dilated"),
        pytest.param(L.QuantConv(6, (3,), input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
                     bnx.QuantConv(3, 6, (3,), input_quantizer="ste_sign", kernel_quantizer="ste_sign", rngs=RNGS()),
                     (2, 11, 3), id="conv1d"),
        pytest.param(L.QuantConv(4, (2, 2, 2), strides=2, kernel_quantizer="ste_sign"),
                     bnx.QuantConv(2, 4, (2, 2, 2), strides=2, kernel_quantizer="ste_sign", rngs=RNGS()),
                     (1, 5, 6, 5, 2), id="conv3d"),
        pytest.param(L.QuantConv(6, (3, 3), feature_group_count=2, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
                     bnx.QuantConv(4, 6, (3, 3), feature_group_count=2, input_quantizer="ste_sign",
                                   kernel_quantizer="ste_sign", rngs=RNGS()), (2, 7, 7, 4), id="conv-groups"),
        pytest.param(L.QuantDepthwiseConv2D((3, 3), depth_multiplier=2, input_quantizer="ste_sign",
                                            kernel_quantizer="ste_sign"),
                     bnx.QuantDepthwiseConv(3, (3, 3), depth_multiplier=2, input_quantizer="ste_sign",
                                            kernel_quantizer="ste_sign", rngs=RNGS()), (2, 7, 6, 3), id="depthwise"),
        pytest.param(L.ABCDense(5, num_weight_bases=3, num_act_bases=2), bnx.ABCLinear(9, 5, num_weight_bases=3,
                     num_act_bases=2, rngs=RNGS()), (4, 9), id="abc-dense"),
        pytest.param(L.ABCDense(5, num_weight_bases=2, num_act_bases=None), bnx.ABCLinear(9, 5, num_weight_bases=2,
                     num_act_bases=None, rngs=RNGS()), (4, 9), id="abc-dense-real-input"),
        pytest.param(L.ABCConv(4, (3, 3), num_weight_bases=3, num_act_bases=3),
                     bnx.ABCConv(3, 4, (3, 3), num_weight_bases=3, num_act_bases=3, rngs=RNGS()), (2, 6, 6, 3),
                     id="abc-conv"),
        pytest.param(L.PReLU(shared_axes=(1, 2), alpha_init=nn.initializers.constant(0.25)),
                     bnx.PReLU((1, 1, 3), rngs=RNGS()), (2, 5, 5, 3), id="prelu"),
        pytest.param(L.FixedDepthwiseConv2D((3, 3), strides=2), bnx.FixedDepthwiseConv(3, (3, 3), strides=2),
                     (2, 8, 8, 3), id="blurpool"),
        pytest.param(L.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-3),
                     bnx.BatchNorm(3, momentum=0.9, epsilon=1e-3, rngs=RNGS()), (4, 5, 3), id="batchnorm"),
    ])


def _nnx_loss(layer, x):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p, x):
        y = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))

    return params, loss


def _linen_loss(layer, v):
    def loss(p, x):
        y = layer.apply({**v, "params": p}, x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))

    return loss


def _randomized(v):
    """Random-but-valid variables: kernels and biases random, BatchNorm statistics away from 0 and 1
    (drawn by numpy: eager jax.random draws compile a program per shape)."""
    rng = np.random.default_rng(7)
    leaf = lambda path, a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape) if any(
        getattr(k, "key", None) in ("var", "scale") for k in path) else rng.normal(size=a.shape) * 0.5, jnp.float32)
    return jax.tree_util.tree_map_with_path(lambda p, a: leaf(p, a) if a.dtype == jnp.float32 else a, v)


def _init(linen_module, x):
    """``linen_module.init`` jitted: an eager init compiles every op of every layer on its own."""
    return jax.jit(linen_module.init)(jax.random.key(1), x)


def _random_variables(linen_module, x):
    """``_randomized`` variables of ``linen_module``: where ``_randomized`` replaces every value (float32
    params and BatchNorm statistics only), built from the init's shapes and tags (``jax.eval_shape``:
    nothing is compiled); else from a real init."""
    shapes = jax.eval_shape(linen_module.init, jax.random.key(1), x)
    if not (set(shapes) <= {"params", "batch_stats"} and all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))):
        shapes = _init(linen_module, x)
    return {c: (_randomized(t) if c in ("params", "batch_stats") else t) for c, t in shapes.items()}


@pytest.mark.parametrize("linen_layer,nnx_layer,shape", LAYER_CASES)
def test_nnx_layer_equals_linen_layer_outputs_and_gradients(linen_layer, nnx_layer, shape):
    x = jax.random.uniform(KEY, shape, minval=-1.5, maxval=1.5)
    v = _random_variables(linen_layer, x)
    if "shift" in v.get("params", {}):  # ABC shifts must keep x + v inside [0, 1] somewhere
        v["params"]["shift"] = jnp.linspace(-0.3, 0.3, v["params"]["shift"].shape[0])
    load_linen_variables(nnx_layer, linen_layer, v, x)
    nnx_layer.eval()
    y_linen = jax.jit(linen_layer.apply)(v, x)
    y_nnx = nnx.jit(lambda m, a: m(a))(nnx_layer, x)
    np.testing.assert_array_equal(y_nnx, y_linen)
    if not v.get("params"):
        return
    params, nnx_loss = _nnx_loss(nnx_layer, x)
    g_nnx, gx_nnx = jax.jit(jax.grad(nnx_loss, argnums=(0, 1)))(params, x)
    g_linen, gx_linen = jax.jit(jax.grad(_linen_loss(linen_layer, v), argnums=(0, 1)))(v["params"], x)
    np.testing.assert_array_equal(gx_nnx, gx_linen)
    g_linen = {k: (a.value if L.is_quantized(a) else a) for k, a in g_linen.items()}
    g_nnx = nnx.as_pure(g_nnx)
    assert set(g_nnx) == set(g_linen)
    for name in g_linen:
        np.testing.assert_array_equal(g_nnx[name], g_linen[name], err_msg=name)


def test_batch_norm_training_mode_equals_linen_and_updates_statistics():
    x = jax.random.normal(KEY, (8, 5, 3)) * 2 + 1
    lin = L.BatchNorm(use_running_average=False, momentum=0.9)
    v = lin.init(KEY, x)
    y_lin, upd = lin.apply(v, x, mutable=["batch_stats"])
    bn = bnx.BatchNorm(3, momentum=0.9, rngs=RNGS())
    bn.train()
    np.testing.assert_array_equal(bn(x), y_lin)
    np.testing.assert_array_equal(bn.mean.get_value(), upd["batch_stats"]["mean"])
    np.testing.assert_array_equal(bn.var.get_value(), upd["batch_stats"]["var"])


def test_stochastic_quantizer_draws_in_training_and_is_deterministic_in_eval():
    layer = bnx.QuantLinear(16, 32, kernel_quantizer="stochastic_sign", use_bias=False, rngs=nnx.Rngs(0, quantizer=1))
    x = jnp.ones((2, 16))
    layer.train()
    a, b = layer(x), layer(x)
    assert not np.array_equal(a, b)  # a fresh draw per call
    layer.eval()
    det = jnp.ones((2, 16)) @ jnp.where(layer.kernel.get_value() >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(layer(x), det)
    np.testing.assert_array_equal(layer(x), layer(x))


def _seed_models(x):
    lin = bnnjax.models.LarqTutorialCNN()
    v = _random_variables(lin, x[:1])
    m = load_linen_variables(bnx.models.LarqTutorialCNN(rngs=RNGS()), lin, v, x)
    return lin, v, m


@pytest.fixture(scope="module")
def seed_models():
    """A batch, the seed-000 linen model with random variables, its NNX twin and that twin packed
    (verified on the batch), shared by the packing tests."""
    x = jax.random.normal(KEY, (16, 28, 28, 1))
    lin, v, m = _seed_models(x)
    return x, lin, v, m, export.pack(m, x)


def test_quant_param_tags_select_exactly_the_binary_kernels():
    x = jnp.zeros((1, 28, 28, 1))
    m = bnx.models.LarqTutorialCNN(rngs=RNGS())
    q = nnx.state(m, bnx.QuantParam)
    assert sorted(k for k, _ in nnx.to_flat_state(q)) == [
        ("conv1", "kernel"), ("conv2", "kernel"), ("conv3", "kernel"), ("dense1", "kernel"), ("dense2", "kernel")]
    params = nnx.state(m, nnx.Param)
    assert len(jax.tree.leaves(params)) == 5 + 5  # kernels and the BatchNorms' biases
    assert all(v.precision == 1 for _, v in nnx.to_flat_state(q))
    assert bnnjax.summary(m, x, print_fn=None)["params_by_bits"] == {1: 93088, 32: 468}


def test_train_and_eval_modes_switch_batch_norm_and_quantizers():
    m = bnx.models.LarqTutorialCNN(rngs=RNGS())
    m.eval()
    assert m.bn1.use_running_average and m.conv2.deterministic
    m.train()
    assert not m.bn1.use_running_average and not m.conv2.deterministic


@pytest.mark.parametrize("model", ["seed000", "bireal"])
def test_summary_of_nnx_model_equals_linen_summary(model):
    x = jnp.zeros((1, 28, 28, 1))
    if model == "seed000":
        lin, nx = bnnjax.models.LarqTutorialCNN(), bnx.models.LarqTutorialCNN(rngs=RNGS())
    else:
        lin = bnnjax.models.BiRealNet((1, 1), width=8)
        nx = bnx.models.BiRealNet((1, 1), width=8, in_features=1, rngs=RNGS())
    a, b = bnnjax.summary(nx, x, print_fn=None), bnnjax.summary(lin, x, print_fn=None)
    drop = lambda r: {k: v for k, v in r.items() if k != "layers"}
    assert drop(a) == drop(b)
    strip = lambda ls: [{k: v for k, v in layer.items() if k not in ("name", "kind")} for layer in ls]
    assert strip(a["layers"]) == strip(b["layers"])


def test_nnx_optimizer_with_weight_clip_clips_binary_kernels_only():
    m = bnx.models.LarqTutorialCNN(rngs=RNGS())
    m.conv2.kernel.set_value(m.conv2.kernel.get_value() * 50)  # latent weights far outside [-1, 1]
    m.bn2.bias.set_value(jnp.full_like(m.bn2.bias.get_value(), 3.0))
    opt = nnx.Optimizer(m, optax.chain(optax.sgd(1e-3), bnnjax.weight_clip()), wrt=nnx.Param)
    x = jax.random.normal(KEY, (8, 28, 28, 1))
    y = jnp.arange(8) % 10

    @nnx.jit
    def step(m, opt):
        g = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(m)
        opt.update(m, g)

    m.train()
    step(m, opt)
    for _, v in nnx.to_flat_state(nnx.state(m, bnx.QuantParam)):
        assert float(jnp.abs(v.get_value()).max()) <= 1.0
    assert float(jnp.abs(m.conv2.kernel.get_value()).max()) == 1.0
    assert float(m.bn2.bias.get_value().min()) > 2.9  # not a binary kernel: not clipped


def test_bop_case_optimizer_flip_ratio_and_sign_kernels_on_nnx_state():
    m = bnnjax.sign_kernels(bnx.models.LarqTutorialCNN(rngs=RNGS()))
    kernels = nnx.state(m, bnx.QuantParam)
    assert all(set(np.unique(v.get_value())) <= {-1.0, 1.0} for _, v in nnx.to_flat_state(kernels))
    opt = nnx.Optimizer(m, bnnjax.case_optimizer(bnnjax.bop(threshold=1e-6, gamma=1.0), optax.adam(1e-2)),
                        wrt=nnx.Param)
    before = nnx.clone(nnx.state(m, nnx.Param))
    x = jax.random.normal(KEY, (8, 28, 28, 1))
    y = jnp.arange(8) % 10

    @nnx.jit
    def step(m, opt):
        opt.update(m, nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(m))

    m.train()
    step(m, opt)
    after = nnx.state(m, nnx.Param)
    for _, v in nnx.to_flat_state(nnx.state(m, bnx.QuantParam)):
        assert set(np.unique(v.get_value())) <= {-1.0, 1.0}  # Bop keeps binary kernels binary
    ratio = float(bnnjax.flip_ratio(before, after))
    assert 0.0 < ratio < 1.0


def test_unclipped_warning_on_nnx_state(monkeypatch):
    monkeypatch.setattr(bnnjax.optim, "_warned_unclipped", False)
    params = nnx.state(bnx.models.LarqTutorialCNN(rngs=RNGS()), nnx.Param)
    assert not bnnjax.optim.warn_if_unclipped(params, optax.chain(optax.adam(1e-3), bnnjax.weight_clip()).init(params))
    with pytest.warns(UserWarning, match="without weight clipping"):
        assert bnnjax.optim.warn_if_unclipped(params, optax.adam(1e-3).init(params))


def test_pack_nnx_model_runs_packed_and_saves_the_same_artifact(tmp_path, seed_models):
    x, lin, v, m, packed = seed_models
    assert isinstance(packed.conv2.kernel.get_value(), bnnjax.packing.PackedKernel)
    assert packed.bn1.multiplier is not None and packed.bn1.mean is None  # folded
    assert isinstance(m.conv2.kernel, bnx.QuantParam)  # the model given is unchanged
    assert export.packed_bytes(packed) == export.packed_bytes(export.pack(lin, v, x)) == 13508
    assert "popcnt" in jax.jit(lambda a: packed(a)).lower(x).as_text()
    m = nnx.clone(m)  # the shared model stays as it is
    m.eval()
    call = nnx.jit(lambda mm, a: mm(a))
    y_packed = call(packed, x)
    np.testing.assert_array_equal(np.asarray(y_packed).argmax(-1), np.asarray(call(m, x)).argmax(-1))
    n = export.save_artifact(tmp_path / "m.stablehlo", packed, x[:2])
    assert n > 13508
    deployed = export.load_artifact(tmp_path / "m.stablehlo")
    np.testing.assert_allclose(deployed.call(x), y_packed, rtol=1e-6, atol=1e-6)
    packed = nnx.clone(packed)  # the shared one stays in evaluation mode
    with pytest.raises(ValueError, match="folded"):
        packed.train()
        packed.bn1(x[:, :4, :4, :1].repeat(32, -1))


def test_pack_stores_a_blur_pool_kernel_once():
    layer = bnx.FixedDepthwiseConv(4, (3, 3), strides=2)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    packed = export.pack(layer, x)
    assert packed.kernel.get_value().shape == (3, 3, 1, 1) and layer.kernel.get_value().shape == (3, 3, 1, 4)
    np.testing.assert_array_equal(packed(x), layer(x))


@pytest.mark.parametrize("shape,match", [((2, 28, 28, 3), "takes 1"), ((2, 20, 20, 1), "takes 576"),
                                         ((2, 28, 28), "rank 4")])
def test_packed_nnx_model_rejects_wrong_input_shapes(shape, match, seed_models):
    packed = seed_models[4]
    with pytest.raises(ValueError, match=match):
        packed(jnp.zeros(shape))


def test_nnx_layer_with_wrong_in_features_says_so():
    layer = bnx.QuantLinear(10, 4, input_quantizer="ste_sign", kernel_quantizer="ste_sign", rngs=RNGS())
    with pytest.raises(ValueError, match=r"input has 12 features.*in_features=12"):
        layer(jnp.ones((2, 12)))
    conv = bnx.QuantConv(3, 4, (3, 3), rngs=RNGS())
    with pytest.raises(ValueError, match=r"input has 5 features"):
        conv(jnp.ones((1, 6, 6, 5)))


def test_linen_model_bridge_keeps_tags_modes_and_packs(seed_models):
    x, lin, v = seed_models[0][:8], seed_models[1], seed_models[2]
    m = bnx.LinenModel(lin, v)
    assert len(jax.tree.leaves(nnx.state(m, bnx.QuantParam))) == 5
    np.testing.assert_array_equal(m(x), lin.apply(v, x))  # starts in evaluation mode
    m.train()
    y, upd = lin.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(m(x), y)
    np.testing.assert_array_equal(m.linen_variables()["batch_stats"]["BatchNorm_0"]["mean"],
                                  upd["batch_stats"]["BatchNorm_0"]["mean"])
    m.eval()
    assert bnnjax.summary(m, x[:1], print_fn=None)["memory_kib"] == pytest.approx(13.19140625)
    packed = export.pack(m, x)
    assert isinstance(packed, bnx.LinenModel)
    np.testing.assert_array_equal(np.asarray(packed(x)).argmax(-1), np.asarray(m(x)).argmax(-1))
