"""BiRealNet zoo model: parameter counts and layer order against larq-zoo's Keras model, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bnnjax.layers import QuantConv, QuantDense
from bnnjax.zoo import birealnet
from bnnjax.zoo._keras_h5 import record_layers

# Keras' model.count_params() and output shape (batch axis dropped) of larq-zoo 2.4's BiRealNet built with
# weights=None: (input size, include_top, num_classes) -> (params, shape).
KERAS = {
    (224, True, 1000): (11699112, (1000,)),
    (224, False, 1000): (11186112, (7, 7, 512)),
    (32, True, 10): (11191242, (10,)),
    (32, False, 10): (11186112, (1, 1, 512)),
    (40, False, 1000): (11186112, (2, 2, 512)),  # odd maps (5x5, 3x3) into the padded average pools
}
# The layers with weights in larq-zoo's model.layers order (the weights file's order): C conv, Q binary
# conv, B BatchNorm, D dense. Each downsampling block is listed as binary conv, shortcut conv, two BNs.
KERAS_LAYER_ORDER = "CBQBQBQBQBQCBBQBQBQBQCBBQBQBQBQCBBQBQBQBD"


def _init_shapes(model, size):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return x, jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)


@pytest.mark.parametrize("size, include_top, num_classes", sorted(KERAS))
def test_parameter_count_and_output_shape_match_keras(size, include_top, num_classes):
    model = birealnet.BiRealNet(include_top=include_top, num_classes=num_classes)
    x, variables = _init_shapes(model, size)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
    assert (params, jax.eval_shape(model.apply, variables, x).shape[1:]) == KERAS[size, include_top, num_classes]


def _layer_kinds(model) -> str:
    _, layers = record_layers(lambda: _init_shapes(model, 224)[1])

    def kind(m):
        if isinstance(m, nn.BatchNorm):
            return "B"
        if isinstance(m, QuantDense):
            return "D"
        assert isinstance(m, QuantConv)
        return "C" if m.input_quantizer is None else "Q"

    return "".join(kind(m) for _, m in layers)


def test_layers_are_called_in_keras_weights_file_order():
    assert _layer_kinds(birealnet.BiRealNet()) == KERAS_LAYER_ORDER
    assert _layer_kinds(birealnet.BiRealNet(include_top=False)) == KERAS_LAYER_ORDER[:-1]


def test_binary_convs_use_larq_zoo_quantizers():
    _, layers = record_layers(lambda: _init_shapes(birealnet.BiRealNet(), 224)[1])
    binary = [m for _, m in layers if isinstance(m, QuantConv) and m.input_quantizer is not None]
    assert len(binary) == 16
    assert {(m.input_quantizer, m.kernel_quantizer, m.use_bias, m.pad_values) for m in binary} == {
        ("approx_sign", "magnitude_aware_sign", False, 0.0)}


def test_registry_and_weights():
    assert set(birealnet.MODELS) == set(birealnet.WEIGHTS) == {"BiRealNet"}
    files = birealnet.WEIGHTS["BiRealNet"]
    assert set(files) == {True, False}
    assert files[True].url.endswith("birealnet-v0.3.0/birealnet_weights.h5")
    assert files[False].url.endswith("birealnet-v0.3.0/birealnet_weights_notop.h5")
    assert all(len(w.sha256) == 64 for w in files.values())
