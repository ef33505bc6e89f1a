import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import bnnjax
from bnnjax import optim
from bnnjax.layers import QuantDense, QuantParam

KEY = jax.random.key(0)


def tree():
    return {"dense": {"kernel": QuantParam(jnp.array([0.9, -0.95, 0.2, -1.0])), "bias": jnp.array([0.9, -0.9])},
            "ternary": {"kernel": QuantParam(jnp.array([0.9, 2.0]), precision=2, quantizer="ste_tern")}}


def test_weight_clip_clips_only_binary_kernels():
    params = tree()
    tx = optax.chain(optax.sgd(1.0), bnnjax.weight_clip(1.0))
    grads = jax.tree.map(lambda p: -0.5 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"].value, [1.0, -0.45, 0.7, -0.5])
    np.testing.assert_allclose(new["dense"]["bias"], [1.4, -0.4])  # not a kernel: not clipped
    np.testing.assert_allclose(new["ternary"]["kernel"].value, [1.4, 2.5])  # 2-bit: not a binary kernel
    assert isinstance(new["dense"]["kernel"], QuantParam)


def test_weight_clip_errors():
    with pytest.raises(ValueError, match="positive"):
        bnnjax.weight_clip(0.0)
    tx = bnnjax.weight_clip()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(tree(), tx.init(tree()))


def test_bop_flip_rule_and_momentum():
    w = jnp.array([1.0, 1.0, -1.0, -1.0, 0.3])
    g = jnp.array([2.0, -2.0, 2.0, -2.0, 2.0])
    tx = bnnjax.bop(threshold=0.1, gamma=0.5)
    state = tx.init(w)
    upd, state = tx.update(g, state, w)
    np.testing.assert_allclose(state.momentum, 0.5 * g)  # m = 0 + 0.5 (g - 0)
    # w * m = [1, -1, -1, 1, 0.3] > 0.1 flips entries 0, 3 and 4; the rest become sign(w)
    np.testing.assert_allclose(w + upd, [-1.0, 1.0, -1.0, 1.0, -1.0], rtol=1e-6)  # 0.3 is not ±1: one ulp
    upd2, state2 = tx.update(jnp.zeros(5), state, w + upd)
    np.testing.assert_allclose(state2.momentum, 0.25 * g)
    assert int(state2.count) == 2


def test_bop_accepts_schedules():
    tx = bnnjax.bop(threshold=optax.constant_schedule(0.5), gamma=lambda step: 1.0 / (step + 1))
    w = jnp.array([1.0, 1.0])
    upd, st = tx.update(jnp.array([0.6, 0.4]), tx.init(w), w)
    np.testing.assert_array_equal(w + upd, [-1.0, 1.0])


class TinyBNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = QuantDense(16, input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(x)


def test_tiny_bnn_trained_with_bop_keeps_binary_kernels_and_learns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    model = TinyBNN()
    v = model.init(KEY, x[:2], train=True)
    params, stats = bnnjax.optim.sign_kernels(v["params"]), v["batch_stats"]
    assert set(np.unique(np.asarray(params["QuantDense_0"]["kernel"].value))) == {-1.0, 1.0}
    tx = bnnjax.case_optimizer(bnnjax.bop(threshold=1e-6, gamma=1e-2), optax.adam(1e-2))
    opt = tx.init(params)
    assert not optim.warn_if_unclipped(params, opt)

    @jax.jit
    def step(params, stats, opt):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), upd["batch_stats"], opt, loss

    first = None
    for _ in range(150):
        new, stats, opt, loss = step(params, stats, opt)
        if first is None:
            first = float(loss)
        ratio = float(bnnjax.flip_ratio(params, new))
        assert 0.0 <= ratio <= 1.0
        params = new
    kernel = params["QuantDense_0"]["kernel"].value
    assert set(np.unique(np.asarray(kernel))) <= {-1.0, 1.0}
    logits = model.apply({"params": params, "batch_stats": stats}, x)
    acc = float(np.mean(np.argmax(logits, -1) == y))
    assert acc > 0.9 and float(loss) < first


def test_binary_labels_and_flip_ratio():
    labels = bnnjax.binary_labels(tree())
    assert labels == {"dense": {"kernel": "binary", "bias": "other"}, "ternary": {"kernel": "other"}}
    old = tree()
    new = jax.tree.map(lambda x: x, old)
    new["dense"]["kernel"] = QuantParam(jnp.array([0.9, 0.95, -0.2, -1.0]))
    assert float(bnnjax.flip_ratio(old, new)) == pytest.approx(0.5)
    assert float(bnnjax.flip_ratio({"b": jnp.ones(3)}, {"b": -jnp.ones(3)})) == 0.0


def test_warns_once_when_binary_kernels_are_not_clipped(monkeypatch):
    monkeypatch.setattr(optim, "_warned_unclipped", False)
    params = tree()
    with pytest.warns(UserWarning, match="weight_clip"):
        assert optim.warn_if_unclipped(params, optax.adam(1e-3).init(params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert optim.warn_if_unclipped(params, optax.adam(1e-3).init(params))  # true, but silent the 2nd time
        clipped = optax.chain(optax.adam(1e-3), bnnjax.weight_clip())
        assert not optim.warn_if_unclipped(params, clipped.init(params))
