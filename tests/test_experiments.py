import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bnnjax import experiment, optim

sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))


def script(name):
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny learnable stand-ins for MNIST and CIFAR-10 in Keras' npz layout."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, shape in (("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))):
        y = rng.integers(0, 10, 160)
        x = rng.integers(0, 60, (160,) + shape)
        x[np.arange(160), :, y * 2 % shape[1]] += 180  # a class-dependent bright column
        x = x.clip(0, 255).astype(np.uint8)
        np.savez(d / f"{name}.npz", x_train=x[:128], y_train=y[:128], x_test=x[128:], y_test=y[128:])
    return str(d)


# Most of this file's time is XLA compiling each run's init / train / eval steps and, with export, the packed
# model's verify / StableHLO / deployed programs: so each script runs once per API plus the variants whose
# code differs, on 64 train / 32 test examples, and exports (predictions_identical) once per API.
SMALL = {"train_examples": 64, "test_examples": 32}


def check(result, workdir, epochs, experiment_name):
    assert {"experiment", "dataset", "epochs", "test_accuracy", "seconds"} <= set(result)
    assert result["experiment"] == experiment_name and result["epochs"] == epochs
    assert 0.0 <= result["test_accuracy"] <= 1.0
    log = [json.loads(line) for line in (Path(workdir) / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    assert (Path(workdir) / "checkpoints").is_dir()
    assert json.loads((Path(workdir) / "result.json").read_text()) == result


def test_larq_tutorial_with_export(data_dir, tmp_path):
    m = script("larq_tutorial")
    cfg = m.Config(data_dir=data_dir, epochs=1, export=True, progress=False, **SMALL)
    r = m.train_and_evaluate(cfg, str(tmp_path))
    check(r, tmp_path, 1, "larq_tutorial")
    assert r["predictions_identical"] is True and r["packed_variables_bytes"] <= 16 * 1024
    assert (tmp_path / "model.stablehlo").stat().st_size == r["packed_file_bytes"]


def test_larq_report_warns_that_it_trains_unclipped(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(optim, "_warned_unclipped", False)
    m = script("larq_report")
    with pytest.warns(UserWarning, match="weight clipping"):
        r = m.train_and_evaluate(m.Config(data_dir=data_dir, epochs=1, progress=False, **SMALL), str(tmp_path))
    check(r, tmp_path, 1, "larq_report")
    assert r["input_scale"] == "[0, 1]"


# the stochastic mode (code as the deterministic one's but for the quantizer's name) trains and exports in
# the NNX case below; dropout's export (skipped) is checked by binarynet_mlp
@pytest.mark.parametrize("mode,export", [("float", False), ("deterministic", True)])
def test_binaryconnect_modes(data_dir, tmp_path, mode, export):
    m = script("binaryconnect_mlp")
    cfg = m.Config(data_dir=data_dir, mode=mode, hidden=(32, 32), epochs=1, batch_size=32, progress=False,
                   export=export, **SMALL)
    r = m.train_and_evaluate(cfg, str(tmp_path))
    check(r, tmp_path, 1, "binaryconnect_mlp")
    assert r["mode"] == mode
    if export:
        assert r["predictions_identical"] is True
    else:
        assert "predictions_identical" not in r


def test_binarynet_mlp_squared_hinge_and_export(data_dir, tmp_path):
    m = script("binarynet_mlp")
    # 64 examples: one batch per epoch (128 with batch 100 compiled the train step twice, for the partial batch)
    cfg = m.Config(data_dir=data_dir, hidden=(32, 32), epochs=2, export=True, progress=False, **SMALL)
    r = m.train_and_evaluate(cfg, str(tmp_path))
    check(r, tmp_path, 2, "binarynet_mlp")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[1]["learning_rate"] < log[0]["learning_rate"]  # exponential decay per epoch
    assert r["predictions_identical"] is True


def test_xnornet(data_dir, tmp_path):
    # 32x32x3 inputs here; the NNX case below runs (and exports) it on 28x28x1
    m = script("xnornet")
    cfg = m.Config(dataset="cifar10", data_dir=data_dir, widths=(8, 16), dense=16, epochs=1, progress=False,
                   export=True, **SMALL)
    r = m.train_and_evaluate(cfg, str(tmp_path))
    check(r, tmp_path, 1, "xnornet")
    assert r["predictions_identical"] is True


def test_abcnet_convert_finetune_sweep_and_scratch(data_dir, tmp_path, capsys):
    m = script("abcnet")
    cfg = m.Config(data_dir=data_dir, float_epochs=1, epochs=1, sweep=True, sweep_bases=(1, 3), batch_size=32,
                   progress=False, **SMALL)
    r = m.train_and_evaluate(cfg, str(tmp_path))
    assert {(s["num_weight_bases"], s["num_act_bases"]) for s in r["sweep"]} == {(1, 1), (1, 3), (3, 1), (3, 3)}
    assert "| M=3 |" in capsys.readouterr().out
    check(json.loads((tmp_path / "M3_N3" / "result.json").read_text()), tmp_path / "M3_N3", 1, "abcnet_finetune")


def test_abcnet_from_scratch_exports(data_dir, tmp_path):
    m = script("abcnet")
    cfg = m.Config(data_dir=data_dir, epochs=1, num_weight_bases=2, num_act_bases=2, batch_size=32, progress=False,
                   from_scratch=True, export=True, **SMALL)
    scratch = m.train_and_evaluate(cfg, str(tmp_path))
    check(scratch, tmp_path / "scratch", 1, "abcnet_scratch")
    assert scratch["predictions_identical"] is True and (tmp_path / "scratch" / "model.stablehlo").exists()


# Adam exports here; Bop's (binary kernels from the start) is exported by the NNX case
@pytest.mark.parametrize("optimizer,export", [("adam", True), ("bop", False)])
def test_birealnet(data_dir, tmp_path, optimizer, export):
    m = script("birealnet")
    cfg = m.Config(data_dir=data_dir, stage_sizes=(1, 1), width=8, optimizer=optimizer, epochs=1, batch_size=32,
                   progress=False, bop_gamma=1e-2, export=export, **SMALL)
    r = m.train_and_evaluate(cfg, str(tmp_path))
    check(r, tmp_path, 1, "birealnet")
    assert r["optimizer"] == optimizer
    if export:
        assert r["predictions_identical"] is True
    else:
        assert "predictions_identical" not in r
    if optimizer == "bop":
        log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
        assert log["flip_ratio"] > 0


def test_cli_parses_config_flags(tmp_path):
    m = script("binaryconnect_mlp")
    seen = {}
    experiment.cli(m.Config, lambda cfg, wd: seen.update(cfg=cfg, wd=wd),
                   argv=["--hidden", "16,8", "--mode", "stochastic", "--no-progress", "--epochs", "3",
                         "--workdir", str(tmp_path)])
    assert seen["cfg"].hidden == (16, 8) and seen["cfg"].mode == "stochastic" and seen["cfg"].progress is False
    assert seen["cfg"].epochs == 3 and seen["wd"] == str(tmp_path)


def test_plot_renders_png(tmp_path):
    plot = script("plot")
    log = tmp_path / "a" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5 + e / 10,
                                       "test_loss": 1.2 / e, "test_accuracy": 0.4 + e / 10}) + "\n" for e in (1, 2, 3)))
    out = plot.plot([log], tmp_path / "c.png")
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plot.plot([tmp_path / "empty.jsonl"], tmp_path / "d.png")


def test_cli_prints_data_errors_as_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    from test_download import dead_url

    from bnnjax import _download, datasets

    url = dead_url()
    monkeypatch.setenv("BNNJAX_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BNNJAX_DATASET_MIRROR", url)
    monkeypatch.setattr(_download, "_BACKOFF_S", 0.0)
    monkeypatch.setattr(datasets, "_try_tfds", lambda *a: (None, "tensorflow-datasets (stubbed out)"))
    m = script("larq_tutorial")
    with pytest.raises(SystemExit) as e:
        experiment.cli(m.Config, m.train_and_evaluate, argv=["--workdir", str(tmp_path / "run"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset 'mnist' (train)") and err.count("\n") == 1 and "Traceback" not in err
    assert f"{url}/mnist/train-images-idx3-ubyte.gz" in err and "BNNJAX_DATASET_MIRROR" in err


def test_results_appends_a_peers_printed_line_with_its_provenance(tmp_path, monkeypatch, capsys):
    import io

    results = script("_results")
    out = tmp_path / "peer.jsonl"
    printed = 'TF noise\n{"peer": "larq", "larq": "0.14.0", "tensorflow": "2.19.1", "epochs": [1]}\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(printed))
    results.main([str(out), "--command", "python peer.py 3", "--set", "round=2", "--set", "series=row backward"])
    row, = results.read(out)
    assert row["round"] == 2 and row["series"] == "row backward" and row["epochs"] == [1]
    assert row["versions"] == {"larq": "0.14.0", "tensorflow": "2.19.1"}  # the peer's, not this process's
    assert row["command"] == "python peer.py 3" and set(results.PROVENANCE_KEYS) <= set(row)
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"peer": "lce", "ms": 100}\n'))
    results.main([str(out), "--command", "python lce.py"])
    assert results.read(out)[-1]["versions"] == {}  # none named: none recorded, not this process's
    monkeypatch.setattr(sys, "stdin", io.StringIO("no JSON here\n"))
    with pytest.raises(SystemExit, match="no JSON line on standard input"):
        results.main([str(out), "--command", "x"])
    assert len(results.read(out)) == 2
