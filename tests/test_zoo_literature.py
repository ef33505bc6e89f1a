"""XNORNet, DoReFaNet and BinaryAlexNet zoo models: parameter counts against larq-zoo's Keras models,
output shapes, the weights registry and DoReFaNet's clipping activation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnnjax.zoo import binary_alex_net, dorefanet, xnornet

MODELS = {**xnornet.MODELS, **dorefanet.MODELS, **binary_alex_net.MODELS}
WEIGHTS = {**xnornet.WEIGHTS, **dorefanet.WEIGHTS, **binary_alex_net.WEIGHTS}

# Keras' model.count_params() of larq-zoo 2.4's models built with weights=None: (224x224 with top,
# 224x224 without top, 224x224 with a 10-class top, 256x256 with a 10-class top, 256x256 without top).
# The flattening tops make the count depend on the input size.
KERAS_PARAMS = {
    "XNORNet": (62396768, 41511264, 58341728, 58464608, 41511264),
    "DoReFaNet": (62403912, 3756384, 58347882, 71979370, 3756384),
    "BinaryAlexNet": (61859192, 3209664, 57801182, 71432670, 3209664),
}
# larq-zoo's output shapes without top (batch axis dropped): 224x224 and 256x256 inputs.
NO_TOP_SHAPES = {
    "XNORNet": ((1, 1, 4096), (2, 2, 4096)),
    "DoReFaNet": ((6, 6, 256), (7, 7, 256)),
    "BinaryAlexNet": ((6, 6, 256), (7, 7, 256)),
}


def _shapes(model, size):
    """Parameter count and output shape from abstract evaluation: nothing is compiled."""
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
    return params, jax.eval_shape(model.apply, variables, x).shape


@pytest.mark.parametrize("name", sorted(KERAS_PARAMS))
@pytest.mark.parametrize("size, include_top, num_classes, column",
                         [(224, True, 1000, 0), (224, False, 1000, 1), (224, True, 10, 2), (256, True, 10, 3),
                          (256, False, 10, 4)])
def test_parameter_count_and_output_shape_match_keras(name, size, include_top, num_classes, column):
    params, shape = _shapes(MODELS[name](include_top=include_top, num_classes=num_classes), size)
    assert params == KERAS_PARAMS[name][column]
    if include_top:
        assert shape == (2, num_classes)
    else:
        assert shape == (2,) + NO_TOP_SHAPES[name][size == 256]


def test_binary_alex_net_inflation_ratio_widens_all_convolutions_but_the_last():
    model = binary_alex_net.BinaryAlexNet(inflation_ratio=2, include_top=False)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)["params"]
    widths = [params[f"QuantConv_{i}"]["kernel"].value.shape[-1] for i in range(5)]
    assert widths == [128, 384, 768, 768, 256]


def test_registry_and_weights():
    assert set(MODELS) == set(WEIGHTS) == set(KERAS_PARAMS)
    for files in WEIGHTS.values():
        assert set(files) == {True, False}
        assert all(len(w.sha256) == 64 and w.url.endswith(".h5") for w in files.values())
    assert WEIGHTS["XNORNet"][False].url.endswith("xnornet-v0.2.1/xnornet_weights_notop.h5")
    assert WEIGHTS["BinaryAlexNet"][True].url.endswith("binary_alexnet-v0.3.0/binary_alexnet_weights.h5")
    assert WEIGHTS["DoReFaNet"][False].url.endswith("dorefanet-v0.1.1/dorefanet_weights_notop.h5")


def test_clip_by_value_activation_equals_clip_with_tensorflow_gradient():
    x = jnp.array([-1.5, -0.0, 0.0, 1e-3, 0.5, 0.999, 1.0, 1.0 + 1e-6, 3.0])
    np.testing.assert_array_equal(dorefanet.clip_by_value_activation(x), jnp.clip(x, 0.0, 1.0))
    cot = jnp.arange(1.0, x.size + 1)
    _, vjp = jax.vjp(dorefanet.clip_by_value_activation, x)
    # tf.clip_by_value passes the gradient wherever 0 <= x <= 1, the ends included
    np.testing.assert_array_equal(vjp(cot)[0], np.where((np.asarray(x) >= 0) & (np.asarray(x) <= 1), cot, 0.0))
