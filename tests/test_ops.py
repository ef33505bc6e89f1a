import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bnnjax import layers as L
from bnnjax import ops
from bnnjax import packing

KEY = jax.random.key(0)


@pytest.mark.parametrize("shape,window,strides", [((2, 6, 6, 3), (2, 2), None), ((1, 7, 5, 2), (2, 2), None),
                                                  ((2, 9, 3), (3,), None), ((1, 6, 9, 2), (3, 3), None),
                                                  ((2, 7, 6, 3), (2, 2), (1, 1)), ((1, 9, 8, 2), (3, 3), (2, 2)),
                                                  ((1, 8, 7, 2), (2, 3), (3, 1)), ((2, 9, 3), (2,), (1,))])
def test_fast_max_pool_matches_flax_values_and_first_max_gradient(shape, window, strides):
    """Non-overlapping, overlapping (QuickNet's 2x2 stride 1) and gapped windows: nn.max_pool's values and
    its gradient (to the first maximum of each window, summed over windows) on inputs full of ties."""
    x = jnp.asarray(np.random.default_rng(0).integers(-3, 3, shape).astype(np.float32))  # ties everywhere
    y = ops.max_pool(x, window, strides)
    np.testing.assert_array_equal(y, nn.max_pool(x, window, strides or window))
    np.testing.assert_array_equal(jax.jit(lambda v: ops.max_pool(v, window, strides))(x), y)
    g = jnp.asarray(np.random.default_rng(1).integers(-50, 50, y.shape).astype(np.float32))  # exact sums
    y_train, pull = jax.vjp(lambda v: ops.max_pool(v, window, strides), x)  # the training forward
    np.testing.assert_array_equal(y_train, y)
    ours = pull(g)[0]
    flax_grad = jax.vjp(lambda v: nn.max_pool(v, window, strides or window), x)[1](g)[0]
    np.testing.assert_array_equal(ours, flax_grad)
    assert "select_and_scatter" not in str(jax.make_jaxpr(jax.grad(lambda v: ops.max_pool(v, window, strides).sum()))(x))
    assert L.MaxPool(window, strides).apply({}, x).shape == y.shape


@pytest.mark.parametrize("order", ["float_after_packed", "packed_after_float"])
def test_float_forward_is_part_of_the_jit_cache_key(order):
    """``float_forward()`` changes the compiled program of a function jitted once, in either order."""
    layer = L.QuantDense(8, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    x = jnp.ones((4, 40))
    v = layer.init(KEY, x)
    f = jax.jit(layer.apply)
    packed = lambda: "popcnt" in f.lower(v, x).as_text()
    if order == "float_after_packed":
        assert packed()
        with ops.float_forward():
            assert not packed()
        assert packed()
    else:
        with ops.float_forward():
            assert not packed()
        assert packed()
    np.testing.assert_array_equal(f(v, x), jax.jit(layer.apply)(v, x))


@pytest.mark.parametrize("shape,kernel_size,strides,padding,dilation", [
    ((2, 7, 6, 3), (3, 3), (1, 1), "SAME", (1, 1)),
    ((1, 8, 9, 4), (3, 3), (2, 2), "SAME", (1, 1)),   # QuickNet's stem and blur pool
    ((2, 9, 7, 2), (3, 2), (2, 1), "VALID", (1, 1)),
    ((1, 9, 9, 3), (3, 3), (1, 2), ((2, 0), (1, 3)), (2, 1)),
    ((1, 5, 6, 2), (2, 2), (3, 3), "SAME", (1, 1)),
])
@pytest.mark.parametrize("isolated", [False, True])
def test_depthwise_taps_match_grouped_convolution_values_and_gradients(shape, kernel_size, strides, padding,
                                                                       dilation, isolated, monkeypatch):
    """The depthwise shifted-taps convolution and its hand-written backward equal XLA's grouped
    convolution and its autodiff (strides, dilation, asymmetric padding, kernels wider than strides),
    with the kernel's gradient fused freely or isolated as a large layer's is."""
    if isolated:
        monkeypatch.setattr(ops, "_ISOLATE_MIN_BYTES", 0)
    x = jax.random.normal(KEY, shape)
    c = shape[-1]
    k = jax.random.normal(jax.random.key(1), kernel_size + (1, c))
    kw = dict(strides=strides, padding=padding, kernel_dilation=dilation, feature_group_count=c)
    ours = lambda x, k: ops.conv_nd(x, k, **kw)
    pads = padding if isinstance(padding, str) else tuple(padding)
    ref = lambda x, k: jax.lax.conv_general_dilated(x, k, strides, pads, rhs_dilation=dilation,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                    feature_group_count=c, precision="highest")
    y = ours(x, k)
    np.testing.assert_allclose(y, ref(x, k), rtol=1e-5, atol=1e-5)
    w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    g, g_ref = (jax.grad(lambda x, k: jnp.sum(f(x, k) * w), argnums=(0, 1))(x, k) for f in (ours, ref))
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn,kernel_shape,kw", [
    (ops.quant_conv, (3, 3, 3, 4), dict(strides=[2, 1], padding=[(1, 1), (0, 2)])),
    (ops.quant_conv, (3, 3, 3, 4), dict(padding="SAME", pad_values=1.0)),
    (ops.quant_dense, (3, 4), {}),
    (ops.quant_dense, (3, 4), dict(bias=np.arange(4, dtype=np.float32))),  # an array by keyword: traced
])
def test_eager_layer_call_is_one_compiled_program_with_the_traced_values(fn, kernel_shape, kw, caplog):
    """Called on concrete arrays a quantized layer runs as one jitted program (list-valued arguments
    made hashable), not op by op; its values are those of the same call traced inside jit."""
    rng = np.random.default_rng(len(kw))
    x = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)  # numpy: making the inputs compiles nothing
    k = rng.normal(size=kernel_shape).astype(np.float32)
    kw = dict(kw, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    with jax.log_compiles(), caplog.at_level("WARNING"):
        eager = fn(x, k, **kw)
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert len(compiled) == 1, compiled
    np.testing.assert_array_equal(eager, jax.jit(lambda a, b: fn(a, b, **kw))(x, k))


@pytest.mark.parametrize("shape,kernel_shape,strides,padding", [
    ((2, 13, 11, 3), (3, 3, 3, 64), (2, 2), "SAME"),
    ((1, 9, 10, 4), (5, 5, 4, 16), (1, 1), "VALID"),
    ((2, 8, 7, 2), (3, 3, 2, 64), (1, 2), ((1, 0), (2, 1))),
])
def test_narrow_input_convolution_is_xlas_forward_with_the_patches_gradient(shape, kernel_shape, strides, padding):
    """A real input of few channels and a kernel too large to sum its taps: undifferentiated, XLA's
    convolution, value for value; its gradients are the patches' dot's, equal to XLA's convolution's
    to float32 rounding."""
    rng = np.random.default_rng(sum(shape))
    x, k = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in (shape, kernel_shape))
    assert not ops._sums_taps(k.reshape(-1, k.shape[-1]))
    conv = lambda a, b: ops.conv_nd(a, b, strides=strides, padding=padding)  # noqa: E731
    dn = jax.lax.conv_dimension_numbers(shape, kernel_shape, ("NHWC", "HWIO", "NHWC"))
    pads = padding if isinstance(padding, str) else list(padding)
    ref = lambda a, b: jax.lax.conv_general_dilated(a, b, strides, pads, dimension_numbers=dn)  # noqa: E731
    np.testing.assert_array_equal(jax.jit(conv)(x, k), jax.jit(ref)(x, k))
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))  # noqa: E731
    for got, want in zip(jax.grad(loss(conv), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isolated", [False, True])
def test_relu_has_jax_relus_values_and_gradients(isolated, monkeypatch):
    """``ops.relu`` (which keeps its output for the backward pass) equals ``jax.nn.relu``: values and
    gradients, 0 at 0, eager and jitted, with its output fused freely or isolated as a large one is."""
    if isolated:
        monkeypatch.setattr(ops, "_ISOLATE_MIN_BYTES", 0)
    x = jnp.concatenate([jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0]), jax.random.normal(KEY, (59,))]).reshape(2, 4, 8)
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    for wrap in (lambda f: f, jax.jit):
        for fn in (lambda x: x, lambda x: jnp.sum(x * w)):
            np.testing.assert_array_equal(wrap(lambda x: fn(ops.relu(x)))(x), fn(jax.nn.relu(x)))
        g, g_ref = (wrap(jax.grad(lambda x, r=r: jnp.sum(r(x) * w)))(x) for r in (ops.relu, jax.nn.relu))
        np.testing.assert_array_equal(g, g_ref)


class _BinaryBlocks(nn.Module):
    """Three residual blocks ``x + BatchNorm(act(QuantConv(x)))``, QuickNet's shape of block."""
    act: object = None

    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            y = L.QuantConv(x.shape[-1], (3, 3), padding="SAME", pad_values=1.0, use_bias=False,
                            input_quantizer="ste_sign", kernel_quantizer="ste_sign")(x)
            x = x + L.BatchNorm(use_running_average=False)(y if self.act is None else self.act(y))
        return x


@pytest.mark.parametrize("act", [None, ops.relu], ids=["conv-bn", "conv-relu-bn"])
def test_binary_blocks_keep_one_float_per_activation_for_the_backward(act, monkeypatch):
    """Training, XLA fuses the int32-to-float conversion of a packed product (and a ReLU) into the
    backward's loops and so keeps the int32 product besides the float its BatchNorm reads: two arrays
    per activation. Large products and ReLU outputs are isolated (``ops._isolated``) so that only the
    float is kept: compiled temporary memory at least one activation array smaller."""
    x = jax.random.normal(KEY, (16, 32, 32, 64))
    model = _BinaryBlocks(act)
    v = model.init(jax.random.key(1), x)

    def temp_bytes():
        def loss(p):
            y, _ = model.apply({**v, "params": p}, x, mutable=["batch_stats"])
            return jnp.sum(y * y)
        return jax.jit(jax.grad(loss)).lower(v["params"]).compile().memory_analysis().temp_size_in_bytes

    assert x.nbytes >= ops._ISOLATE_MIN_BYTES
    isolated = temp_bytes()
    monkeypatch.setattr(ops, "_ISOLATE_MIN_BYTES", 2**62)
    assert isolated <= temp_bytes() - x.nbytes


@pytest.mark.parametrize("cout,channels,padding,pad_values", [(8, 40, "SAME", 0.0), (8, 40, "SAME", 1.0),
                                                             (640, 100, "SAME", 0.0), (640, 100, "VALID", 1.0)])
def test_packed_conv_reads_small_kernels_taps_in_place(cout, channels, padding, pad_values):
    """Packed inference on CPU: a kernel small enough for the fused direct kernel is multiplied from the
    input's taps (no patches: no stacking of taps in the program), a large one through the patches; both
    are the convolution of the signs, zero padding corrected exactly."""
    rng = np.random.default_rng(cout)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, channels)).astype(np.float32))
    w = np.where(rng.random((3, 3, channels, cout)) < 0.5, 1.0, -1.0).astype(np.float32)
    kernel = packing.PackedKernel(words=packing.pack_kernel(w), shape=w.shape)
    small = kernel.words.size <= packing._DIRECT_MAX_KERNEL_WORDS
    assert small == (cout == 8)
    fn = lambda v: ops.packed_conv(v, kernel, strides=(2, 1), padding=padding, pad_values=pad_values)  # noqa: E731
    program = str(jax.make_jaxpr(fn)(x))
    assert ("stack[" in program or "concatenate[" in program) == (not small)
    sx = jnp.where(x < 0, -1.0, 1.0)
    pads = [(1, 1), (1, 1)] if padding == "SAME" else [(0, 0), (0, 0)]
    want = jax.lax.conv_general_dilated(jnp.pad(sx, [(0, 0)] + pads + [(0, 0)], constant_values=pad_values), w, (2, 1),
                                        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(jax.jit(fn)(x), want)
