"""Training across processes for real: 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1, gloo
collectives) against one process with 4 devices over the same global batches; killed and relaunched
runs; a process that dies."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = str(Path(__file__).parent / "distributed_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode, nproc, workdir, out, stop_after=None, timeout=300):
    """Start ``nproc`` workers (2 CPU devices each; 4 for a lone process) and wait for all."""
    from test_pipeline import make_image_folder

    if not (Path(workdir) / "images").exists():
        make_image_folder(Path(workdir) / "images")
    devices = 4 if nproc == 1 else 2
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    port = str(_port())
    extra = [] if stop_after is None else [str(stop_after)]
    procs = [subprocess.Popen([sys.executable, WORKER, mode, str(i), str(nproc), port, str(workdir), str(out), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(nproc)]
    t0 = time.monotonic()
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outputs, time.monotonic() - t0


def _params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    results = {}
    for name, nproc, wd, stop in (("reference", 1, d / "ref", None), ("full", 2, d / "full", None),
                                  ("killed", 2, d / "resumed", 7), ("resumed", 2, d / "resumed", None)):
        wd.mkdir(exist_ok=True)
        codes, outputs, seconds = _launch("train", nproc, wd, d / f"{name}.json", stop)
        assert codes == [0] * nproc, "\n".join(o[-3000:] for o in outputs)
        results[name] = json.loads((d / f"{name}.json").read_text()) | {"dir": d, "wall_seconds": seconds}
    return results


def test_two_processes_follow_the_one_process_loss_curves(runs):
    ref, full = runs["reference"], runs["full"]
    assert (ref["devices"], ref["processes"]) == (4, 1) and (full["devices"], full["processes"]) == (4, 2)
    assert full["arrays_steps"] == ref["arrays_steps"] == [4, 8, 12]
    assert full["stream_steps"] == ref["stream_steps"] == [2, 3, 4, 6, 8]  # rows at checkpoints too
    np.testing.assert_allclose(full["arrays"], ref["arrays"], rtol=2e-3)
    np.testing.assert_allclose(full["stream"], ref["stream"], rtol=2e-3)
    d = runs["full"]["dir"]
    for kind in ("arrays", "stream"):
        a, b = _params(d / f"full.json.{kind}.npz"), _params(d / f"reference.json.{kind}.npz")
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_both_processes_write_one_checkpoint_and_resume_exactly(runs):
    d = runs["full"]["dir"]
    # one orbax checkpoint per step for the run, written by both processes together
    assert sorted(os.listdir(d / "full" / "arrays" / "checkpoints"), key=int) == ["10", "12"]
    assert sorted(os.listdir(d / "full" / "stream" / "checkpoints"), key=int) == ["3", "6", "8"]
    killed, resumed = runs["killed"], runs["resumed"]
    assert killed["step"] == 7 and killed["stream_step"] == 5  # both processes stopped there
    assert resumed["step"] == 12 and resumed["stream_step"] == 8
    assert resumed["arrays"] == runs["full"]["arrays"] and resumed["stream"] == runs["full"]["stream"]
    for kind in ("arrays", "stream"):
        a, b = _params(d / f"resumed.json.{kind}.npz"), _params(d / f"full.json.{kind}.npz")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_dying_process_stops_the_others_with_a_clear_error(tmp_path):
    """The survivor stops within a bounded time with an error saying a process died: bnnjax's
    PeerLostError when its next collective fails (the usual case), else JAX's coordination service
    after the worker's 8 s heartbeat timeout."""
    codes, outputs, seconds = _launch("die", 2, tmp_path, tmp_path / "die.json", timeout=240)
    assert codes[1] == 3, outputs[1][-2000:]  # the one that crashed
    assert codes[0] != 0 and seconds < 200, outputs[0][-3000:]
    if (tmp_path / "die.json").exists():
        report = json.loads((tmp_path / "die.json").read_text())
        assert codes[0] == 2 and report["type"] == "PeerLostError"
        assert "process 0 of this 2-process run stopped" in report["error"] and "Restart every process" in report["error"]
        assert report["seconds"] < 60
    else:
        assert "JAX distributed service detected fatal errors" in outputs[0] and "another task died" in outputs[0]
