"""``python -m bnnjax``: what it prints about the installation."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bnnjax
from bnnjax import __main__ as main_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def printed() -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "bnnjax"], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("expected", [f"bnnjax {bnnjax.__version__} (", "jax ", "backend: cpu, ", "packed kernel: popcount",
                                      "extras:"])
def test_prints(printed, expected):
    assert expected in printed


@pytest.mark.parametrize("name", [name for name, _, _ in main_module.EXTRAS])
def test_names_each_extra(printed, name):
    line = next(line for line in printed.splitlines() if line.split()[:len(name.split())] == name.split())
    assert line.split()[len(name.split())] in ("found", "missing")


def test_version_is_a_release_number():
    assert bnnjax.__version__.count(".") == 2 and all(p.isdigit() for p in bnnjax.__version__.split("."))


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx512_vpopcntdq"}, "VPOPCNTDQ: yes"),
                                             ({"avx2"}, "VPOPCNTDQ: no"), (set(), "CPU features unknown")])
def test_says_whether_popcounts_are_vectorized(monkeypatch, flags, expected):
    from bnnjax import packing

    monkeypatch.setattr(packing, "cpu_flags", lambda: flags)
    assert expected in "\n".join(main_module.report())


def test_other_backends_use_int8_dots(monkeypatch):
    from bnnjax import packing

    monkeypatch.setattr(packing, "backend_kernel", lambda backend=None: "int8")
    assert "packed kernel: int8" in "\n".join(main_module.report())


def test_missing_extra_is_reported(monkeypatch):
    monkeypatch.setattr(main_module, "EXTRAS", (("nothing", "a module that does not exist", "no_such_module_xyz"),))
    assert main_module.report()[-1].split()[:2] == ["nothing", "missing"]
