"""experiments/zoo_eval.py and zoo_train.py on a small generated ImageFolder: JSON results, training recipes,
resume, evaluation of the trained variables (float, packed, over two devices), error lines."""

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import bnnjax
from bnnjax import zoo

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
zoo_eval = importlib.import_module("zoo_eval")
zoo_train = importlib.import_module("zoo_train")

TINY = dict(section_blocks=(1, 1), section_filters=(16, 32))  # a QuickNet small enough to train here


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """4 classes x 6 images (40x50, JPEG and PNG) whose class shows in one channel's brightness."""
    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    for c in range(4):
        d = root / f"n{c + 1:08d}"
        d.mkdir()
        for i in range(6):
            a = rng.integers(0, 136, (40, 50, 3))
            a[..., c % 3] += 60 * (1 + c // 3)
            Image.fromarray(a.astype(np.uint8)).save(d / f"img{i}.{'png' if i % 2 else 'JPEG'}")
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """zoo_train's QuickNet recipe on a tiny QuickNet: killed after step 6 (checkpoint at 4), then resumed to 16."""
    workdir = tmp_path_factory.mktemp("train")
    cfg = zoo_train.Config(model="QuickNet", data_dir=str(folder), val_dir=str(folder), image_size=32, batch_size=8,
                           steps=16, warmup_epochs=0, log_every=1, checkpoint_every=4, eval_every=8, workers=0,
                           progress=False, **TINY)
    first, second = [], []
    killed = zoo_train.train_and_evaluate(cfg, str(workdir), stop_after_step=6, print_fn=first.append)
    wrote_variables_when_killed = (workdir / "variables.msgpack").exists()
    result = zoo_train.train_and_evaluate(cfg, str(workdir), print_fn=second.append)
    return dict(workdir=workdir, killed=killed, result=result, wrote=wrote_variables_when_killed,
                first=[json.loads(x) for x in first], second=[json.loads(x) for x in second])


def test_train_loss_goes_down_and_the_run_resumes(trained):
    killed, result, workdir = trained["killed"], trained["result"], trained["workdir"]
    assert killed["stopped"] is True and killed["steps"] == 6 and not trained["wrote"]
    assert result["steps"] == 16 and "stopped" not in result
    assert result["recipe"] == "larq-zoo sota_experiments.TrainQuickNet" and result["num_classes"] == 4
    assert result["epochs"] == pytest.approx(16 / 3, abs=1e-3)  # 24 images // batch 8 = 3 steps per epoch
    assert json.loads((workdir / "result.json").read_text()) == result
    # the second run resumed from the step-4 checkpoint: it redid steps 5-6 and logged 5..16
    assert [r["step"] for r in trained["second"] if "step" in r] == list(range(5, 17))
    log = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 17))
    losses = [r["train_loss"] for r in log]
    assert np.mean(losses[:8]) > np.mean(losses[8:])
    assert [r["step"] for r in log if "test_accuracy" in r] == [8, 16]
    # the recipe's schedules: binary Adam's cosine decay from 1e-2 (no warm-up here) reaches 0 at the end
    assert log[0]["learning_rate"] == pytest.approx(1e-2) and log[-1]["learning_rate"] == pytest.approx(0, abs=1e-7)
    header = trained["first"][0]["config"]
    assert header["steps_per_epoch"] == 3 and header["train_images"] == 24 and header["batch_size"] == 8


def test_eval_of_the_trained_variables(trained, folder):
    workdir, result = trained["workdir"], trained["result"]
    cfg = zoo_eval.Config(model="QuickNet", weights=str(workdir / "variables.msgpack"), data_dir=str(folder),
                          image_size=32, batch_size=8, workers=0, progress=False)
    lines = []
    ev = zoo_eval.evaluate(cfg, print_fn=lines.append)
    assert json.loads(lines[-1]) == ev
    assert {"model", "top1", "top5", "images", "images_per_second"} <= set(ev)
    assert ev["images"] == 24 and ev["model"] == "QuickNet" and ev["images_per_second"] > 0
    # the same images, preprocessing and variables as fit_stream's last evaluation
    assert ev["top1"] == result["test_accuracy"]
    assert ev["top5"] == 1.0  # 4 classes: the top 4 hold every label
    packed = zoo_eval.evaluate(dataclasses.replace(cfg, packed=True), print_fn=lines.append)
    assert (packed["top1"], packed["top5"], packed["images"]) == (ev["top1"], ev["top5"], 24) and packed["packed"]
    limited = zoo_eval.evaluate(dataclasses.replace(cfg, limit=10), print_fn=lines.append)
    assert limited["images"] == 10


def test_eval_cli_over_two_devices(trained, folder):
    # a fresh process with two host devices: the batch is split over both, the numbers do not change
    weights = str(trained["workdir"] / "variables.msgpack")
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(EXPERIMENTS / "zoo_eval.py"), "--model", "QuickNet", "--weights", weights,
                          "--data-dir", str(folder), "--image-size", "32", "--batch-size", "8", "--workers", "0",
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["devices"] == 2 and row["images"] == 24 and row["top1"] == trained["result"]["test_accuracy"]


def test_eval_random_weights_cli(folder, capsys):
    result = zoo_eval.main(["--model", "QuickNet", "--weights", "none", "--data-dir", str(folder), "--image-size", "32",
                            "--batch-size", "8", "--limit", "13", "--workers", "0", "--no-progress"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row == result and row["weights"] == "none" and row["images"] == 13
    # against a direct computation: larq-zoo's crop and resize rounded to uint8, the top 5 of the logits
    # (random weights saturate the softmax: its float32 zeros would tie, and top_k would pick classes 0-4)
    model, variables = zoo.load("QuickNet", None, input_shape=(32, 32, 3), classifier_activation=None)
    source = bnnjax.pipeline.ImageFolder(folder)
    crop = lambda i: bnnjax.pipeline.center_crop_resize(bnnjax.pipeline.decode_image(source[i]["image"]), 32)  # noqa
    images = np.stack([np.clip(np.rint(crop(i)), 0, 255).astype(np.uint8) for i in range(13)])
    logits = jax.jit(model.apply)(variables, bnnjax.pipeline.normalize(images))
    top5 = np.asarray(jax.lax.top_k(logits, 5)[1])
    labels = np.asarray([source[i]["label"] for i in range(13)])
    assert row["top1"] == pytest.approx(np.mean(top5[:, 0] == labels))
    assert row["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))


def test_subset_folders_are_mapped_to_imagenet_labels():
    index = {str(i): [f"n{i * 17:08d}", f"class_{i}"] for i in range(1000)}

    class Folder:
        classes = ["n00000017", "n00000051", "n00016983"]

    np.testing.assert_array_equal(zoo_eval.imagenet_labels(Folder(), 1000, index), [1, 3, 999])
    view = zoo_eval.View([{"image": b"", "label": 2}, {"image": b"", "label": 0}], limit=1,
                         label_map=np.array([1, 3, 999]))
    assert len(view) == 1 and view[0]["label"] == 999
    Folder.classes = [f"n{i * 17:08d}" for i in range(1000)]
    assert zoo_eval.imagenet_labels(Folder(), 1000, index) is None  # all of ImageNet: labels are already right
    Folder.classes = ["n00000017", "cats"]
    with pytest.raises(ValueError, match="not ImageNet wnids"):
        zoo_eval.imagenet_labels(Folder(), 1000, index)


def _error_line(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_errors_are_one_line_and_exit_2(folder, tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert "no such directory" in _error_line(capsys, zoo_eval.main, ["--data-dir", missing, "--weights", "none"])
    assert "unknown zoo model" in _error_line(capsys, zoo_eval.main, ["--model", "QuickNot", "--data-dir", str(folder)])
    assert "multiple of" in _error_line(capsys, zoo_eval.main, ["--data-dir", str(folder), "--batch-size", "0"])
    assert "no such directory" in _error_line(capsys, zoo_train.main, ["--data-dir", missing, "--workdir", missing])
    assert "QuickNet family" in _error_line(capsys, zoo_train.main, ["--model", "BiRealNet", "--data-dir", str(folder),
                                                                     "--section-filters", "8,16", "--workdir", missing])
    assert "recipe" in _error_line(capsys, zoo_train.main, ["--model", "MeliusNet22", "--recipe", "larq-zoo",
                                                            "--data-dir", str(folder), "--workdir", missing])


# --- recipes ---------------------------------------------------------------------------------------

# larq_zoo.training.learning_schedules.CosineDecayWithWarmup(max_learning_rate=1e-2, warmup_steps=15,
# decay_steps=100)(step), computed once with larq-zoo 2.4.0 / TensorFlow 2.19.1
LARQ_ZOO_COSINE = {0: 0.0, 1: 0.0007142862305045128, 7: 0.004999999888241291, 14: 0.009999999776482582,
                   15: 0.009999999776482582, 16: 0.009996503591537476, 50: 0.0062940954230725765,
                   83: 0.0008688062080182135, 84: 0.0007663786527700722, 99: 0.0, 120: 0.0}


def test_cosine_decay_with_warmup_is_larq_zoos():
    schedule = zoo_train.cosine_decay_with_warmup(1e-2, 15, 100)
    for step, want in LARQ_ZOO_COSINE.items():
        assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


# larq-zoo's per-epoch learning_rate_schedule methods (basic_experiments.py), as written there
def _larq_zoo_rates():
    def steps(lr, factor, learning_steps):
        def f(epoch):
            rate = lr
            for s in learning_steps:
                if epoch < s:
                    return rate
                rate *= factor
            return rate
        return f

    def xnor(epoch, lr=1e-3):
        for bound, factor in zip((19, 30, 44, 53, 66, 76, 86), (1, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001)):
            if epoch < bound:
                return lr * factor
        return lr * 0.001 * 0.1

    def dorefa(epoch, lr=2e-4):
        if epoch < 60:
            return lr
        if epoch < 75:
            return lr * 0.2
        if epoch < 82:
            return lr * 0.2 * 0.2
        return lr * 0.2 * 0.2 * 0.1 ** ((epoch - 82) // 2 + 1)

    return {"BinaryResNetE18": steps(0.004, 0.3, (70, 90, 110)), "BinaryDenseNet28": steps(4e-3, 0.1, (100, 110)),
            "BinaryDenseNet37Dilated": steps(4e-3, 0.1, (60, 70)), "BinaryDenseNet45": steps(0.008, 0.1, (80, 100)),
            "XNORNet": xnor, "DoReFaNet": dorefa, "BinaryAlexNet": lambda epoch: 1e-2 * 0.5 ** (epoch // 10)}


def test_per_epoch_schedules_are_larq_zoos():
    spe = 7
    for name, rate in _larq_zoo_rates().items():
        r = zoo_train.RECIPES[name]
        schedule = jax.jit(r.schedule(r.learning_rate, 0, spe, r.epochs * spe))
        for epoch in range(r.epochs):
            for step in (epoch * spe, epoch * spe + spe - 1):
                assert float(schedule(step)) == pytest.approx(rate(epoch), rel=1e-5), (name, epoch)
    birealnet = zoo_train.RECIPES["BiRealNet"]
    linear = birealnet.schedule(5e-3, 0, 10, 3000)
    assert [float(linear(s)) for s in (0, 1500, 3000, 4000)] == pytest.approx([5e-3, 2.5e-3, 0, 0])


def _tiny_params():
    model = zoo.QuickNet(num_classes=3, classifier_activation=None, **TINY)
    return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


def test_quicknet_optimizer_is_larqs_case_optimizer():
    # Adam on binary kernels, Keras' SGD with momentum 0.9 on the rest, binary kernels clipped to 1.25
    r = zoo_train.RECIPES["QuickNet"]
    tx = zoo_train.make_optimizer(r, 1e-2, 0.1, 0, 10, 100, zoo.quicknet.CLIP_VALUE)
    params = _tiny_params()
    state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    labels = jax.tree.leaves(bnnjax.binary_labels(params))
    for step in range(2):
        updates, state = tx.update(ones, state, params)
        leaves = jax.tree.leaves(updates)
        binary = [u for u, lab in zip(leaves, labels) if lab == "binary"]
        other = [u for u, lab in zip(leaves, labels) if lab == "other"]
        assert binary and other
        lr = float(zoo_train.cosine_decay_with_warmup(1e-2, 0, 100)(step))
        sgd = float(zoo_train.cosine_decay_with_warmup(0.1, 0, 100)(step))
        velocity = -sgd if step == 0 else -sgd - 0.9 * float(zoo_train.cosine_decay_with_warmup(0.1, 0, 100)(0))
        for u in other:
            np.testing.assert_allclose(u, velocity, rtol=1e-5)
        old = jax.tree.leaves(params)
        for u, p, lab in zip(leaves, old, labels):
            if lab == "binary":  # Adam's first steps with a constant gradient: -lr, then clipped
                np.testing.assert_allclose(u, np.clip(p - lr, -1.25, 1.25) - p, rtol=1e-4, atol=1e-7)
        params = optax.apply_updates(params, updates)


def test_xnornet_l2_and_recipe_choice():
    r = zoo_train.RECIPES["XNORNet"]
    tx = zoo_train.make_optimizer(r, 1e-3, None, 0, 10, 100, 1.0)
    params = {"conv": {"kernel": jnp.full((2, 2), 100.0)}, "bn": {"scale": jnp.full((2,), 100.0)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # only the kernel's gradient is 2 * 5e-7 * w: Adam's first step turns any nonzero gradient into -lr
    np.testing.assert_allclose(updates["conv"]["kernel"], -1e-3, rtol=1e-3)
    np.testing.assert_array_equal(updates["bn"]["scale"], 0.0)
    cfg = zoo_train.Config
    assert zoo_train.recipe_for(cfg(model="MeliusNet22")) is zoo_train.GENERIC
    assert zoo_train.recipe_for(cfg(model="QuickNet", recipe="generic")) is zoo_train.GENERIC
    assert zoo_train.recipe_for(cfg(model="BiRealNet")).source == "larq-zoo basic_experiments.TrainBiRealNet"
    assert set(zoo_train.RECIPES) | {"MeliusNet22", "RealToBinaryNet"} == set(zoo.names())
    assert math.isclose(zoo_train.RECIPES["QuickNetLarge"].other_learning_rate, 0.1)
