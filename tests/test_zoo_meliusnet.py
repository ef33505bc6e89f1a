"""MeliusNet22 (bnnjax.zoo.meliusnet): parameter counts as larq-zoo's, Keras' layer order, and the
family's own pieces (split grouped conv, dense and improvement blocks) against float references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bnnjax.zoo import meliusnet
from bnnjax.zoo._keras_h5 import record_layers
from bnnjax.zoo.meliusnet import MeliusNet22, _SplitGroupConv

# Keras' model.count_params() of larq-zoo 2.4's MeliusNet22(weights=None, ...): with the top
# (num_classes=1000 and 10) and with include_top=False.
KERAS_PARAMS = {(True, 1000): 6969672, (True, 10): 6461802, (False, 1000): 6456672}

_DN = ("NHWC", "HWIO", "NHWC")


def _count(model, size=224):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))


@pytest.mark.parametrize("include_top,num_classes", sorted(KERAS_PARAMS))
def test_params_match_keras(include_top, num_classes):
    model = MeliusNet22(include_top=include_top, num_classes=num_classes)
    assert _count(model) == KERAS_PARAMS[(include_top, num_classes)]


def test_output_shapes():
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out = jax.eval_shape(lambda a: MeliusNet22(num_classes=7).init_with_output(jax.random.key(0), a)[0], x)
    assert out.shape == (2, 7)
    out = jax.eval_shape(lambda a: MeliusNet22(include_top=False).init_with_output(jax.random.key(0), a)[0], x)
    assert out.shape == (2, 7, 7, 512)


def _keras_layer_names(num_blocks, transition_features):
    names = ["stem_s0_conv", "stem_s0_bn", *[f"stem_s1_groupconv_conv{i}" for i in range(4)], "stem_s1_bn",
             *[f"stem_s2_groupconv_conv{i}" for i in range(8)], "stem_s2_bn"]
    for i, (n, f) in enumerate(zip(num_blocks, transition_features)):
        for j in range(n):
            for part in ("dense", "improve"):
                names += [f"section_{i}_block_{j}_{part}_bn", f"section_{i}_block_{j}_{part}_binconv"]
        if f:
            names += [f"section_{i}_transition_bn", f"section_{i}_transition_pw"]
    return names + ["head_bn", "head_dense"]


def test_layers_called_in_keras_order():
    # the .h5 loader pairs layers by position: the Flax call order must be larq-zoo's model.layers order
    model = MeliusNet22()
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    _, layers = record_layers(lambda: jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x))
    assert ["_".join(path) for path, _ in layers] == _keras_layer_names(model.num_blocks,
                                                                       model.transition_features)


def test_small_model_runs():
    model = MeliusNet22(num_classes=5, num_blocks=(1, 0), transition_features=(96, None))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    y, _ = jax.jit(model.init_with_output)(jax.random.key(0), x)
    assert y.shape == (2, 5)
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("features,groups,cin", [(32, 4, 32), (64, 8, 32)])
def test_split_group_conv_is_one_grouped_conv(features, groups, cin):
    conv = _SplitGroupConv(features, (3, 3), groups=groups)
    x = jax.random.normal(jax.random.key(1), (2, 9, 11, cin))
    y, variables = conv.init_with_output(jax.random.key(0), x)
    params = variables["params"]
    assert sorted(params) == [f"conv{i}" for i in range(groups)]
    # group i's inputs are channel slice i and its outputs are output slice i: Flax's grouped layout
    kernel = jnp.concatenate([params[f"conv{i}"]["kernel"] for i in range(groups)], axis=-1)
    assert kernel.shape == (3, 3, cin // groups, features)
    ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DN,
                                       feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_split_group_conv_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        _SplitGroupConv(32, (3, 3), groups=3).init(jax.random.key(0), jnp.zeros((1, 4, 4, 32)))


class _Block(MeliusNet22):
    kind: str = "dense"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.kind == "dense":
            return self._dense_block(x, train, "block")
        return self._improvement_block(x, train, "block")


def _block_reference(variables, x):
    """BatchNorm (inference), sign, zero-padded 3x3 conv with the sign of the kernel, in float."""
    bn, stats = variables["params"]["block_bn"], variables["batch_stats"]["block_bn"]
    h = (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]
    kernel = variables["params"]["block_binconv"]["kernel"]
    kernel = getattr(kernel, "value", kernel)
    sign = lambda a: jnp.where(a >= 0, 1.0, -1.0)  # noqa: E731  (Larq's sign(0) = 1)
    return jax.lax.conv_general_dilated(sign(h), sign(kernel), (1, 1), "SAME", dimension_numbers=_DN,
                                        precision=jax.lax.Precision.HIGHEST)


def _random_bn(variables, key):
    # away from init's identity statistics, so the test sees BatchNorm's arithmetic
    k1, k2, k3, k4 = jax.random.split(key, 4)
    c = variables["batch_stats"]["block_bn"]["mean"].shape
    params = dict(variables["params"], block_bn={"scale": jax.random.uniform(k1, c, minval=0.5, maxval=1.5),
                                                  "bias": 0.3 * jax.random.normal(k2, c)})
    stats = {"block_bn": {"mean": 0.3 * jax.random.normal(k3, c),
                          "var": jax.random.uniform(k4, c, minval=0.5, maxval=2.0)}}
    return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("kind", ["dense", "improve"])
def test_blocks_match_float_reference(kind):
    cin = 96
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, cin))
    block = _Block(kind=kind)
    variables = _random_bn(block.init(jax.random.key(0), x), jax.random.key(2))
    y = block.apply(variables, x)
    w = _block_reference(variables, x)
    if kind == "dense":
        ref = jnp.concatenate([x, w], axis=-1)
    else:  # larq-zoo: x + tf.pad(w, [[0, 0], [0, 0], [0, 0], [C - 64, 0]])
        ref = x + jnp.pad(w, ((0, 0), (0, 0), (0, 0), (cin - 64, 0)))
    assert y.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_clip_value_and_weights():
    assert meliusnet.CLIP_VALUE == 1.3
    assert set(meliusnet.WEIGHTS["MeliusNet22"]) == {True, False}
    assert meliusnet.MODELS == {"MeliusNet22": MeliusNet22}
