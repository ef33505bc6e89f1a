import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import bnnjax
from bnnjax import train
from bnnjax.layers import QuantConv, QuantDense


class Small(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = QuantConv(8, (3, 3), kernel_quantizer="ste_sign", use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.1, deterministic=not train)(x.reshape((x.shape[0], -1)))
        x = QuantDense(2, input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False)(x)
        return nn.BatchNorm(use_running_average=not train)(x)


def data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32)
    return x, (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)


def tx():
    return optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=3e-3), bnnjax.weight_clip())


def new_state(seed=0):
    return train.create_train_state(Small(), tx(), data()[0][:1], seed=seed)


def test_losses_match_their_formulas():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    labels = jnp.array([0, 1])
    t = np.array([[1, -1, -1], [-1, 1, -1]])
    expected = np.mean(np.sum(np.maximum(0, 1 - t * np.asarray(logits)) ** 2, -1))
    assert float(train.squared_hinge(logits, labels)) == pytest.approx(expected)
    lp = jax.nn.log_softmax(logits)
    assert float(train.softmax_cross_entropy(logits, labels)) == pytest.approx(-(lp[0, 0] + lp[1, 1]) / 2)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        train.make_train_step("hinge")


def test_fit_learns_logs_and_checkpoints(tmp_path):
    x, y = data()
    xt, yt = data(100, seed=1)
    rows = []
    state, hist = train.fit(new_state(), (x, y), (xt, yt), epochs=6, batch_size=32, workdir=tmp_path,
                            steps_per_call=4, progress=False, log_fn=rows.append)
    assert len(hist) == 6 and rows == hist
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == hist
    keys = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds",
            "images_per_second", "flip_ratio", "learning_rate"}
    assert keys <= set(lines[0])
    assert lines[0]["learning_rate"] == pytest.approx(3e-3)
    assert int(state.step) == 6 * 7  # 6 full batches + the partial one, every epoch
    assert hist[-1]["test_accuracy"] > 0.8 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert 0 <= hist[0]["flip_ratio"] <= 1
    assert (tmp_path / "checkpoint.msgpack").exists()
    ev = train.evaluate(state, xt, yt, batch_size=33)  # partial batches give the same answer
    assert ev["accuracy"] == pytest.approx(hist[-1]["test_accuracy"])


def test_killed_run_resumes_bit_identically(tmp_path):
    x, y = data()
    kw = dict(epochs=3, batch_size=32, steps_per_call=4, progress=False)
    full, hist_full = train.fit(new_state(), (x, y), (x, y), workdir=tmp_path / "a", **kw)
    train.fit(new_state(), (x, y), (x, y), workdir=tmp_path / "b", stop_after_epoch=1, **kw)  # "killed"
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a line cut mid-write by the kill
    resumed, hist = train.fit(new_state(seed=0), (x, y), (x, y), workdir=tmp_path / "b", **kw)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in hist_full]
    assert [json.loads(l)["epoch"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="checkpoint.msgpack.*corrupt"):
        train.fit(new_state(), data(), epochs=1, batch_size=32, workdir=tmp_path, progress=False)


def test_unclipped_binary_kernels_warn_once(monkeypatch):
    monkeypatch.setattr(bnnjax.optim, "_warned_unclipped", False)
    with pytest.warns(UserWarning, match="weight clipping"):
        train.create_train_state(Small(), optax.adam(1e-3), data()[0][:1])


MULTI = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_train import data, new_state
    from bnnjax import train
    x, y = data(256)
    out = {}
    for n in (1, 4):
        mesh = train.data_mesh(jax.devices()[:n])
        st, hist = train.fit(new_state(), (x, y), (x, y), epochs=3, batch_size=64, steps_per_call=2,
                             progress=False, mesh=mesh)
        out[n] = [h["train_loss"] for h in hist] + [h["test_loss"] for h in hist]
    print(json.dumps({"devices": jax.device_count(), "curves": out}))
""")


def test_four_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", MULTI, os.path.dirname(__file__)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    np.testing.assert_allclose(out["curves"]["4"], out["curves"]["1"], rtol=2e-3)
