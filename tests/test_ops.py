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
