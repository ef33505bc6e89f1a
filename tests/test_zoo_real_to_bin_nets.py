import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from bnnjax import layers as L
from bnnjax import zoo
from bnnjax.zoo import real_to_bin_nets as r2b
from bnnjax.zoo._keras_h5 import record_layers

IMAGE = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)

# Keras' model.count_params() of larq-zoo 2.4's RealToBinaryNet(weights=None, ...): with the top
# (1000 classes), with num_classes=10, and with include_top=False.
KERAS_PARAMS = {"top": 11_995_624, "top10": 11_487_754, "notop": 11_482_624}


def _count(model, x=IMAGE) -> int:
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))


def test_registered_with_larq_zoo_weights():
    assert zoo.MODELS["RealToBinaryNet"] is r2b.RealToBinaryNet
    assert zoo.WEIGHTS["RealToBinaryNet"][True].url.endswith("/r2b-v0.1.0/r2b_weights.h5")
    assert zoo.WEIGHTS["RealToBinaryNet"][False].url.endswith("/r2b-v0.1.0/r2b_weights_notop.h5")


@pytest.mark.parametrize("fields, key", [({}, "top"), ({"num_classes": 10}, "top10"),
                                         ({"include_top": False}, "notop")])
def test_param_count_equals_keras(fields, key):
    assert _count(r2b.RealToBinaryNet(**fields)) == KERAS_PARAMS[key]


@pytest.mark.parametrize("fields, shape", [({"num_classes": 10}, (1, 10)), ({"include_top": False}, (1, 7, 7, 512))])
def test_output_shape(fields, shape):
    model = r2b.RealToBinaryNet(**fields)
    out = jax.eval_shape(lambda a: model.init_with_output(jax.random.key(0), a)[0], IMAGE)
    assert out.shape == shape


def test_downsampling_block_calls_layers_in_keras_file_order():
    # larq-zoo's weights file lists a downsampling half-block's layers as batch_norm,
    # scaling_dense_reduce, scaling_dense_expand, conv2d, shortcut_conv2d, prelu, shortcut_batch_norm.
    block = r2b._HalfBinaryBlock(32, strides=2)
    _, layers = record_layers(lambda: jax.eval_shape(
        lambda a: block.init(jax.random.key(0), a), jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32)))
    assert [type(m) for _, m in layers] == [L.BatchNorm, L.QuantDense, L.QuantDense, L.QuantConv, L.QuantConv,
                                           L.PReLU, L.BatchNorm]


def _random_variables(module, x, seed=0):
    """Every variable of ``module`` drawn from N(0, 1), BatchNorm variances from [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda a: module.init(jax.random.key(0), a), x)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), shapes)
    for bn in variables["batch_stats"].values():
        bn["var"] = jnp.asarray(rng.uniform(0.5, 1.5, bn["var"].shape), jnp.float32)
    return variables


def _bn(x, v, eps=1e-3):
    return (x - v["mean"]) / jnp.sqrt(v["var"] + eps) * v["scale"] + v["bias"]


def _sign(a):
    return jnp.where(a >= 0, 1.0, -1.0)


def _conv(x, k, strides):
    return jax.lax.conv_general_dilated(x, k, (strides, strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def _half_block_reference(p, s, x, strides):
    """larq-zoo's half-block written out in jnp, float convolutions on explicit signs."""
    h = _bn(x, {**p["BatchNorm_0"], **s["BatchNorm_0"]})
    z = jnp.maximum(h.mean(axis=(1, 2)) @ p["QuantDense_0"]["kernel"], 0.0)
    gate = jax.nn.sigmoid(z @ p["QuantDense_1"]["kernel"])
    y = _conv(_sign(h), _sign(p["QuantConv_0"]["kernel"]), strides) * gate[:, None, None, :]
    alpha = p["PReLU_0"]["alpha"]
    y = jnp.maximum(y, 0.0) + alpha * jnp.minimum(y, 0.0)
    if "QuantConv_1" not in p:
        return y + x
    n, hh, ww, c = x.shape
    pooled = x.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
    shortcut = _conv(pooled, p["QuantConv_1"]["kernel"], 1)
    return y + _bn(shortcut, {**p["BatchNorm_1"], **s["BatchNorm_1"]})


@pytest.mark.parametrize("features, strides", [(16, 1), (32, 2)])
def test_half_block_equals_jnp_reference(features, strides):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
    block = r2b._HalfBinaryBlock(features, strides=strides)
    variables = _random_variables(block, x)
    plain = meta.unbox(variables)
    ref = jax.jit(_half_block_reference, static_argnums=3)(plain["params"], plain["batch_stats"], x, strides)
    out = jax.jit(block.apply)(variables, x)
    assert out.shape == ref.shape == (2, 8 // strides, 8 // strides, features)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
