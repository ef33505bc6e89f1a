"""compile_iree's aarch64 modules, run by IREE's aarch64 runtime under qemu-user, against the x86 outputs
(experiments/check_arm.py; skips without qemu-aarch64, the arm64 libraries or the cached runtime)."""

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "experiments"))


def check_arm():
    return importlib.import_module("check_arm")


def test_seed000_aarch64_modules_predict_as_x86(tmp_path):
    m = check_arm()
    config = m.Config(models=("seed000",), targets=("rpi4", "apple-m1"), seed000_images=8, fetch=False)
    try:
        tools = m.prerequisites(config)
    except m.Missing as e:
        pytest.skip(f"cannot run aarch64 modules here: {e}")
    rows = m.check_model("seed000", config, tools, tmp_path)
    assert [r["target"] for r in rows] == ["rpi4", "apple-m1"]
    for r in rows:
        assert r["executable_format"] == "embedded-elf-arm_64", r
        assert r["executed"] is True, r
        assert r["argmax_identical"] is True and r["argmax_identical_iree_x86"] is True, r
        assert r["distinct_predictions"] >= 2, r  # the outputs are not degenerate
        assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs_output"]), r
    assert rows[0]["qemu_cpu"] == "cortex-a72"  # the rpi4 module ran on the Pi 4's core


def test_missing_prerequisite_is_one_error_line(capsys):
    m = check_arm()
    assert m.main(["--models", "seed000", "--qemu", "no-such-qemu-aarch64"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "apt-get install" in err or "pip install" in err
