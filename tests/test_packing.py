import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bnnjax import packing as pk


def pm1(rng, shape):
    return np.where(rng.random(shape) < 0.5, 1.0, -1.0).astype(np.float32)


def test_bit_layout_is_lsb_first_and_set_means_minus_one():
    x = np.ones(40, np.float32)
    x[[0, 3, 33]] = -1
    w = np.asarray(pk.pack_bits(x))
    assert w.dtype == np.uint32 and w.shape == (2,)
    assert w.tolist() == [(1 << 0) | (1 << 3), 1 << 1]
    np.testing.assert_array_equal(pk.unpack_bits(w, 40), x)
    assert int(pk.pack_bits(np.array([0.0, -0.0, 1e-30]))[0]) == 0  # sign(0) = +1


@pytest.mark.parametrize("kernel", ["popcount", "int8"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 7, 31), (3, 5, 32), (9, 4, 33), (17, 3, 1000), (1, 64, 4096),
                                   (130, 2, 65), (8, 8, 64), (257, 3, 33), (600, 5, 100), (1031, 17, 1000),
                                   (9, 300, 2000)])
def test_xnor_matmul_is_exact(kernel, m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    a, b = pm1(rng, (m, k)), pm1(rng, (n, k))
    out = jax.jit(lambda x, y: pk.xnor_matmul(x, y, k, kernel=kernel))(pk.pack_bits(a), pk.pack_bits(b))
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, (a @ b.T).astype(np.int32))


@pytest.mark.parametrize("m,n,k", [(9000, 64, 288), (5001, 10, 1600), (4100, 31, 1000), (3001, 64, 570)])
def test_inference_kernel_for_small_kernels_is_exact(m, n, k):
    """Packed inference gives small kernels (at most 18432 words) the fusible direct kernel at any batch;
    large M, N or K not multiples of 8 or 32: the same integers as the isolated blocked kernel."""
    rng = np.random.default_rng(m + n + k)
    a, b = pm1(rng, (m, k)), pm1(rng, (n, k))
    pa, pb = pk.pack_bits(a), pk.pack_bits(b)
    # the direct kernel's conditional makes the transposed kernel; the blocked one's, the int32 product
    assert _conditional_outputs(lambda x, y: pk.xnor_matmul(x, y, k, inference=True), pa, pb) == [jnp.uint32]
    assert _conditional_outputs(lambda x, y: pk.xnor_matmul(x, y, k), pa, pb) == [jnp.int32]
    out = jax.jit(lambda x, y: pk.xnor_matmul(x, y, k, inference=True))(pa, pb)
    np.testing.assert_array_equal(out, (a @ b.T).astype(np.int32))


def _conditional_outputs(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "cond":
                found.extend(v.aval.dtype for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("m", [1, 4000])
def test_direct_kernel_reads_a_kernel_argument_in_rows(m):
    """With the kernel a jit argument (how a user jits ``model.apply(packed, x)``), the direct kernel's
    fused popcount loop reads it as made-up ``(W, N)`` rows, one flat buffer, never the ``(N, W)``
    argument itself: read in place, N strided, XLA left the loop unvectorized (seed 000 ran 1.7x slower
    than with the weights closed over)."""
    rng = np.random.default_rng(m)
    a, b = pm1(rng, (m, 288)), pm1(rng, (64, 288))
    fn = jax.jit(lambda x, y: jnp.maximum(pk.xnor_matmul(x, y, 288, inference=True), 0))
    text = fn.lower(pk.pack_bits(a), pk.pack_bits(b)).compile().as_text()
    popcount_fusions = [body for body in text.split("\n\n") if "popcnt(" in body]
    assert popcount_fusions
    for body in popcount_fusions:
        assert "u32[64,9]" not in body and "u32[576]" in body, body[:2000]
    np.testing.assert_array_equal(fn(pk.pack_bits(a), pk.pack_bits(b)), np.maximum(a @ b.T, 0).astype(np.int32))


@pytest.mark.parametrize("shape,kernel_hw,strides,dilation,pads,cout", [
    ((2, 9, 7, 33), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 5),
    ((1, 8, 8, 64), (3, 3), (2, 2), (1, 1), ((0, 1), (0, 1)), 64),
    ((3, 10, 6, 70), (3, 2), (2, 1), (2, 1), ((2, 2), (1, 0)), 3),
    ((2, 5, 5, 1), (1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 7)])
def test_conv_from_taps_is_the_patches_product(shape, kernel_hw, strides, dilation, pads, cout):
    """The direct kernel fed a convolution's taps (the slices of the packed, padded input) gives the
    patches' product: channels not a multiple of 32, strides, dilation, uneven padding, 1x1; also
    exported with a symbolic batch."""
    rng = np.random.default_rng(shape[-1] + cout)
    x, w = pm1(rng, shape), pm1(rng, kernel_hw + (shape[-1], cout))
    words = jnp.pad(pk.pack_bits(x), ((0, 0),) + pads + ((0, 0),))
    kw = pk.pack_kernel(w)
    k = int(np.prod(w.shape[:-1]))
    fn = jax.jit(lambda u: pk.xnor_conv_taps(pk.word_taps(u, kernel_hw, strides, dilation), kw, k))
    want = pk.xnor_matmul(pk.extract_patches(words, kernel_hw, strides, ((0, 0),) * 2, dilation), kw, k)
    np.testing.assert_array_equal(fn(words), want)
    batch, = jax.export.symbolic_shape("batch")
    exported = jax.export.export(fn)(jax.ShapeDtypeStruct((batch,) + words.shape[1:], jnp.uint32))
    np.testing.assert_array_equal(exported.call(words[:1]), want[:1])


def test_conv_from_taps_refuses_mismatched_taps_and_kernel():
    t = jnp.zeros((2, 4, 4, 2), jnp.uint32)
    with pytest.raises(ValueError, match="taps of 2 words"):
        pk.xnor_conv_taps([t] * 9, jnp.zeros((5, 17), jnp.uint32), 500)
    with pytest.raises(ValueError, match="one shape"):
        pk.xnor_conv_taps([t, t[:, :3]], jnp.zeros((5, 4), jnp.uint32), 100)


@pytest.mark.parametrize("words,chunk", [(5, 5), (7, 7), (18, 9), (36, 12), (144, 16), (34, 34)])
def test_word_loop_in_chunks_is_exact(words, chunk):
    """The unrolled word loop runs in chunks of one shared function (a divisor of the word count, or
    all words when the only divisors are small): both kernels give the exact product, and each chunk
    function appears once in the lowered program."""
    assert pk._word_chunk(words) == chunk
    rng = np.random.default_rng(words)
    k = 32 * words - 3
    a, b = pm1(rng, (3000, k)), pm1(rng, (24, k))  # large enough for the blocked kernel
    pa, pb = pk.pack_bits(a), pk.pack_bits(b)
    for inference in (False, True):
        fn = jax.jit(lambda x, y: pk.xnor_matmul(x, y, k, inference=inference))
        np.testing.assert_array_equal(fn(pa, pb), (a @ b.T).astype(np.int32))
        text = fn.lower(pa, pb).as_text()
        assert text.count("stablehlo.popcnt") == chunk, text.count("stablehlo.popcnt")


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 600), st.integers(1, 40), st.integers(1, 300), st.integers(0, 2 ** 31))
def test_xnor_matmul_property(m, n, k, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(m, k)), rng.normal(size=(n, k))  # any floats: their signs are packed
    sa, sb = np.where(a >= 0, 1, -1), np.where(b >= 0, 1, -1)
    np.testing.assert_array_equal(pk.xnor_matmul(pk.pack_bits(a), pk.pack_bits(b), k), sa @ sb.T)


@pytest.mark.parametrize("rows,per_image", [(49, True), (8, True), (60, True), (9, False), (13, False)])
def test_symbolic_batch_blocks_rows_within_each_image(rows, per_image):
    """Exported with a symbolic batch, ``(batch, rows, W)`` operands are row-blocked per image where
    padding each image to whole blocks costs little: exact at every batch size either way, and then no
    shape in the program is a floor division of the batch (which the exported program would
    recompute, one call per use)."""
    rng = np.random.default_rng(rows)
    k, n = 70, 5
    a, b = pm1(rng, (3, rows, k)), pm1(rng, (n, k))
    batch, = jax.export.symbolic_shape("batch")
    f = jax.jit(lambda u: pk.xnor_matmul(u, pk.pack_bits(b), k))
    exported = jax.export.export(f)(jax.ShapeDtypeStruct((batch, rows, pk.num_words(k)), jnp.uint32))
    for size in (1, 3):
        got = np.asarray(exported.call(pk.pack_bits(a[:size])))
        np.testing.assert_array_equal(got, np.einsum("brk,nk->brn", a[:size], b).astype(np.int32))
    text = exported.mlir_module()
    assert ("divmod" in text) == ("floor_divide" in text) == (not per_image)


def test_batched_leading_axes_and_errors():
    rng = np.random.default_rng(0)
    a, b = pm1(rng, (2, 3, 50)), pm1(rng, (4, 50))
    np.testing.assert_array_equal(pk.xnor_matmul(pk.pack_bits(a), pk.pack_bits(b), 50), a @ b.T)
    with pytest.raises(ValueError, match="equal W"):
        pk.xnor_matmul(pk.pack_bits(a), pk.pack_bits(pm1(rng, (4, 70))), 50)
    with pytest.raises(ValueError, match="k=65"):
        pk.xnor_matmul(pk.pack_bits(a), pk.pack_bits(b), 65)
    with pytest.raises(ValueError, match="uint32"):
        pk.xnor_matmul(jnp.ones((2, 2)), pk.pack_bits(b), 50)


def float_conv(x, w, strides, padding, dilation=(1, 1)):
    return jax.lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,kernel_hw,cout,strides,dilation", [
    ((1, 7, 7, 32), (3, 3), 8, (1, 1), (1, 1)),     # batch 1, odd spatial size
    ((2, 9, 8, 5), (3, 3), 4, (2, 2), (1, 1)),      # C not a multiple of 32, strides
    ((3, 6, 11, 40), (2, 3), 3, (1, 2), (1, 1)),
    ((1, 5, 5, 64), (5, 5), 2, (1, 1), (1, 1)),
    ((2, 8, 8, 1), (1, 1), 6, (1, 1), (1, 1)),
    ((1, 11, 9, 33), (3, 3), 5, (1, 1), (2, 3)),    # dilated (BinaryDenseNet37Dilated)
])
@pytest.mark.parametrize("padding", ["VALID", "SAME_ONE", "SAME_ZERO"])
def test_binary_conv2d_equals_lax_conv(shape, kernel_hw, cout, strides, dilation, padding):
    rng = np.random.default_rng(sum(shape))
    x, w = pm1(rng, shape), pm1(rng, kernel_hw + (shape[-1], cout))
    k = int(np.prod(kernel_hw)) * shape[-1]
    dilated = tuple((h - 1) * d + 1 for h, d in zip(kernel_hw, dilation))
    pads = jax.lax.padtype_to_pads(shape[1:3], dilated, strides, "VALID" if padding == "VALID" else "SAME")
    if padding == "SAME_ONE":
        ref = float_conv(jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=1.0), w, strides, "VALID", dilation)
    else:
        ref = float_conv(x, w, strides, pads, dilation)
    corr = pk.pad_correction(pk.tap_sums(w), shape[1:3], strides, pads, dilation) if padding == "SAME_ZERO" else None
    out = jax.jit(lambda xw, kw: pk.binary_conv2d(xw, kw, k, kernel_hw, strides, pads, corr, dilation))(
        pk.pack_bits(x), pk.pack_kernel(w))
    np.testing.assert_array_equal(out, np.asarray(ref).astype(np.int32))


def test_backend_choice_is_made_once():
    assert pk.backend_kernel("cpu") == "popcount" and pk.backend_kernel("gpu") == "int8"
    with pytest.raises(ValueError, match="kernel must be"):
        pk.xnor_matmul(pk.pack_bits(np.ones((2, 3))), pk.pack_bits(np.ones((2, 3))), 3, kernel="magic")


def test_compiler_options_are_per_backend_and_change_no_integer(monkeypatch):
    """512-bit vectors on an AVX-512 CPU, nothing elsewhere; the packed kernels (blocked, and fused into
    an elementwise consumer) give the same integers compiled either way."""
    with monkeypatch.context() as m:
        m.setattr(pk, "cpu_flags", lambda: {"avx2", "avx512f"})
        assert pk.compiler_options("cpu") == {"xla_cpu_prefer_vector_width": 512}
        assert pk.compiler_options("gpu") == {} and pk.compiler_options("tpu") == {}
        m.setattr(pk, "cpu_flags", lambda: {"avx2"})
        assert pk.compiler_options("cpu") == {}
    rng = np.random.default_rng(5)
    a, b = pm1(rng, (3001, 100)), pm1(rng, (37, 100))
    pa, pb = pk.pack_bits(a), pk.pack_bits(b)
    want = (a @ b.T).astype(np.int32)
    for inference in (False, True):
        fn = lambda x, y: 2 * pk.xnor_matmul(x, y, 100, inference=inference) + 1
        np.testing.assert_array_equal(jax.jit(fn, compiler_options=pk.compiler_options())(pa, pb), 2 * want + 1)
