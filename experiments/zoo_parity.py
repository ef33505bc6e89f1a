"""Zoo parity with real larq-zoo: same weights in, same outputs out, for every model.

Reads what the peer scripts wrote with larq-zoo and TensorFlow (in their own virtualenv):
``../shared/peers/zoo_reference.py REFDIR`` writes ``NAME.h5`` (Keras weights, random, BatchNorm
statistics randomized), ``NAME.npz`` (a random batch ``x`` and larq-zoo's softmax outputs ``y``, TensorFlow's
default oneDNN CPU kernels) and ``meta.json`` (Keras' parameter counts, ``lq.models.summary`` text);
``experiments/zoo_reference_rerun.py REFDIR`` adds ``NAME.eigen32.npy`` (the same model's outputs on
TensorFlow's Eigen kernels) and ``NAME.logits64.npy`` (its logits in float64). For each model this
script loads the ``.h5`` with ``bnnjax.zoo.load``, runs the batch and prints one JSON line:

- ``params`` (bnnjax) and ``keras_params``; ``summary_same``: bnnjax.summary's totals table equals Larq's;
- float32 softmax outputs against larq-zoo on oneDNN (``onednn_max_abs_diff``, ``onednn_top1_agree``)
  and on Eigen (``eigen_...``), and larq-zoo's two kernel sets against each other (``tf_onednn_vs_eigen``);
- ``f64_max_abs_diff`` / ``f64_top1_agree``: the softmax of bnnjax's float64 logits against larq-zoo's;
- ``packed_top1_agree`` / ``packed_max_abs_diff``: ``bnnjax.export.pack``'s model against bnnjax's float
  model (float32).

- ``f32_vs_f64``, ``tf_onednn_vs_f64``, ``tf_eigen_vs_f64``: how far bnnjax's and larq-zoo's float32
  outputs each land from larq-zoo's float64 answer.

``ok``: parameters and summary equal, float64 outputs within 1e-9 with the same top-1 everywhere: the
computation is the same. ``f32_within_tolerance``: float32 outputs within 1e-3 with the same top-1
against larq-zoo on at least one of TensorFlow's two CPU kernel sets. Float32 alone cannot decide it: a
deep BNN with random weights meets float32 values within rounding of a binarizing sign's threshold,
another summation order may round them to the other side, and the flipped bit changes the rest of the
network; TensorFlow's oneDNN and Eigen kernels then disagree with each other by up to 1e-1
(``tf_onednn_vs_eigen``), and each lands as far from the float64 answer as bnnjax does.

Ends with the Markdown table README shows; exit status 1 when a model is not ``ok``.

    python experiments/zoo_parity.py REFDIR [MODEL ...]
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
TOLERANCE_F64 = 1e-9


def count(variables) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))


def summary_rows(text: str) -> list[str]:
    """The key-value table of a Larq-style summary, whitespace-normalized (the model's name aside)."""
    return [" ".join(line.strip("| ").split()) for line in text.split("summary-")[-1].splitlines()
            if line.startswith("|")]


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, int]:
    """Max absolute difference and the number of rows with the same argmax."""
    return float(np.abs(got - want).max()), int(np.sum(got.argmax(-1) == want.argmax(-1)))


def check(name: str, refdir: Path, meta: dict) -> dict:
    ref = np.load(refdir / f"{name}.npz")
    model, variables = zoo.load(name, refdir / f"{name}.h5")
    apply = jax.jit(model.apply)
    t0 = time.perf_counter()
    y = np.asarray(apply(variables, ref["x"]))
    seconds = time.perf_counter() - t0
    n = len(y)
    printed = []
    bnnjax.summary(model, jax.ShapeDtypeStruct((1,) + ref["x"].shape[1:], jnp.float32), print_fn=printed.append)
    row = {"model": name, "params": count(variables), "keras_params": meta.get(name, {}).get("params"),
           "summary_same": summary_rows(printed[0]) == summary_rows(meta.get(name, {}).get("summary", "")),
           "images": n}
    f32_ok = []
    references = {"onednn": ref["y"]}
    if (refdir / f"{name}.eigen32.npy").exists():
        references["eigen"] = np.load(refdir / f"{name}.eigen32.npy")
    for kernels, want in references.items():
        diff, agree = compare(y, want)
        row[f"{kernels}_max_abs_diff"], row[f"{kernels}_top1_agree"] = diff, agree
        f32_ok.append(agree == n and diff <= TOLERANCE)
    if "eigen" in references:
        row["tf_onednn_vs_eigen"], row["tf_onednn_vs_eigen_top1_agree"] = compare(references["eigen"], ref["y"])
    f64_ok = False
    if (refdir / f"{name}.logits64.npy").exists():
        with jax.enable_x64(True):
            v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
            z = jax.jit(model.clone(classifier_activation=None).apply)(v64, jnp.asarray(ref["x"], jnp.float64))
            p = np.asarray(jax.nn.softmax(z))
            q = np.asarray(jax.nn.softmax(jnp.asarray(np.load(refdir / f"{name}.logits64.npy"))))
        row["f64_max_abs_diff"], row["f64_top1_agree"] = compare(p, q)
        f64_ok = row["f64_top1_agree"] == n and row["f64_max_abs_diff"] <= TOLERANCE_F64
        # how far each float32 implementation lands from the float64 answer
        row["f32_vs_f64"], row["f32_vs_f64_top1_agree"] = compare(y, q)
        for kernels, want in references.items():
            row[f"tf_{kernels}_vs_f64"], row[f"tf_{kernels}_vs_f64_top1_agree"] = compare(want, q)
    yp = np.asarray(apply(export.pack(model, variables, jax.ShapeDtypeStruct(ref["x"].shape, jnp.float32)), ref["x"]))
    row["packed_max_abs_diff"], row["packed_top1_agree"] = compare(yp, y)
    row["f32_within_tolerance"] = any(f32_ok)
    row["ok"] = bool(row["params"] == row["keras_params"] and row["summary_same"] and f64_ok)
    row["compile_and_run_seconds"] = round(seconds, 1)
    return row


def table(rows: list[dict]) -> str:
    out = ["| model | parameters (= Keras) | summary = Larq's | float32 vs larq-zoo on oneDNN: max diff. (same top-1) "
           "| float32 vs larq-zoo on Eigen | larq-zoo: oneDNN vs Eigen | float64 vs larq-zoo float64 "
           "| packed vs float: same top-1 |", "|---|---|---|---|---|---|---|---|"]
    cell = lambda r, key: (f"{r[key + '_max_abs_diff']:.1e} ({r[key + '_top1_agree']}/{r['images']})"  # noqa: E731
                           if key + "_max_abs_diff" in r else "-")
    for r in rows:
        tf_self = (f"{r['tf_onednn_vs_eigen']:.1e} ({r['tf_onednn_vs_eigen_top1_agree']}/{r['images']})"
                   if "tf_onednn_vs_eigen" in r else "-")
        out.append(f"| {r['model']} | {r['params']:,} ({'yes' if r['params'] == r['keras_params'] else 'NO'}) | "
                   f"{'yes' if r['summary_same'] else 'NO'} | {cell(r, 'onednn')} | {cell(r, 'eigen')} | {tf_self} | "
                   f"{cell(r, 'f64')} | {r['packed_top1_agree']}/{r['images']} |")
    return "\n".join(out)


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
    unknown = [m for m in a.models if m not in meta]
    if unknown:
        print(f"error: {unknown} not in {meta_path}; it has {sorted(meta)}.", file=sys.stderr)
        return 2
    rows = []
    for name in a.models or [n for n in zoo.names() if n in meta]:
        rows.append(check(name, a.refdir, meta))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
