"""Zoo parity with real larq-zoo: same weights in, same outputs out, for every model.

Reads what ``../shared/peers/zoo_reference.py OUTDIR`` wrote with larq-zoo and TensorFlow (in their own
virtualenv): ``NAME.h5`` (Keras weights, random, BatchNorm statistics randomized), ``NAME.npz`` (a
random batch ``x`` and larq-zoo's outputs ``y``) and ``meta.json`` (Keras' parameter counts). For each
model it loads the ``.h5`` with ``bnnjax.zoo.load``, runs the batch and prints one JSON line:
``model``, ``params`` (bnnjax) and ``keras_params``, ``max_abs_diff`` of the softmax outputs,
``top1_agree`` (images with the same top-1 / all), ``ok`` (same top-1 on every image and max difference
<= 1e-3). Ends with the Markdown table README shows.

    python experiments/zoo_parity.py REFDIR [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from bnnjax import zoo

TOLERANCE = 1e-3


def count(variables) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))


def check(name: str, refdir: Path, meta: dict) -> dict:
    ref = np.load(refdir / f"{name}.npz")
    model, variables = zoo.load(name, refdir / f"{name}.h5")
    t0 = time.perf_counter()
    y = np.asarray(jax.jit(model.apply)(variables, ref["x"]))
    seconds = time.perf_counter() - t0
    diff = float(np.abs(y - ref["y"]).max())
    agree = int(np.sum(y.argmax(-1) == ref["y"].argmax(-1)))
    return {"model": name, "params": count(variables), "keras_params": meta.get(name, {}).get("params"),
            "max_abs_diff": diff, "top1_agree": f"{agree}/{len(y)}", "ok": bool(agree == len(y) and diff <= TOLERANCE),
            "compile_and_run_seconds": round(seconds, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("refdir", type=Path)
    p.add_argument("models", nargs="*")
    a = p.parse_args(argv)
    meta_path = a.refdir / "meta.json"
    if not meta_path.exists():
        print(f"error: {meta_path} not found; run ../shared/peers/zoo_reference.py {a.refdir} first.", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    rows = []
    for name in a.models or [n for n in zoo.names() if n in meta]:
        row = check(name, a.refdir, meta)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | parameters (bnnjax / Keras) | max abs. diff. (softmax) | same top-1 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} / {r['keras_params']:,} | {r['max_abs_diff']:.1e} | {r['top1_agree']} |")
    return 0 if all(r["ok"] and r["params"] == r["keras_params"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
