import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bnnjax import layers as L
from bnnjax import ops

KEY = jax.random.key(0)


@pytest.mark.parametrize("shape,window", [((2, 6, 6, 3), (2, 2)), ((1, 7, 5, 2), (2, 2)), ((2, 9, 3), (3,)),
                                          ((1, 6, 9, 2), (3, 3))])
def test_fast_max_pool_matches_flax_values_and_first_max_gradient(shape, window):
    x = jnp.asarray(np.random.default_rng(0).integers(-3, 3, shape).astype(np.float32))  # ties everywhere
    y = ops.max_pool(x, window)
    np.testing.assert_array_equal(y, nn.max_pool(x, window, window))
    g = jax.random.normal(KEY, y.shape)
    ours = jax.vjp(lambda v: ops.max_pool(v, window), x)[1](g)[0]
    flax_grad = jax.vjp(lambda v: nn.max_pool(v, window, window), x)[1](g)[0]
    np.testing.assert_array_equal(ours, flax_grad)
    assert L.MaxPool(window).apply({}, x).shape == y.shape


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
