"""Zoo parity with real larq-zoo: same weights in, same outputs out, for every model.

Reads what ``../shared/peers/zoo_reference.py REFDIR`` wrote with larq-zoo and TensorFlow (in their own
virtualenv): ``NAME.h5`` (Keras weights, random, BatchNorm statistics randomized), ``NAME.npz`` (a
random batch ``x`` and larq-zoo's softmax outputs ``y``) and ``meta.json`` (Keras' parameter counts,
``lq.models.summary`` text). For each model it loads the ``.h5`` with ``bnnjax.zoo.load``, runs the batch
and prints one JSON line:

- ``params`` (bnnjax) and ``keras_params``; ``summary_same``: bnnjax.summary's totals table equals
  Larq's;
- ``max_abs_diff`` of the softmax outputs and ``top1_agree`` against larq-zoo in float32; ``ok``: same
  top-1 on every image and max difference <= 1e-3;
- ``packed_top1_agree`` / ``packed_max_abs_diff``: ``bnnjax.export.pack``'s model against bnnjax's
  float model;
- with ``--float64`` (after ``experiments/zoo_reference_float64.py REFDIR`` in the peer virtualenv):
  ``f64_max_abs_diff`` / ``f64_top1_agree`` of the softmax of bnnjax's float64 logits against larq-zoo's
  float64 logits. Deep BNNs with random weights meet float32 values within rounding of a sign's
  threshold, which either implementation may round either way; in float64 both agree to ~1e-13.

Ends with the Markdown table README shows.

    python experiments/zoo_parity.py REFDIR [MODEL ...] [--float64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bnnjax
from bnnjax import export, zoo

TOLERANCE = 1e-3


def count(variables) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))


def summary_rows(text: str) -> list[str]:
    """The key-value table of a Larq-style summary, whitespace-normalized (the model's name aside)."""
    return [" ".join(line.strip("| ").split()) for line in text.split("summary-")[-1].splitlines()
            if line.startswith("|")]


def check(name: str, refdir: Path, meta: dict, float64: bool) -> dict:
    ref = np.load(refdir / f"{name}.npz")
    model, variables = zoo.load(name, refdir / f"{name}.h5")
    apply = jax.jit(model.apply)
    t0 = time.perf_counter()
    y = np.asarray(apply(variables, ref["x"]))
    seconds = time.perf_counter() - t0
    diff = float(np.abs(y - ref["y"]).max())
    agree = int(np.sum(y.argmax(-1) == ref["y"].argmax(-1)))
    printed = []
    bnnjax.summary(model, jax.ShapeDtypeStruct((1,) + ref["x"].shape[1:], jnp.float32), print_fn=printed.append)
    yp = np.asarray(apply(export.pack(model, variables), ref["x"]))
    row = {"model": name, "params": count(variables), "keras_params": meta.get(name, {}).get("params"),
           "summary_same": summary_rows(printed[0]) == summary_rows(meta.get(name, {}).get("summary", "")),
           "max_abs_diff": diff, "top1_agree": f"{agree}/{len(y)}", "ok": bool(agree == len(y) and diff <= TOLERANCE),
           "packed_top1_agree": f"{int(np.sum(yp.argmax(-1) == y.argmax(-1)))}/{len(y)}",
           "packed_max_abs_diff": float(np.abs(yp - y).max()), "compile_and_run_seconds": round(seconds, 1)}
    logits64 = refdir / f"{name}.logits64.npy"
    if float64 and logits64.exists():
        logits_model = model.clone(classifier_activation=None)
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        z = np.asarray(jax.jit(logits_model.apply)(v64, jnp.asarray(ref["x"], jnp.float64)))
        p, q = np.asarray(jax.nn.softmax(z)), np.asarray(jax.nn.softmax(np.load(logits64)))
        row.update(f64_max_abs_diff=float(np.abs(p - q).max()),
                   f64_top1_agree=f"{int(np.sum(p.argmax(-1) == q.argmax(-1)))}/{len(p)}")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("refdir", type=Path)
    p.add_argument("models", nargs="*")
    p.add_argument("--float64", action="store_true", help="also compare float64 logits (see the docstring)")
    a = p.parse_args(argv)
    if a.float64:
        jax.config.update("jax_enable_x64", True)
    meta_path = a.refdir / "meta.json"
    if not meta_path.exists():
        print(f"error: {meta_path} not found; run ../shared/peers/zoo_reference.py {a.refdir} first.", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    rows = []
    for name in a.models or [n for n in zoo.names() if n in meta]:
        row = check(name, a.refdir, meta, a.float64)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | parameters (bnnjax = Keras) | summary = Larq's | float32: max abs. diff. (softmax) | "
          "same top-1 | float64: max abs. diff. | packed vs float: same top-1 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        f64 = f"{r['f64_max_abs_diff']:.1e} ({r['f64_top1_agree']})" if "f64_max_abs_diff" in r else "-"
        print(f"| {r['model']} | {r['params']:,} ({'yes' if r['params'] == r['keras_params'] else 'NO'}) | "
              f"{'yes' if r['summary_same'] else 'NO'} | {r['max_abs_diff']:.1e} | {r['top1_agree']} | {f64} | "
              f"{r['packed_top1_agree']} |")
    return 0 if all(r["ok"] and r["params"] == r["keras_params"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
