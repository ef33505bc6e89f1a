"""One process of the multi-process training tests (tests/test_train_distributed.py starts it).

    python distributed_worker.py MODE PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT [STOP_AFTER]

MODE: ``train`` (fit over arrays, then fit_stream over this process's shard of an image folder; process 0
writes ``OUT``: the loss curves and the final parameters as .npz), or ``die`` (fit_stream where process 1
exits at its 4th batch; process 0 reports how it stopped). With NUM_PROCESSES 1 the process reads both
shards itself: the reference run over the same global batches.
"""

import json
import os
import sys
import time
from pathlib import Path

mode, pid, nproc, port, workdir, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], \
    sys.argv[6]
stop_after = int(sys.argv[7]) if len(sys.argv) > 7 else None
sys.path.insert(0, str(Path(__file__).parent))

from bnnjax import train  # noqa: E402

if nproc > 1:
    # the dying run waits for the coordination service's verdict: a short heartbeat timeout bounds it
    train.initialize_distributed(f"127.0.0.1:{port}", nproc, pid, timeout_seconds=60,
                                 heartbeat_timeout_seconds=30 if mode == "train" else 8)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnnjax import pipeline  # noqa: E402
from test_train import data, new_state, stream_state  # noqa: E402

SHARDS = 2  # the stream is split in two host shards, whoever reads them
LOCAL = 8  # images per shard and step: global batches of 16


def stream(src, seed=5):
    """This process's batches; one process alone reads both shards and concatenates them (the same
    global batches as two processes)."""
    if nproc > 1:
        return pipeline.train_loader(src, LOCAL, image_size=16, seed=seed, num_workers=0, shard=(pid, SHARDS))
    loaders = [pipeline.train_loader(src, LOCAL, image_size=16, seed=seed, num_workers=0, shard=(i, SHARDS))
               for i in range(SHARDS)]

    def both():
        while True:
            parts = [next(it) for it in loaders]
            yield {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}

    return both()


def flat(params) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


src = pipeline.ImageFolder(Path(workdir) / "images")  # made by the test, before the processes start
wd = lambda name: None if nproc == 1 else str(Path(workdir) / name)
if mode == "train":
    x, y = data(256)
    t0 = time.perf_counter()
    st, hist = train.fit(new_state(), (x, y), (x[:64], y[:64]), epochs=3, batch_size=64, steps_per_call=2,
                         checkpoint_every=2, progress=False, workdir=wd("arrays"), stop_after_step=stop_after)
    ss, shist = train.fit_stream(stream_state(), stream(src), steps=8, preprocess=pipeline.normalize, log_every=2,
                                 checkpoint_every=3, progress=False, workdir=wd("stream"),
                                 stop_after_step=None if stop_after is None else stop_after - 2)
    if pid == 0:
        np.savez(out + ".arrays.npz", **flat(st.params))
        np.savez(out + ".stream.npz", **flat(ss.params))
        Path(out).write_text(json.dumps({
            "devices": jax.device_count(), "processes": jax.process_count(), "seconds": time.perf_counter() - t0,
            "arrays": [h["train_loss"] for h in hist] + [h["test_loss"] for h in hist],
            "arrays_steps": [h["step"] for h in hist], "stream": [h["train_loss"] for h in shist],
            "stream_steps": [h["step"] for h in shist], "step": int(st.step), "stream_step": int(ss.step)}))
elif mode == "die":
    batches = stream(src)
    if pid == 1:
        inner = batches

        def dying():
            for i, b in enumerate(inner):
                if i == 3:
                    os._exit(3)  # a crash: no cleanup, no goodbye to the others
                yield b

        batches = dying()
    t0 = time.perf_counter()
    try:
        train.fit_stream(stream_state(), batches, steps=200, preprocess=pipeline.normalize, progress=False)
        Path(out).write_text(json.dumps({"error": None}))
    except train.PeerLostError as e:
        Path(out).write_text(json.dumps({"error": str(e), "type": type(e).__name__,
                                         "seconds": time.perf_counter() - t0}))
        os._exit(2)  # as the scripts do: skip JAX's exit barrier with the dead process
