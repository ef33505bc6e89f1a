import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import bnnjax
from bnnjax import layers as L
from bnnjax import ops
from bnnjax import packing
from bnnjax import quantizers as q

KEY = jax.random.key(0)
sign = lambda a: jnp.where(a >= 0, 1.0, -1.0).astype(a.dtype)
BIN = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign")


def signed_params(params):
    """The layer's params with each quantized kernel replaced by the sign of its latent value."""
    return jax.tree.map(lambda x: sign(x.value) if L.is_quantized(x) else x, params, is_leaf=L.is_quantized)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 7), (4, 33), (2, 3, 5)])
def test_quant_dense_equals_float_dense_on_signed_values(use_bias, shape):
    x = jax.random.normal(KEY, shape)
    layer = L.QuantDense(6, use_bias=use_bias, bias_init=nn.initializers.normal(), **BIN)
    v = layer.init(jax.random.key(1), x)
    ref = nn.Dense(6, use_bias=use_bias).apply({"params": signed_params(v["params"])}, sign(x))
    np.testing.assert_array_equal(layer.apply(v, x), ref)


CONV_CASES = [
    ((3,), 1, "SAME", (2, 11, 3)),
    ((3,), 2, "VALID", (1, 10, 2)),
    ((3, 3), 1, "SAME", (2, 9, 7, 3)),
    ((3, 3), 2, "SAME", (1, 8, 7, 5)),
    ((2, 3), (2, 1), "VALID", (2, 9, 9, 4)),
    ((3, 3), 1, ((2, 0), (1, 1)), (1, 6, 6, 2)),
    ((3, 3, 3), 1, "SAME", (1, 5, 6, 5, 2)),
    ((2, 2, 2), 2, "VALID", (2, 5, 5, 5, 3)),
]


@pytest.mark.parametrize("kernel_size,strides,padding,shape", CONV_CASES)
def test_quant_conv_equals_float_conv_on_signed_values(kernel_size, strides, padding, shape):
    x = jax.random.normal(KEY, shape)
    layer = L.QuantConv(4, kernel_size, strides=strides, padding=padding, bias_init=nn.initializers.normal(), **BIN)
    v = layer.init(jax.random.key(1), x)
    ref = nn.Conv(4, kernel_size, strides=strides, padding=padding).apply(
        {"params": signed_params(v["params"])}, sign(x))
    np.testing.assert_array_equal(layer.apply(v, x), ref)


@pytest.mark.parametrize("kernel_size,strides,shape", [((3, 3), 1, (2, 7, 7, 3)), ((3, 3), 2, (1, 8, 9, 2)),
                                                        ((5,), 1, (2, 9, 3))])
def test_one_padding_equals_float_conv_on_one_padded_input(kernel_size, strides, shape):
    x = jax.random.normal(KEY, shape)
    layer = L.QuantConv(3, kernel_size, strides=strides, padding="SAME", pad_values=1.0, use_bias=False, **BIN)
    v = layer.init(jax.random.key(1), x)
    n = len(kernel_size)
    pads = jax.lax.padtype_to_pads(shape[1:-1], kernel_size, (strides,) * n, "SAME")
    padded = jnp.pad(sign(x), ((0, 0), *pads, (0, 0)), constant_values=1.0)
    ref = nn.Conv(3, kernel_size, strides=strides, padding="VALID", use_bias=False).apply(
        {"params": signed_params(v["params"])}, padded)
    np.testing.assert_array_equal(layer.apply(v, x), ref)
    # and one-padding is not zero-padding: border outputs differ
    zero = L.QuantConv(3, kernel_size, strides=strides, padding="SAME", use_bias=False, **BIN).apply(v, x)
    assert not np.array_equal(np.asarray(zero), np.asarray(ref))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_equals_grouped_float_conv(multiplier):
    x = jax.random.normal(KEY, (2, 7, 6, 3))
    layer = L.QuantDepthwiseConv2D((3, 3), depth_multiplier=multiplier, **BIN)
    v = layer.init(jax.random.key(1), x)
    assert v["params"]["kernel"].value.shape == (3, 3, 1, 3 * multiplier)
    ref = nn.Conv(3 * multiplier, (3, 3), feature_group_count=3).apply({"params": signed_params(v["params"])}, sign(x))
    np.testing.assert_array_equal(layer.apply(v, x), ref)


@pytest.mark.parametrize("layer", [L.QuantDense(3, **BIN), L.QuantConv(3, (3, 3), **BIN),
                                   L.QuantDepthwiseConv2D((3, 3), **BIN)])
def test_binary_kernels_are_tagged_and_float_kernels_are_not(layer):
    x = jnp.ones((1, 5, 5, 2))
    v = layer.init(KEY, x)
    k = v["params"]["kernel"]
    assert L.is_binary(k) and k.precision == 1 and k.quantizer == "ste_sign"
    plain = layer.clone(kernel_quantizer=None).init(KEY, x)["params"]["kernel"]
    assert not L.is_quantized(plain)
    assert layer.clone(kernel_quantizer=q.get("dorefa", k_bit=4, mode="weights")).init(KEY, x)["params"]["kernel"].precision == 4


def test_layers_train_with_gradients_through_latent_kernels():
    x = jax.random.normal(KEY, (4, 8, 8, 2))
    layer = L.QuantConv(3, (3, 3), **BIN)
    v = layer.init(KEY, x)
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(v["params"])
    assert isinstance(g["kernel"], L.QuantParam) and float(jnp.abs(g["kernel"].value).sum()) > 0


def test_half_precision_dtype():
    x = jax.random.normal(KEY, (2, 6, 6, 3)).astype(jnp.bfloat16)
    layer = L.QuantConv(4, (3, 3), dtype=jnp.bfloat16, **BIN)
    v = layer.init(KEY, x)
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16
    ref = layer.clone(dtype=jnp.float32).apply(v, x.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(y, np.float32), ref)  # small integers are exact in bf16


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="rank 4.*got shape \\(5, 5, 2\\)"):
        L.QuantConv(3, (3, 3)).init(KEY, jnp.ones((5, 5, 2)))
    with pytest.raises(ValueError, match="1-D to 3-D"):
        L.QuantConv(3, (3, 3, 3, 3)).init(KEY, jnp.ones((1, 5, 5, 5, 5, 2)))
    with pytest.raises(ValueError, match="unknown quantizer 'sign'"):
        L.QuantDense(3, kernel_quantizer="sign").init(KEY, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="padding"):
        L.QuantConv(3, (3, 3), padding="FULL").init(KEY, jnp.ones((1, 5, 5, 2)))
    with pytest.raises(ValueError, match="feature_group_count"):
        L.QuantConv(3, (3, 3), feature_group_count=2).init(KEY, jnp.ones((1, 5, 5, 2)))


def test_stochastic_kernel_quantizer_uses_quantizer_rng_and_is_deterministic_without():
    x = jnp.ones((1, 16))
    layer = L.QuantDense(64, kernel_quantizer="stochastic_sign", use_bias=False,
                         kernel_init=nn.initializers.constant(0.0))
    v = layer.init(KEY, x)
    a = layer.apply(v, x, rngs={"quantizer": jax.random.key(1)})
    b = layer.apply(v, x, rngs={"quantizer": jax.random.key(2)})
    assert not np.array_equal(a, b)  # p = 1/2 everywhere: two keys disagree somewhere
    np.testing.assert_array_equal(layer.apply(v, x), np.full((1, 64), 16.0))  # sign(0) = +1 deterministically


# --- ABC-Net ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_abc_weight_bases_follow_the_paper(m):
    w = jax.random.normal(KEY, (3, 3, 4, 6)) * 0.1
    bases, alpha = L.abc_weight_bases(w, m)
    wn = np.asarray(w, np.float64)
    u = [0.0] if m == 1 else [-1 + 2 * i / (m - 1) for i in range(m)]
    expected = np.stack([np.where(wn - wn.mean() + ui * wn.std() >= 0, 1.0, -1.0) for ui in u])
    np.testing.assert_array_equal(bases, expected)
    a_ref, *_ = np.linalg.lstsq(expected.reshape(m, -1).T, wn.reshape(-1), rcond=None)
    np.testing.assert_allclose(alpha, a_ref, rtol=1e-4, atol=1e-6)


def test_abc_conv_equals_explicit_sum_of_binary_convs():
    x = jax.random.uniform(KEY, (2, 8, 8, 3), minval=-0.5, maxval=1.5)
    layer = L.ABCConv(4, (3, 3), num_weight_bases=3, num_act_bases=2)
    v = layer.init(jax.random.key(1), x)
    p = v["params"]
    bases, alpha = L.abc_weight_bases(p["kernel"].value, 3)
    acts = L.abc_activation_bases(x, p["shift"])
    conv = lambda a, b: nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": b}}, a)
    ref = sum(p["beta"][n] * alpha[i] * conv(acts[n], bases[i]) for n in range(2) for i in range(3)) + p["bias"]
    np.testing.assert_allclose(layer.apply(v, x), ref, rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda pp: jnp.sum(layer.apply({"params": pp}, x) ** 2))(p)
    assert all(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(g))  # shifts and betas learn


def test_abc_from_float_keeps_the_float_kernel_and_approximates_the_float_layer():
    x = jax.random.normal(KEY, (2, 8, 8, 3))
    conv = nn.Conv(8, (3, 3))
    fp = conv.init(KEY, x)["params"]
    errs = []
    for m in (1, 3, 5):
        abc, ap = L.abc_from_float(conv, fp, num_weight_bases=m, num_act_bases=None)
        np.testing.assert_array_equal(ap["kernel"].value, fp["kernel"])
        errs.append(float(jnp.mean((abc.apply({"params": ap}, x) - conv.apply({"params": fp}, x)) ** 2)))
    assert errs[0] > errs[1] > errs[2]  # more bases, closer to the float layer
    dense, dp = L.abc_from_float(nn.Dense(5), nn.Dense(5).init(KEY, jnp.ones((1, 7)))["params"], 2, 2)
    assert dense.apply({"params": dp}, jnp.ones((3, 7))).shape == (3, 5)
    with pytest.raises(TypeError, match="BatchNorm"):
        L.abc_from_float(nn.BatchNorm(), {"kernel": jnp.ones(3)})


def test_public_api_reexports():
    assert bnnjax.QuantConv is L.QuantConv and bnnjax.ste_sign is q.ste_sign
    assert bnnjax.BatchNorm is L.BatchNorm and bnnjax.zoo.load is bnnjax.zoo.load  # submodules load on use
    with pytest.raises(AttributeError, match="no attribute 'zooo'"):
        bnnjax.zooo


def _random_stats(v, seed=0):
    rng = np.random.default_rng(seed)
    new = lambda a, lo, hi: jnp.asarray(rng.uniform(lo, hi, a.shape), a.dtype)  # noqa: E731
    stats = {"mean": new(v["batch_stats"]["mean"], -1, 1), "var": new(v["batch_stats"]["var"], 0.2, 3)}
    params = {k: new(a, -1.5, 1.5) for k, a in v.get("params", {}).items()}
    return {"params": params, "batch_stats": stats} if params else {"batch_stats": stats}


@pytest.mark.parametrize("axis,use_scale,use_bias", [(-1, True, True), (-1, False, True), (1, True, False),
                                                     (-1, False, False)])
def test_batch_norm_is_flax_batch_norm_and_folds(axis, use_scale, use_bias):
    kw = dict(axis=axis, use_scale=use_scale, use_bias=use_bias, epsilon=1e-3, momentum=0.9)
    x = jax.random.normal(KEY, (4, 5, 6)) * 3 + 1
    ours, flax_bn = L.BatchNorm(**kw), nn.BatchNorm(**kw)
    v = ours.init(KEY, x, use_running_average=False)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, flax_bn.init(KEY, x, use_running_average=False))
    v = _random_stats(v)
    # training (batch statistics, running-average update) and evaluation are nn.BatchNorm's, exactly
    for mode in (False, True):
        got = ours.apply(v, x, use_running_average=mode, mutable=["batch_stats"])
        want = flax_bn.apply(v, x, use_running_average=mode, mutable=["batch_stats"])
        jax.tree.map(np.testing.assert_array_equal, got, want)
    folded = {"batch_stats": L.fold_batch_norm(ours, v.get("params", {}), v["batch_stats"])}
    assert jax.tree.map(jnp.shape, folded["batch_stats"]) == {"multiplier": (x.shape[axis],), "offset": (x.shape[axis],)}
    np.testing.assert_allclose(ours.apply(folded, x, use_running_average=True),
                               flax_bn.apply(v, x, use_running_average=True), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="folded for inference"):
        ours.apply(folded, x, use_running_average=False)


@pytest.mark.parametrize("axis,use_scale,use_bias", [(-1, True, True), (-1, False, True), (1, True, False)])
def test_batch_norm_training_gradients_equal_flax_and_keep_only_the_input(axis, use_scale, use_bias):
    """The training step's gradients equal ``nn.BatchNorm``'s autodiff (to float rounding) while its
    backward pass keeps one float array the size of ``x`` (autodiff keeps three)."""
    kw = dict(axis=axis, use_scale=use_scale, use_bias=use_bias, epsilon=1e-3, momentum=0.9)
    x = jax.random.normal(KEY, (4, 5, 6)) * 3 + 1
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    v = _random_stats(L.BatchNorm(**kw).init(KEY, x, use_running_average=False))
    params = v.get("params", {})

    def loss(bn):
        def f(p, x):
            y, upd = bn.apply({**v, "params": p}, x, use_running_average=False, mutable=["batch_stats"])
            return jnp.sum(y * w) + jnp.sum(jnp.sin(upd["batch_stats"]["mean"]))  # not differentiated
        return f

    got, want = (jax.grad(loss(bn), argnums=(0, 1))(params, x) for bn in (L.BatchNorm(**kw), nn.BatchNorm(**kw)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    def saved(bn):  # residuals of x's size besides x itself (an argument)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(loss(bn), params, x)
        return [r for r in out.getvalue().splitlines() if r.startswith("f32[4,5,6]") and "output of" in r]

    assert saved(L.BatchNorm(**kw)) == [] and len(saved(nn.BatchNorm(**kw))) >= 2  # ours keeps x alone


PACKED_CASES = [
    (L.QuantDense(6, **BIN), (4, 3, 37)),
    (L.QuantDense(5, **BIN), (1, 64)),
    (L.QuantConv(7, (3, 3), padding="VALID", **BIN), (2, 9, 8, 33)),
    (L.QuantConv(5, (3, 2), strides=2, padding="SAME", **BIN), (1, 7, 9, 3)),
    (L.QuantConv(4, (3, 3), padding=((2, 0), (1, 1)), **BIN), (1, 6, 6, 2)),
    (L.QuantConv(5, (3, 3), padding="SAME", pad_values=1.0, input_quantizer="approx_sign",
                 kernel_quantizer="ste_sign"), (3, 5, 5, 40)),
    (L.QuantConv(6, (3, 3), strides=2, padding="SAME", input_quantizer="approx_sign",
                 kernel_quantizer="magnitude_aware_sign"), (2, 7, 7, 5)),
    (L.QuantDense(5, input_quantizer="ste_sign", kernel_quantizer="xnor_weight_scale"), (3, 70)),
    (L.QuantConv(4, (3, 3), kernel_dilation=2, padding="SAME", **BIN), (2, 9, 7, 6)),
]


def _loss_and_grads(layer, v, x):
    def loss(p, x):
        y = layer.apply({"params": p}, x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))

    return jax.jit(layer.apply)(v, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)


@pytest.mark.parametrize("layer,shape,backward", [
    (layer, shape, backward) for layer, shape in PACKED_CASES
    for backward in (("whole_patches", "per_row") if isinstance(layer, L.QuantConv) else ("whole_patches",))])
def test_packed_forward_training_path_equals_float_path(layer, shape, backward, monkeypatch):
    """±1 layers on CPU compute the forward on packed bits and keep the input's bits; values and
    gradients must equal the float computation's (odd K, K not a multiple of 32, zero and one padding,
    strides, batch 1), with the backward from whole unpacked patches or one kernel row at a time (large
    layers)."""
    if backward == "per_row":  # and every value isolated as a large layer's is (ops._isolated)
        monkeypatch.setattr(ops, "_WHOLE_PATCHES_MAX_BYTES", 0)
        monkeypatch.setattr(ops, "_ISOLATE_MIN_BYTES", 0)
    x = jax.random.uniform(KEY, shape, minval=-1.5, maxval=1.5)
    v = layer.init(jax.random.key(1), x)
    jaxpr = str(jax.make_jaxpr(layer.apply)(v, x))
    assert "population_count" in jaxpr  # the packed path is the one taken
    with jax.default_matmul_precision("float32"):  # float32 gradients (the default rounds g to bf16)
        y, g = _loss_and_grads(layer, v, x)
        with ops.float_forward():
            assert "population_count" not in str(jax.make_jaxpr(layer.apply)(v, x))
            y_ref, g_ref = _loss_and_grads(layer, v, x)
    if layer.kernel_quantizer == "ste_sign":
        np.testing.assert_array_equal(y, y_ref)
    else:  # scale x integer: one rounding where the float dot rounds every partial sum
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        # same float32 products summed in another order (the packed path's A^T g is a row-major dot)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("layer,shape", PACKED_CASES)
def test_accelerator_path_keeps_bits_and_equals_float_path(layer, shape, monkeypatch):
    """On GPUs/TPUs (here: the backend kernel reported as ``"int8"``) ±1 layers run the backend's float
    product but keep only the input's sign bits for the backward pass: values and gradients equal
    ``float_forward()``'s (float residuals), with no popcount in the program."""
    monkeypatch.setattr(packing, "backend_kernel", lambda backend=None: "int8")
    x = jax.random.uniform(KEY, shape, minval=-1.5, maxval=1.5)
    v = layer.init(jax.random.key(1), x)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: layer.apply({"params": p}, x).sum()))(v["params"]))
    assert "population_count" not in jaxpr and "shift_right_logical" in jaxpr  # unpacks saved bits
    with jax.default_matmul_precision("float32"):
        y, g = _loss_and_grads(layer, v, x)
        with ops.float_forward():
            y_ref, g_ref = _loss_and_grads(layer, v, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("layer", [L.QuantConv(4, (3, 3), kernel_quantizer="ste_sign"),
                                   L.QuantConv(4, (3, 3), input_quantizer="ste_sign", kernel_quantizer="ste_tern"),
                                   L.QuantConv(4, (3, 3), input_quantizer="ste_heaviside", kernel_quantizer="ste_sign"),
                                   L.QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                                dtype=jnp.bfloat16)])
def test_non_sign_operands_keep_the_float_path(layer):
    x = jnp.ones((1, 5, 5, 3))
    v = layer.init(KEY, x)
    assert "population_count" not in str(jax.make_jaxpr(layer.apply)(v, x))


@pytest.mark.parametrize("layer,shape", [
    (L.QuantConv(8, (3, 3), padding="VALID", kernel_quantizer="ste_sign", use_bias=False), (2, 9, 8, 1)),
    (L.QuantConv(5, (2, 2), strides=2, padding="SAME", kernel_quantizer="ste_sign"), (1, 7, 9, 3)),
    (L.QuantConv(4, (3, 3), padding="SAME"), (3, 5, 5, 1)),
    (L.QuantConv(16, (3, 3), strides=2, padding=((0, 1), (0, 1))), (2, 12, 12, 3)),  # QuickNet's RGB stem
])
def test_short_contraction_conv_sums_taps_and_equals_dot_path(layer, shape, monkeypatch):
    """First layers (3x3x1, or 3x3x3 to few outputs) sum shifted inputs instead of calling a dot:
    same values up to float summation order, same gradients (the backward's patches isolated, as a
    large layer's are)."""
    monkeypatch.setattr(ops, "_ISOLATE_MIN_BYTES", 0)
    x = jax.random.normal(KEY, shape)
    v = layer.init(jax.random.key(1), x)
    assert ops._sums_taps(jnp.zeros((int(np.prod(layer.kernel_size)) * shape[-1], layer.features)))
    y, g = _loss_and_grads(layer, v, x)
    monkeypatch.setattr(ops, "_TAPS_MAX_K", 0)
    monkeypatch.setattr(ops, "_TAPS_MAX_TERMS", 0)
    y_ref, g_ref = _loss_and_grads(layer, v, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer,shape", [PACKED_CASES[2], PACKED_CASES[3], PACKED_CASES[6], PACKED_CASES[7]])
def test_default_gradients_are_bfloat16_and_float32_is_one_setting_away(layer, shape):
    """At JAX's default matmul precision the packed layers' backward dots round the cotangent to
    bfloat16 (TPU's DEFAULT numerics): same forward values, gradients within bf16 error of float32 and
    not equal to them. ``jax.default_matmul_precision("float32")`` and a layer's ``precision=HIGHEST``
    both give the float32 gradients."""
    x = jax.random.uniform(KEY, shape, minval=-1.5, maxval=1.5)
    v = layer.init(jax.random.key(1), x)
    assert ops.binary_gradient_precision() == "bfloat16"
    y16, g16 = _loss_and_grads(layer, v, x)
    with jax.default_matmul_precision("float32"):
        assert ops.binary_gradient_precision() == "float32"
        y, g = _loss_and_grads(layer, v, x)
    y_hi, g_hi = _loss_and_grads(layer.clone(precision=jax.lax.Precision.HIGHEST), v, x)
    np.testing.assert_array_equal(y, y16)
    differs = False
    for a, b, c in zip(jax.tree.leaves(g), jax.tree.leaves(g16), jax.tree.leaves(g_hi)):
        scale = float(jnp.abs(a).max())
        np.testing.assert_allclose(b, a, atol=2e-2 * scale)
        np.testing.assert_allclose(c, a, rtol=1e-6, atol=1e-6 * scale)
        differs |= not np.array_equal(a, b)
    assert differs  # the bfloat16 path was taken
