import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bnnjax import quantizers as q

X = jnp.array([-2.0, -1.5, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 1.5, 2.0], jnp.float32)
KEY = jax.random.key(0)


def call(name, x, **kw):
    quant = q.get(name, **kw)
    return quant(x, KEY) if quant.needs_rng else quant(x)


def grad_of(fn, x):
    """Elementwise derivative: the vjp of fn at x with an all-ones cotangent."""
    y, vjp = jax.vjp(fn, x)
    return vjp(jnp.ones_like(y))[0]


@pytest.mark.parametrize("name", q.names())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_every_quantizer_keeps_dtype_and_works_under_jit_grad_vmap(name, dtype):
    x = X.astype(dtype).reshape(1, -1)
    y = call(name, x)
    assert y.dtype == dtype and y.shape == x.shape
    jitted = jax.jit(lambda a: call(name, a))(x)
    np.testing.assert_array_equal(np.asarray(jitted, np.float32), np.asarray(y, np.float32))
    g = jax.grad(lambda a: call(name, a).astype(jnp.float32).sum())(x)
    assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))
    v = jax.vmap(lambda a: call(name, a[None]))(x.reshape(-1, 1))
    assert v.shape == (x.size, 1, 1)


@pytest.mark.parametrize("name", q.names())
def test_values_flag_matches_what_the_quantizer_outputs(name):
    """Layers trust ``values`` to run a packed forward pass, so the flag must match the outputs."""
    x = jnp.concatenate([X, 3 * jax.random.normal(KEY, (209,))]).reshape(-1, 4)
    y = np.asarray(call(name, x))
    signs = set(np.unique(y).tolist()) <= {-1.0, 1.0}
    scale = np.abs(y[0])
    scaled = bool(np.all(np.abs(y) == scale)) and not signs
    assert q.get(name).values == ("signs" if signs else "scaled_signs" if scaled else None), y


@pytest.mark.parametrize("name", ["ste_sign", "approx_sign", "swish_sign", "magnitude_aware_sign",
                                  "xnor_weight_scale", "magnitude_aware_sign_unclipped"])
def test_binary_quantizers_map_zero_to_plus_one(name):
    x = jnp.zeros((5,))
    if name in ("magnitude_aware_sign", "xnor_weight_scale", "magnitude_aware_sign_unclipped"):
        x = jnp.array([0.0, 1.0, -1.0, 0.0, 1.0])[:, None]  # scale 1: the sign is visible
    np.testing.assert_array_equal(np.sign(call(name, x)), np.where(np.asarray(x) >= 0, 1.0, -1.0))


@pytest.mark.parametrize("clip", [1.0, 0.5, 2.0, None])
def test_ste_sign_values_and_gradient(clip):
    y = q.ste_sign(X, clip_value=clip)
    np.testing.assert_array_equal(y, np.where(np.asarray(X) >= 0, 1.0, -1.0))
    g = grad_of(lambda x: q.ste_sign(x, clip), X)
    expected = np.ones(X.shape) if clip is None else (np.abs(np.asarray(X)) <= clip).astype(np.float32)
    np.testing.assert_array_equal(g, expected)


def test_ste_sign_rejects_bad_clip():
    with pytest.raises(ValueError, match="clip_value"):
        q.ste_sign(X, clip_value=0.0)


def test_approx_sign_gradient_is_bireal_piecewise_quadratic():
    g = grad_of(q.approx_sign, X)
    ax = np.abs(np.asarray(X))
    np.testing.assert_allclose(g, np.where(ax <= 1, 2 - 2 * ax, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(q.approx_sign(X), np.where(np.asarray(X) >= 0, 1.0, -1.0))


@pytest.mark.parametrize("beta", [1.0, 5.0, 10.0])
def test_swish_sign_gradient_matches_bnn_plus(beta):
    g = grad_of(lambda x: q.swish_sign(x, beta), X)
    x = np.asarray(X, np.float64)
    expected = beta * (2 - beta * x * np.tanh(beta * x / 2)) / (1 + np.cosh(beta * x))
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)


def test_ste_heaviside():
    np.testing.assert_array_equal(q.ste_heaviside(X), (np.asarray(X) > 0).astype(np.float32))
    np.testing.assert_array_equal(grad_of(q.ste_heaviside, X), (np.abs(np.asarray(X)) <= 1).astype(np.float32))


def test_ste_tern_fixed_and_twn_threshold():
    y = q.ste_tern(X, threshold_value=0.5)
    x = np.asarray(X)
    np.testing.assert_array_equal(y, np.where(np.abs(x) > 0.5, np.sign(x), 0.0))
    t = 0.7 * np.mean(np.abs(x))
    np.testing.assert_array_equal(q.ste_tern(X, ternary_weight_networks=True), np.where(np.abs(x) > t, np.sign(x), 0.0))
    np.testing.assert_array_equal(grad_of(lambda a: q.ste_tern(a, 0.5, clip_value=1.5), X),
                                  (np.abs(x) <= 1.5).astype(np.float32))


def test_magnitude_aware_sign_scales_per_channel_and_stops_gradient_through_scale():
    w = jax.random.normal(KEY, (3, 3, 4, 5)) * 0.7
    a = np.mean(np.abs(np.asarray(w)), axis=(0, 1, 2))
    np.testing.assert_allclose(q.magnitude_aware_sign(w), a * np.where(np.asarray(w) >= 0, 1, -1), rtol=1e-6)
    g = grad_of(q.magnitude_aware_sign, w)
    np.testing.assert_allclose(g, a * (np.abs(np.asarray(w)) <= 1), rtol=1e-6)


def test_xnor_weight_scale_clips_like_larq_zoo_and_its_gradient_includes_the_scale_term():
    w = jax.random.normal(KEY, (6, 4)) * 0.8
    w = w.at[0].set(jnp.array([0.0, 1.0, -1.0, 1.7]))  # a zero, both clip ends and a clipped entry
    cot = jax.random.normal(jax.random.key(1), (6, 4))
    wn, c = np.asarray(w), np.asarray(cot)
    inside = np.abs(wn) <= 1
    a = np.mean(np.abs(np.clip(wn, -1, 1)), axis=0)
    np.testing.assert_allclose(q.xnor_weight_scale(w), a * np.where(wn >= 0, 1.0, -1.0), rtol=1e-6)
    # q = a sign(w_c), w_c = clip(w, -1, 1), a = mean|w_c| per column of n entries: d w_c / dw = 1(|w| <= 1),
    # d q_i / d w_c_j = a delta_ij (STE) + sign(w_c_i) sign(w_c_j) / n (TensorFlow's sign(0) = 0 for |.|')
    _, vjp = jax.vjp(q.xnor_weight_scale, w)
    s_tf = np.sign(wn)
    expected = inside * (c * a + s_tf / wn.shape[0] * np.sum(c * np.where(wn >= 0, 1.0, -1.0), axis=0))
    np.testing.assert_allclose(vjp(cot)[0], expected, rtol=1e-5, atol=1e-6)


def test_xnor_weight_scale_without_clip_uses_the_raw_kernel():
    w = jnp.array([[2.0, -0.5], [-1.0, 3.0]])
    np.testing.assert_allclose(q.xnor_weight_scale(w, None), [[1.5, -1.75], [-1.5, 1.75]])


def test_magnitude_aware_sign_unclipped_scales_per_tensor_with_identity_gradient():
    w = jax.random.normal(KEY, (3, 3, 4, 5)) * 1.5  # entries beyond 1: the STE is not clipped
    a = np.mean(np.abs(np.asarray(w)))
    np.testing.assert_allclose(q.magnitude_aware_sign_unclipped(w), a * np.where(np.asarray(w) >= 0, 1, -1), rtol=1e-6)
    cot = jax.random.normal(jax.random.key(1), w.shape)
    _, vjp = jax.vjp(q.magnitude_aware_sign_unclipped, w)
    np.testing.assert_array_equal(vjp(cot)[0], cot)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dorefa_activations(k):
    n = 2 ** k - 1
    x = np.asarray(X)
    np.testing.assert_allclose(q.dorefa(X, k_bit=k), np.round(np.clip(x, 0, 1) * n) / n, rtol=1e-6)
    np.testing.assert_array_equal(grad_of(lambda a: q.dorefa(a, k_bit=k), X), ((x >= 0) & (x <= 1)).astype(np.float32))


# a unique max |w| (-2.0), a tied pair (+-1.4), repeated values and zeros
W_DOREFA = jnp.array([[0.3, -0.9, 0.0], [1.4, -1.4, 0.05], [-2.0, 0.7, 0.0], [0.3, 1e-3, -0.6]], jnp.float32)
COT_DOREFA = jnp.array([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0], [2.0, 1.5, -0.75], [-0.5, 1.0, 2.0]], jnp.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("w", [W_DOREFA, W_DOREFA[:2], jax.random.normal(KEY, (17,))],
                         ids=["unique_max", "tied_max", "normal"])
def test_dorefa_weights_values_and_larq_gradient(k, w):
    n = 2 ** k - 1
    t = np.tanh(np.asarray(w, np.float64))
    m = np.max(np.abs(t))
    np.testing.assert_allclose(q.dorefa(w, k_bit=k, mode="weights"), 2 * np.round((t / (2 * m) + 0.5) * n) / n - 1,
                               atol=1e-6)
    # q(w) = 2 round(n (tanh(w) / (2M) + 1/2)) / n - 1 with M = max|tanh(w)|. Larq 0.14 replaces round by the
    # identity and stops the gradient of M, so dL/dw = g (1 - tanh(w)^2) / M at every entry, the entries
    # attaining M included (a gradient through M would add -sign(w) (1 - tanh^2) sum(g tanh(w)) / M^2 there).
    cot = jnp.resize(COT_DOREFA, w.shape)
    _, vjp = jax.vjp(lambda a: q.dorefa(a, k_bit=k, mode="weights"), w)
    np.testing.assert_allclose(vjp(cot)[0], np.asarray(cot) * (1 - t ** 2) / m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dorefa_weights_all_zero_kernel_is_finite_like_larq(k):
    """Larq normalizes with divide_no_nan: zeros map to 2 quantize_k(1/2) - 1 with a zero gradient."""
    n = 2 ** k - 1
    z = jnp.zeros((2, 3))
    np.testing.assert_allclose(q.dorefa(z, k_bit=k, mode="weights"), np.full((2, 3), 2 * np.round(n / 2) / n - 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(grad_of(lambda a: q.dorefa(a, k_bit=k, mode="weights"), z), np.zeros((2, 3)))


def test_dorefa_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        q.dorefa(X, mode="bias")
    with pytest.raises(ValueError, match="k_bit"):
        q.dorefa(X, k_bit=0)


def test_stochastic_sign_follows_hard_sigmoid_probability():
    x = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    draws = jax.vmap(lambda k: q.stochastic_sign(x, k))(jax.random.split(KEY, 20000))
    p_plus = np.mean(np.asarray(draws) > 0, axis=0)
    np.testing.assert_allclose(p_plus, np.clip((np.asarray(x) + 1) / 2, 0, 1), atol=0.015)
    assert set(np.unique(draws)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(q.stochastic_sign(x, KEY), q.stochastic_sign(x, KEY))
    np.testing.assert_array_equal(grad_of(lambda a: q.stochastic_sign(a, KEY), x), (np.abs(np.asarray(x)) <= 1))


def test_get_resolves_names_callables_none_and_larq_class_names():
    assert q.get("ste_sign").precision == 1
    assert q.get("dorefa", k_bit=4).precision == 4
    assert q.get("ste_tern").precision == 2
    assert q.get(None).precision is None
    np.testing.assert_array_equal(q.get(None)(X), X)
    assert q.SteSign(clip_value=0.5) == q.get("ste_sign", clip_value=0.5)
    assert q.get("SteSign").name == "ste_sign"
    assert hash(q.get("ste_sign", clip_value=0.5)) == hash(q.get("ste_sign", clip_value=0.5))
    np.testing.assert_array_equal(grad_of(q.get("ste_sign", clip_value=0.5), X), np.abs(np.asarray(X)) <= 0.5)

    def custom(x, scale=1.0):
        return x * scale

    custom.precision = 8
    cq = q.get(custom, scale=2.0)
    assert cq.precision == 8 and cq.name == "custom"
    np.testing.assert_array_equal(cq(X), 2 * X)
    assert q.get(cq) is cq


def test_get_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown quantizer 'ste_sgn'.*approx_sign.*ste_sign"):
        q.get("ste_sgn")
    with pytest.raises(TypeError, match="clip"):
        q.get("approx_sign", clip_value=1.0)
    with pytest.raises(TypeError, match="name, a callable or None"):
        q.get(3)
    with pytest.raises(ValueError, match="PRNG key"):
        q.get("stochastic_sign")(X)
    with pytest.raises(TypeError, match="floating-point"):
        q.ste_sign(jnp.arange(3))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=64),
       st.floats(0.05, 3.0))
def test_ste_sign_property(values, clip):
    x = jnp.asarray(values, jnp.float32)
    y = q.ste_sign(x, clip)
    assert np.all(np.abs(np.asarray(y)) == 1)
    np.testing.assert_array_equal(np.asarray(y) > 0, np.asarray(x) >= 0)
    np.testing.assert_array_equal(grad_of(lambda a: q.ste_sign(a, clip), x), np.abs(np.asarray(x)) <= clip)
