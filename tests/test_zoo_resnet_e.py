"""BinaryResNetE18 zoo model: parameter counts and layer order against larq-zoo's Keras model, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bnnjax import quantizers
from bnnjax.layers import QuantConv, QuantDense
from bnnjax.zoo import resnet_e
from bnnjax.zoo._keras_h5 import record_layers

# Keras' model.count_params() and output shape (batch axis dropped) of larq-zoo 2.4's BinaryResNetE18 built
# with weights=None: (input size, include_top, num_classes) -> (params, shape). Inputs under 50 pixels get
# larq-zoo's small stem (one 3x3 conv, no BatchNorm, no pooling).
KERAS = {
    (224, True, 1000): (11699368, (1000,)),
    (224, False, 1000): (11186368, (7, 7, 512)),
    (32, True, 10): (11183306, (10,)),
    (32, False, 10): (11178176, (4, 4, 512)),
    (40, False, 1000): (11178176, (5, 5, 512)),
}
# The layers with weights in larq-zoo's model.layers order (the weights file's order): C conv, Q binary
# conv, B BatchNorm, D dense. Each downsampling block is listed as binary conv, shortcut conv, two BNs.
KERAS_LAYER_ORDER = "CBBQBQBQBQBQCBBQBQBQBQCBBQBQBQBQCBBQBQBQBD"


def _init_shapes(model, size):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    return x, jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)


@pytest.mark.parametrize("size, include_top, num_classes", sorted(KERAS))
def test_parameter_count_and_output_shape_match_keras(size, include_top, num_classes):
    model = resnet_e.BinaryResNetE18(include_top=include_top, num_classes=num_classes)
    x, variables = _init_shapes(model, size)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
    assert (params, jax.eval_shape(model.apply, variables, x).shape[1:]) == KERAS[size, include_top, num_classes]


def _layers(model, size=224):
    return [m for _, m in record_layers(lambda: _init_shapes(model, size)[1])[1]]


def _kind(m) -> str:
    if isinstance(m, nn.BatchNorm):
        return "B"
    if isinstance(m, QuantDense):
        return "D"
    assert isinstance(m, QuantConv)
    return "C" if m.input_quantizer is None else "Q"


def test_layers_are_called_in_keras_weights_file_order():
    assert "".join(map(_kind, _layers(resnet_e.BinaryResNetE18()))) == KERAS_LAYER_ORDER
    # the small stem drops the stem's two BatchNorms
    small = "".join(map(_kind, _layers(resnet_e.BinaryResNetE18(), 32)))
    assert small == "C" + KERAS_LAYER_ORDER[3:]


def test_binary_convs_and_batch_norms_follow_larq_zoo():
    layers = _layers(resnet_e.BinaryResNetE18())
    sign = quantizers.SteSign(clip_value=1.25)
    binary = [m for m in layers if _kind(m) == "Q"]
    assert len(binary) == 16 and resnet_e.CLIP_VALUE == 1.25
    assert all(m.input_quantizer == sign and m.kernel_quantizer == sign and not m.use_bias for m in binary)
    assert {(m.momentum, m.epsilon) for m in layers if _kind(m) == "B"} == {(0.9, 1e-5)}


def test_unknown_num_layers_raises():
    with pytest.raises(ValueError, match="num_layers"):
        _init_shapes(resnet_e.BinaryResNetE18(num_layers=20), 64)


def test_registry_and_weights():
    assert set(resnet_e.MODELS) == set(resnet_e.WEIGHTS) == {"BinaryResNetE18"}
    files = resnet_e.WEIGHTS["BinaryResNetE18"]
    assert set(files) == {True, False}
    assert files[True].url.endswith("resnet_e-v0.1.0/resnet_e_18_weights.h5")
    assert files[False].url.endswith("resnet_e-v0.1.0/resnet_e_18_weights_notop.h5")
    assert all(len(w.sha256) == 64 for w in files.values())
