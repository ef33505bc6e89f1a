"""Every experiment script with ``api="nnx"``: the script's NNX model family trains, logs, checkpoints,
exports and predicts like its packed form (a file of its own, so the suite's two workers share
test_experiments' compile time)."""

import json

import pytest

from bnnjax import optim
from test_experiments import SMALL, check, data_dir, script  # noqa: F401  (data_dir: the shared fixture)


NNX_CASES = [
    ("larq_tutorial", dict(epochs=1, export=True)),
    ("larq_report", dict(epochs=1, input_scale="[-1, 1]", export=True)),
    ("binaryconnect_mlp", dict(mode="stochastic", hidden=(32, 32), epochs=1, batch_size=32, export=True)),
    ("binarynet_mlp", dict(hidden=(32, 32), epochs=1, export=True)),
    ("xnornet", dict(dataset="mnist", widths=(8, 16), dense=16, epochs=1, export=True)),
    ("birealnet", dict(stage_sizes=(1, 1), width=8, optimizer="bop", epochs=1, batch_size=32, bop_gamma=1e-2,
                       export=True)),
    # float CNN -> checkpoint -> convert_nnx -> fine-tune, both exported; 2 x 2 bases, as the linen scratch
    # export (the packed model runs M x N binary convolutions: 3 x 3 compiles about twice as long)
    ("abcnet", dict(float_epochs=1, epochs=1, num_weight_bases=2, num_act_bases=2, batch_size=32, export=True)),
]


@pytest.mark.parametrize("name,kw", NNX_CASES, ids=[c[0] for c in NNX_CASES])
def test_every_script_runs_its_nnx_model_family(data_dir, tmp_path, name, kw, monkeypatch):
    monkeypatch.setattr(optim, "_warned_unclipped", True)  # larq_report trains unclipped, as published
    m = script(name)
    cfg = m.Config(data_dir=data_dir, api="nnx", progress=False, **SMALL, **kw)
    r = m.train_and_evaluate(cfg, str(tmp_path))
    sub = tmp_path / "M2_N2" if name == "abcnet" else tmp_path
    result = json.loads((sub / "result.json").read_text())
    check(result if name == "abcnet" else r, sub, 1, "abcnet_finetune" if name == "abcnet" else name)
    assert result["api"] == "nnx" and r["test_accuracy"] == result["test_accuracy"]
    assert result["predictions_identical"] is True
    if name == "abcnet":
        assert json.loads((tmp_path / "float" / "result.json").read_text())["predictions_identical"] is True
    if name == "birealnet":  # Bop flips kernels from the first epoch
        assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["flip_ratio"] > 0
