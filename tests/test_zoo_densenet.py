"""BinaryDenseNet zoo models: parameter counts against larq-zoo's Keras models, shapes, dilated binary convs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnnjax import quantizers
from bnnjax.layers import QuantConv
from bnnjax.zoo import densenet

# Keras' model.count_params() of larq-zoo 2.4's models (weights=None), 224x224x3 inputs, 1000 classes.
KERAS_PARAMS = {"BinaryDenseNet28": 5150504, "BinaryDenseNet37": 8734120, "BinaryDenseNet37Dilated": 8734120,
                "BinaryDenseNet45": 13939240}
# The same without top, and larq-zoo's output shapes then (batch axis dropped); a 32x32 input takes
# larq-zoo's small-image stem (one 3x3 convolution).
KERAS_NO_TOP = {("BinaryDenseNet28", 224): (4573504, (7, 7, 576)),
                ("BinaryDenseNet37Dilated", 224): (8093120, (28, 28, 640)),
                ("BinaryDenseNet28", 32): (4565568, (4, 4, 576))}
# BinaryDenseNet28 on 32x32 inputs with a 10-class top.
KERAS_SMALL_TOP = 4571338


def _params_and_shape(model, size):
    # One trace, no compilation: tracing the binary convolutions is what costs here.
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    y, variables = jax.eval_shape(lambda a: model.init_with_output(jax.random.key(0), a), x)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables)), y.shape


@pytest.mark.parametrize("name", sorted(KERAS_PARAMS))
def test_parameter_count_matches_keras(name):
    assert _params_and_shape(densenet.MODELS[name](), 224) == (KERAS_PARAMS[name], (2, 1000))


@pytest.mark.parametrize("name, size", sorted(KERAS_NO_TOP))
def test_no_top_matches_keras(name, size):
    params, shape = KERAS_NO_TOP[name, size]
    assert _params_and_shape(densenet.MODELS[name](include_top=False), size) == (params, (2,) + shape)


def test_small_input_and_classes_match_keras():
    model = densenet.BinaryDenseNet28(num_classes=10)
    assert _params_and_shape(model, 32) == (KERAS_SMALL_TOP, (2, 10))


def test_registry_and_weights():
    assert set(densenet.MODELS) == set(densenet.WEIGHTS) == set(KERAS_PARAMS)
    for files in densenet.WEIGHTS.values():
        assert set(files) == {True, False}
        assert all(len(w.sha256) == 64 and w.url.endswith(".h5") for w in files.values())
    assert densenet.WEIGHTS["BinaryDenseNet37Dilated"][False].url.endswith(
        "binary_densenet-v0.1.1/binary_densenet_37_dilated_weights_notop.h5")


def test_transition_filters_follow_larq_zoo_rounding():
    # 448 // 2.7 = 165.0 -> 5.16 words of 32; 832 // 3.3 = 252.0 -> 7.875; 2.5 rounds to even.
    assert densenet._transition_filters(448, 2.7) == 160
    assert densenet._transition_filters(832, 3.3) == 256
    assert densenet._transition_filters(80, 1.0) == 64


def test_mismatched_section_fields_raise():
    model = densenet.BinaryDenseNet28(dilation_rate=(1, 1, 1))
    with pytest.raises(ValueError, match="dilation_rate"):
        jax.eval_shape(lambda a: model.init(jax.random.key(0), a), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


@pytest.mark.parametrize("dilation", [2, 4])
@pytest.mark.parametrize("pad_value", [0.0, 1.0])
def test_dilated_binary_conv_equals_lax_conv_on_signs(dilation, pad_value):
    kx, kw = jax.random.split(jax.random.key(dilation))
    x = jax.random.normal(kx, (2, 11, 13, 5))
    x = x.at[0, 3, 4, :].set(0.0)  # sign(0) = +1, as Larq's ste_sign
    sign = quantizers.SteSign(clip_value=densenet.CLIP_VALUE)
    layer = QuantConv(7, (3, 3), padding="SAME", kernel_dilation=dilation, input_quantizer=sign,
                      kernel_quantizer=sign, use_bias=False, pad_values=pad_value)
    variables = layer.init(jax.random.key(1), x)
    kernel = jax.random.normal(kw, (3, 3, 5, 7))
    variables = jax.tree.map(lambda _: kernel, variables)
    y = jax.jit(layer.apply)(variables, x)

    def pm1(a):
        return jnp.where(a >= 0, 1.0, -1.0)

    p = dilation  # "SAME" for a 3x3 kernel dilated by d pads d on each side
    xs = jnp.pad(pm1(x), ((0, 0), (p, p), (p, p), (0, 0)), constant_values=pad_value)
    ref = jax.lax.conv_general_dilated(xs, pm1(kernel), (1, 1), "VALID", rhs_dilation=(dilation, dilation),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    assert y.shape == (2, 11, 13, 7)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
