import functools
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
from bnnjax.layers import FixedDepthwiseConv2D, QuantConv, QuantDense


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


SMALL = Small()  # one model and optimizer object: every state of it hits the same compiled steps
TX = tx()


def new_state(seed=0):
    return train.create_train_state(SMALL, TX, data()[0][:1], seed=seed)


def test_each_compilation_hands_the_compilers_memory_back(monkeypatch):
    """Importing bnnjax.train makes every XLA compilation end with glibc's malloc_trim(0), which returns
    what the compiler freed to the OS."""
    calls = []
    monkeypatch.setattr(train, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    salt = float(np.random.default_rng().random())  # a program no cache holds: one backend compilation
    jax.jit(lambda v: v * salt + 1.0).lower(jnp.ones(7)).compile()
    assert calls and set(calls) == {0}
    calls.clear()
    train._trim_after_compile("/jax/some/other_event", 0.1)
    assert not calls


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
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["35", "42"]  # the last two epochs' (7 steps each)
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
        train.create_train_state(SMALL, optax.adam(1e-3), data()[0][:1])


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
    print("MULTI", json.dumps({"devices": jax.device_count(), "curves": out}))
""")


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """MULTI and GLOBAL_BATCH (below) run in one process with four host devices (one start of python and
    jax for both): their output lines by tag."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", MULTI + GLOBAL_BATCH, os.path.dirname(__file__),
                          str(tmp_path_factory.mktemp("four_devices"))], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return {tag: json.loads(rest) for tag, _, rest in (l.partition(" ") for l in res.stdout.strip().splitlines())
            if tag in ("MULTI", "GLOBAL_BATCH")}


def test_four_devices_match_one_device(four_devices):
    out = four_devices["MULTI"]
    assert out["devices"] == 4
    np.testing.assert_allclose(out["curves"]["4"], out["curves"]["1"], rtol=2e-3)


# --- fit_stream -----------------------------------------------------------------------------------

class TinyImageNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), strides=4)(x)
        x = FixedDepthwiseConv2D()(x)  # a "constants" collection, as QuickNet's blur-pool has
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
        return QuantDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign")(x.reshape((x.shape[0], -1)))


STREAM_MODEL = TinyImageNet()  # one model and optimizer object: every state hits the same compiled steps
STREAM_TX = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), bnnjax.weight_clip())


@functools.lru_cache(maxsize=None)
def _stream_state_on_host():
    return jax.device_get(train.create_train_state(STREAM_MODEL, STREAM_TX, np.zeros((1, 16, 16, 3), np.float32)))


def stream_state():
    """A fresh initial state: numpy leaves, so the donated device copies of one run leave it intact."""
    return _stream_state_on_host()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from test_pipeline import make_image_folder

    from bnnjax import pipeline
    return pipeline.ImageFolder(make_image_folder(tmp_path_factory.mktemp("stream")))


def test_fit_stream_killed_and_resumed_is_bit_identical(tmp_path, image_folder):
    from bnnjax import pipeline

    loader = lambda: pipeline.train_loader(image_folder, 8, image_size=16, seed=3, num_workers=0)
    kw = dict(steps=11, preprocess=pipeline.normalize, eval_data=pipeline.eval_loader(image_folder, 16, image_size=16,
              num_workers=0), eval_every=5, checkpoint_every=4, log_every=2, keep_checkpoints=2, progress=False)
    assert set(stream_state().extra_variables) == {"constants"}
    full, hist_full = train.fit_stream(stream_state(), loader(), workdir=tmp_path / "a", **kw)
    np.testing.assert_array_equal(full.extra_variables["constants"]["FixedDepthwiseConv2D_0"]["kernel"],
                                  stream_state().extra_variables["constants"]["FixedDepthwiseConv2D_0"]["kernel"])
    assert int(full.step) == 11 and [h["step"] for h in hist_full] == [2, 4, 5, 6, 8, 10, 11]
    assert {"test_loss", "test_accuracy"} <= set(hist_full[2]) and "test_loss" not in hist_full[1]
    assert hist_full[0]["learning_rate"] == pytest.approx(1e-2) and hist_full[0]["skipped_images"] == 0
    # killed after step 6 (5 steps of epoch 2 done): resumes from the step-4 checkpoint, mid-epoch
    train.fit_stream(stream_state(), loader(), workdir=tmp_path / "b", stop_after_step=6, **kw)
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 7, "train_lo')  # a line cut mid-write by the kill
    resumed, hist = train.fit_stream(stream_state(), loader(), workdir=tmp_path / "b", **kw)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["step"] for h in hist] == [h["step"] for h in hist_full]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in hist_full]
    assert [h.get("test_loss") for h in hist] == [h.get("test_loss") for h in hist_full]
    logged = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 5, 6, 8, 10, 11]
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["11", "8"]
    it = loader()
    restored, step = train.restore_checkpoint(tmp_path / "b", stream_state(), it)
    assert step == 11 and it.get_state()["batches"] == 11
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert train.restore_checkpoint(tmp_path / "none", stream_state()) is None
    with pytest.raises(ValueError, match=r"(?s)checkpoints/11: cannot restore the checkpoint.*different model"):
        train.restore_checkpoint(tmp_path / "b", new_state(), loader())


def test_fit_stream_and_fit_reject_each_others_checkpoints(tmp_path, image_folder):
    from bnnjax import pipeline

    loader = pipeline.train_loader(image_folder, 8, image_size=16, num_workers=0)
    _write_old_checkpoint(tmp_path / "old", stream_state(), 1)
    with pytest.raises(ValueError, match=r"checkpoint\.msgpack is an in-memory fit checkpoint"):
        train.fit_stream(stream_state(), loader, steps=2, workdir=tmp_path / "old", progress=False)
    with pytest.raises(TypeError, match="needs a grain iterator"):
        train.fit_stream(stream_state(), iter([]), steps=2, workdir=tmp_path / "x", progress=False)
    train.fit_stream(new_state(), _image_batches(), steps=1, workdir=tmp_path / "new", progress=False)
    with pytest.raises(ValueError, match=r"checkpoints/1: this checkpoint is of a fit_stream \(an input stream\) run"):
        train.fit(new_state(), data(), epochs=1, batch_size=32, workdir=tmp_path / "new", progress=False)
    train.fit(new_state(), data(), epochs=1, batch_size=32, steps_per_call=4, workdir=tmp_path / "arrays",
              progress=False)
    with pytest.raises(ValueError, match=r"this checkpoint is of a fit \(in-memory arrays\) run"):
        train.fit_stream(new_state(), _image_batches(), steps=2, workdir=tmp_path / "arrays", progress=False)
    batches = iter([{"image": np.zeros((8, 16, 16, 3), np.uint8), "label": np.zeros(8, np.int32)}] * 3)
    with pytest.raises(RuntimeError, match="ended after 3 steps of 4"):
        train.fit_stream(stream_state(), batches, steps=4, preprocess=pipeline.normalize, progress=False)


def test_masked_eval_step_counts_only_real_examples():
    from bnnjax import pipeline

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), rng.integers(0, 4, 16).astype(np.int32)
    state = jax.device_put(stream_state())
    eval_step = train._compiled("cross_entropy", pipeline.normalize)[1]  # fit_stream's, already compiled
    masked = eval_step(state, x, y, np.arange(16) < 10)
    variables = {"params": state.params, "batch_stats": state.batch_stats, **state.extra_variables}
    logits = jax.jit(STREAM_MODEL.apply)(variables, pipeline.normalize(x[:10]))
    assert int(masked["count"]) == 10 and int(masked["correct"]) == int(np.sum(np.argmax(logits, -1) == y[:10]))
    expected = float(train.softmax_cross_entropy(logits, y[:10])) * 10
    assert float(masked["loss"]) == pytest.approx(expected, rel=1e-4)


def _write_old_checkpoint(workdir, state, epoch, extra_variables=True):
    """bnnjax 0.1's fit checkpoint: one msgpack file of ``{"epoch", "state"}``."""
    from flax import serialization

    old = serialization.to_state_dict(jax.device_get(state))
    if not extra_variables:
        del old["extra_variables"]  # the TrainState fields of still earlier versions
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "checkpoint.msgpack").write_bytes(serialization.msgpack_serialize({"epoch": epoch, "state": old}))


def _image_batches():
    """A grain iterator of tiny image batches for the Small model (6x6x1)."""
    import grain

    x, y = data(64)
    return iter(grain.MapDataset.source([{"image": x[i], "label": y[i]} for i in range(64)]).repeat()
                .batch(8, batch_fn=lambda b: {k: np.stack([e[k] for e in b]) for k in b[0]}).to_iter_dataset())


@pytest.fixture(scope="module")
def three_and_two_epochs(tmp_path_factory):
    """One run's state after 3 epochs and after 2, shared by both old-checkpoint tests."""
    x, y = data()
    kw = dict(epochs=3, batch_size=32, steps_per_call=4, progress=False)
    full, _ = train.fit(new_state(), (x, y), workdir=tmp_path_factory.mktemp("full"), **kw)
    after2, _ = train.fit(new_state(), (x, y), **{**kw, "epochs": 2})
    return jax.device_get(full), jax.device_get(after2)


@pytest.mark.parametrize("extra_variables", [True, False])
def test_old_msgpack_checkpoints_are_converted_and_resumed(tmp_path, extra_variables, three_and_two_epochs):
    x, y = data()
    kw = dict(epochs=3, batch_size=32, steps_per_call=4, progress=False)
    full, after2 = three_and_two_epochs
    _write_old_checkpoint(tmp_path / "old", after2, 2, extra_variables)
    resumed, hist = train.fit(new_state(), (x, y), workdir=tmp_path / "old", **kw)
    assert [h["epoch"] for h in hist] == [3] and int(resumed.step) == 21
    assert sorted(os.listdir(tmp_path / "old" / "checkpoints")) == ["14", "21"]  # converted at epoch 2's end
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


GLOBAL_BATCH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_pipeline import make_image_folder
    from test_train import stream_state
    from bnnjax import pipeline, train
    src = pipeline.ImageFolder(make_image_folder(Path(sys.argv[2])))
    curves = {}
    for n in (1, 4):  # fit_stream on one device and on a mesh of four: same loss curve
        st, hist = train.fit_stream(stream_state(), pipeline.train_loader(src, 8, image_size=16, num_workers=0),
                                    steps=4, preprocess=pipeline.normalize, steps_per_call=2, log_every=2,
                                    eval_data=pipeline.eval_loader(src, 16, image_size=16, num_workers=0),
                                    eval_every=2, mesh=train.data_mesh(jax.devices()[:n]), progress=False)
        curves[n] = [h["train_loss"] for h in hist] + [h["test_loss"] for h in hist]
    mesh = train.data_mesh()
    x = np.arange(2 * 8 * 3, dtype=np.uint8).reshape(2, 8, 3)
    g = pipeline.global_batch({"x": x}, mesh, batch_axis=1)["x"]
    shards = sorted((s.index[1].start, s.data.shape) for s in g.addressable_shards)
    try:
        pipeline.global_batch(np.zeros((6, 2)), mesh)
        err = None
    except ValueError as e:
        err = str(e)
    print("GLOBAL_BATCH", json.dumps({"devices": jax.device_count(), "equal": bool(np.array_equal(np.asarray(g), x)),
                      "shards": [[a, list(b)] for a, b in shards], "error": err, "curves": curves}))
""")


def test_stream_batches_split_over_four_devices(four_devices):
    out = four_devices["GLOBAL_BATCH"]
    assert out["devices"] == 4 and out["equal"]
    np.testing.assert_allclose(out["curves"]["4"], out["curves"]["1"], rtol=2e-3)
    assert out["shards"] == [[0, [2, 2, 3]], [2, [2, 2, 3]], [4, [2, 2, 3]], [6, [2, 2, 3]]]
    assert "host batch of 6 does not split over this host's 4 devices" in out["error"]


# --- NNX models -------------------------------------------------------------------------------------

from flax import nnx  # noqa: E402

from bnnjax import nnx as bnx  # noqa: E402


class SmallNNX(nnx.Module):
    """Small in NNX: a binary conv, BatchNorm, dropout (an RNG stream) and a binary dense layer."""

    def __init__(self, rngs):
        self.conv = bnx.QuantConv(1, 8, (3, 3), kernel_quantizer="ste_sign", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.dense = bnx.QuantLinear(288, 2, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                     use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        x = self.dropout(self.bn1(self.conv(x)).reshape((x.shape[0], -1)))
        return self.bn2(self.dense(x))


def test_nnx_seed000_trains_to_the_linen_loss_curve_bit_identically():
    """The seed-000 model written in NNX, started from the linen model's variables, follows the linen
    run's loss curve exactly and ends with the same variables."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (160, 28, 28, 1)).astype(np.float32)
    y = (x[:, :14].mean(axis=(1, 2, 3)) > x[:, 14:].mean(axis=(1, 2, 3))).astype(np.int32)
    kw = dict(epochs=2, batch_size=32, steps_per_call=5, progress=False)
    lin_model = bnnjax.models.LarqTutorialCNN()
    lin = train.create_train_state(lin_model, TX, x[:1])
    lin_state, lin_hist = train.fit(lin, (x, y), (x[:64], y[:64]), **kw)
    variables = {"params": lin.params, "batch_stats": lin.batch_stats}
    model = bnx.models.load_linen_variables(bnx.models.LarqTutorialCNN(rngs=nnx.Rngs(0)), lin_model, variables, x[:1])
    model, hist = train.fit(model, (x, y), (x[:64], y[:64]), tx=TX, **kw)
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in lin_hist]
    assert [h["test_loss"] for h in hist] == [h["test_loss"] for h in lin_hist]
    np.testing.assert_array_equal(model.conv2.kernel.get_value(), lin_state.params["QuantConv_1"]["kernel"].value)
    np.testing.assert_array_equal(model.bn5.mean.get_value(), lin_state.batch_stats["BatchNorm_4"]["mean"])


def test_nnx_fit_learns_resumes_bit_identically_and_refuses_linen_checkpoints(tmp_path):
    x, y = data()
    kw = dict(epochs=3, batch_size=32, steps_per_call=4, progress=False)
    state = lambda: train.create_train_state(SmallNNX(nnx.Rngs(0)), TX)
    full, hist_full = train.fit(state(), (x, y), (x, y), workdir=tmp_path / "a", **kw)
    assert full.api == "nnx" and hist_full[-1]["train_loss"] < hist_full[0]["train_loss"]
    train.fit(state(), (x, y), (x, y), workdir=tmp_path / "b", stop_after_epoch=1, **kw)
    resumed, hist = train.fit(state(), (x, y), (x, y), workdir=tmp_path / "b", **kw)
    raw = lambda a: np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(raw(a), raw(b))
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in hist_full]
    model = train.trained_model(resumed)
    assert isinstance(model, SmallNNX) and train.evaluate(model, x, y)["accuracy"] == pytest.approx(
        hist_full[-1]["test_accuracy"])
    with pytest.raises(ValueError, match=r"checkpoint is of a Flax NNX model \(SmallNNX\).*Flax linen model \(Small\)"):
        train.fit(new_state(), (x, y), workdir=tmp_path / "a", **kw)
    train.fit(new_state(), (x, y), workdir=tmp_path / "linen", **{**kw, "epochs": 1})
    with pytest.raises(ValueError, match=r"checkpoint is of a Flax linen model \(Small\).*Flax NNX model \(SmallNNX\)"):
        train.fit(state(), (x, y), workdir=tmp_path / "linen", **kw)


def test_nnx_fit_stream_trains_an_nnx_model_in_place(tmp_path):
    model = SmallNNX(nnx.Rngs(0))
    before = np.asarray(model.dense.kernel.get_value()).copy()
    out, hist = train.fit_stream(model, _image_batches(), steps=6, log_every=3, workdir=tmp_path, tx=TX,
                                 progress=False)
    assert out is model and [h["step"] for h in hist] == [3, 6]
    assert not np.array_equal(before, model.dense.kernel.get_value())
    assert float(jnp.abs(model.dense.kernel.get_value()).max()) <= 1.0  # clipped
    with pytest.raises(TypeError, match="needs its optimizer"):
        train.fit_stream(model, _image_batches(), steps=1, progress=False)
