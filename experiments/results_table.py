"""Render the results tables (Markdown) from the files under results/.

    python experiments/results_table.py results/*/result.json       # the experiments' table
    python experiments/results_table.py --table inference           # one table, from results/
    python experiments/results_table.py --table all --out-dir DIR   # every table, DIR/<name>.md
    python experiments/results_table.py --update-readme             # README.md's headline table

Tables (``--table``): ``runs`` (``results/<run>/result.json`` and ``log.jsonl``), ``kernels``
(``kernels.jsonl``), ``inference`` and ``inference_sizes`` (``inference_seed000.jsonl``,
``inference_quicknet.jsonl``, ``peer_quicknet_tflite_size.jsonl``), ``peer_inference`` (``peer_quicknet_inference.jsonl`` beside bnnjax's
QuickNet), ``train`` (``train_seed000.jsonl`` beside ``peer_larq_seed000.jsonl``, round by round),
``input`` (``input_pipeline.jsonl``, ``zoo_eval_smoke.jsonl``), ``zoo_parity`` (``zoo_parity.jsonl``)
and ``zoo`` (the 14 zoo models: published accuracy, ``bnnjax.summary``'s figures, parameters from
``zoo_parity.jsonl``; needs bnnjax); ``headline`` (README's: bnnjax beside its peers, from the benchmark
files). ``summary_figures(results_dir)`` returns the single figures the
documentation quotes in its text, by name.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import read  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"

PUBLISHED = {  # what the seed or paper reports, on MNIST unless stated
    "larq_tutorial": "97.5-97.6 % (MNIST, 6 ep.)",
    "larq_report": "none given",
    "binaryconnect_mlp": "96.87 % float / 93.72 % binary (MNIST, 200 ep.)",
    "binarynet_mlp": "99.04 % (MNIST, 3x4096, 1000 ep.)",
    "xnornet": "ImageNet only",
    "abcnet": "ImageNet only; seed notebook ~98 % (MNIST)",
    "abcnet_finetune": "ImageNet only",
    "abcnet_float": "float baseline",
    "birealnet": "56.4 % top-1 (ImageNet, Bi-Real-18)",
}

# Larq Compute Engine's published QuickNet latencies (batch 1, one thread), in ms: LCE's documentation
LCE_PUBLISHED_MS = {"Apple M1": 5.8, "Raspberry Pi 4": 45.0}

KERNEL_CASES = {  # case id -> what it is
    "square_2048": "square",
    "wide_64x4096x4096": "wide",
    "seed000_conv2_im2col_b64": "seed-000 conv2 im2col, batch 64",
    "seed000_conv3_im2col_b64": "seed-000 conv3 im2col, batch 64",
    "seed000_dense1_b64": "seed-000 dense1, batch 64",
    "odd_k_1000": "odd k",
}

PATHS = ("float", "flax_eval", "packed", "packed_closure", "artifact", "artifact_default_options", "iree")
MODEL_NAMES = {"seed000": "seed 000", "quicknet": "QuickNet"}


def _ms(v: float) -> str:
    return f"{v:.3f} ms" if v < 1 else (f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms")


def _rate(v: float) -> str:
    return f"{v / 1000:.1f}k img/s" if v >= 10_000 else (f"{v:.1f} img/s" if v < 100 else f"{v:.0f} img/s")


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _latest(rows: list[dict]) -> list[dict]:
    """The rows of the newest date (a file that a benchmark appends to holds every run)."""
    if not rows:
        return rows
    last = max(r.get("date", "") for r in rows)
    return [r for r in rows if r.get("date", "") == last]


# --- the experiments' runs ---------------------------------------------------------------------------

def describe(r):
    bits = [f"{k}={r[k]}" for k in ("mode", "optimizer", "input_scale", "hidden", "stage_sizes", "width",
                                     "num_weight_bases", "num_act_bases", "matmul_precision", "binary_gradients") if k in r]
    return ", ".join(str(b) for b in bits)


def runs(paths=None, results_dir: Path = RESULTS) -> str:
    paths = [Path(p) for p in paths] if paths else sorted(Path(results_dir).glob("*/result.json"), key=_run_order)
    rows = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        log = Path(path).with_name("log.jsonl")
        logged = read(log) if log.exists() else []
        per_epoch = sum(x["epoch_seconds"] for x in logged) / len(logged) if logged else float("nan")
        packed = (f"{100 * r['packed_test_accuracy']:.2f} % ({r['predictions_identical']})"
                  if "packed_test_accuracy" in r else "-")
        rows.append([Path(path).parent.name, r["experiment"], describe(r), r["dataset"], r["epochs"],
                     PUBLISHED.get(r["experiment"], "-"), f"{100 * r['test_accuracy']:.2f} %", packed,
                     f"{r['seconds']:.0f}", f"{per_epoch:.1f}"])
    return _table(["run", "experiment", "setting", "dataset", "epochs", "published", "test acc.",
                   "packed acc. (identical)", "train s", "s/epoch"], rows)


_ORDER = ("larq_tutorial_s", "larq_tutorial_f32", "larq_report", "bc_float", "bc_det", "bc_stoch", "binarynet",
          "xnornet", "abcnet-float", "abcnet-", "birealnet")


def _run_order(path: Path):
    name = path.parent.name
    return next((i for i, p in enumerate(_ORDER) if name.startswith(p)), len(_ORDER)), name


# --- benchmarks ---------------------------------------------------------------------------------------

def kernels(results_dir: Path = RESULTS) -> str:
    rows = [[KERNEL_CASES.get(r["case"], r["case"]), f"{r['m']} x {r['n']} x {r['k']}", _ms(r["f32_ms"]),
             _ms(r["int8_ms"]), _ms(r["packed_ms"]), f"{r['packed_vs_f32']:.1f}x", f"{r['packed_vs_int8']:.1f}x",
             "yes" if r["exact"] else "NO"]
            for r in _latest(read(Path(results_dir) / "kernels.jsonl"))]
    return _table(["case", "m x n x k", "f32 dot", "XLA int8 dot", "packed XNOR-popcount", "vs f32", "vs int8",
                   "exact"], rows)


def _inference_rows(results_dir: Path) -> list[dict]:
    out = []
    for name in ("inference_seed000.jsonl", "inference_quicknet.jsonl"):
        p = Path(results_dir) / name
        if p.exists():
            out += _latest([r for r in read(p) if "skipped" not in r])
    return out


def inference(results_dir: Path = RESULTS) -> str:
    rows, by = [], {}
    for r in _inference_rows(results_dir):
        by.setdefault((r["model"], r["batch"]), {})[r["path"]] = r
    for (model, batch), paths in by.items():
        cells = []
        for p in PATHS:
            r = paths.get(p)
            cells.append("-" if r is None else (_ms(r["latency_ms"]) if batch == 1 else _rate(r["img_s"])))
        same = all(r.get("predictions_identical") for r in paths.values())
        art = paths.get("artifact", {})
        bound = [_ms(art["bound_ms"]), f"{art['ratio_to_bound']:.2f}"] if "bound_ms" in art else ["-", "-"]
        strict = f"{art['ratio_to_strict_bound']:.2f}" if "ratio_to_strict_bound" in art else "-"
        rows.append([MODEL_NAMES.get(model, model), batch, *cells, *bound, strict, "yes" if same else "NO"])
    return _table(["model", "batch", *PATHS, "bound", "artifact / bound", "artifact / strict bound",
                   "predictions = float's"], rows)


def inference_sizes(results_dir: Path = RESULTS) -> str:
    sizes = {}
    for r in _inference_rows(results_dir):
        if "bytes" in r and r["path"] in ("packed", "artifact", "iree"):
            sizes.setdefault(r["model"], {})[r["path"]] = r["bytes"]
    rows = [[MODEL_NAMES.get(m, m), *(f"{s[p]:,}" if p in s else "-" for p in ("packed", "artifact", "iree"))]
            for m, s in sizes.items()]
    lce = Path(results_dir) / "peer_quicknet_tflite_size.jsonl"
    if lce.exists():  # the same model and BatchNorm statistics as bench_inference's QuickNet
        peer = _latest(read(lce))[-1]
        rows.append([f"QuickNet: LCE {peer['versions'].get('larq-compute-engine', '')} .tflite (same statistics)",
                     "-", f"{peer['tflite_bytes_random_stats']:,}", "-"])
    return _table(["model", "packed variables (bytes)", "StableHLO artifact (bytes)", "IREE module (bytes)"], rows)


def _quicknet_b1(results_dir: Path) -> dict[str, float]:
    return {r["path"]: r["latency_ms"] for r in _inference_rows(results_dir)
            if r["model"] == "quicknet" and r["batch"] == 1}


def peer_inference(results_dir: Path = RESULTS) -> str:
    peer = _latest(read(Path(results_dir) / "peer_quicknet_inference.jsonl"))[-1]
    ours = _quicknet_b1(results_dir)
    v = peer["versions"]
    rows = [[f"bnnjax `{p}`", _ms(ms), "this machine"] for p, ms in ours.items()]
    rows += [[f"Keras / Larq {v.get('larq', '')} float (TensorFlow {v.get('tensorflow', '')})",
              _ms(peer["keras_b1_ms"]), "this machine"],
             [f"LCE {v.get('larq-compute-engine', '')} x86 interpreter, 1 thread", _ms(peer["lce_t1_b1_ms"]),
              "this machine"],
             [f"LCE {v.get('larq-compute-engine', '')} x86 interpreter, 2 threads", _ms(peer["lce_t2_b1_ms"]),
              "this machine"]]
    rows += [[f"LCE on {dev}, 1 thread", _ms(ms), "LCE's published figure"] for dev, ms in LCE_PUBLISHED_MS.items()]
    return _table(["QuickNet, batch 1", "latency", "measured"], rows)


def _gradients(r: dict) -> str:
    """``"bfloat16"`` or ``"float32"``: the operands of the binary layers' backward dots in a training row."""
    if "binary_gradients" in r:
        return r["binary_gradients"]
    return "bfloat16" if r.get("matmul_precision") == "bfloat16" else "float32"


def _rounds(results_dir: Path) -> list[dict]:
    """Paired rounds: ``{"series", "round", "bfloat16", "float32", "larq": [epoch seconds]}``."""
    rounds: dict[tuple, dict] = {}
    for r in read(Path(results_dir) / "train_seed000.jsonl"):
        if "round" in r and "seconds_per_epoch" in r and r.get("api", "linen") == "linen":
            key = (r["series"], r["round"])
            rounds.setdefault(key, {"series": r["series"], "round": r["round"], "date": r.get("date", "")})
            rounds[key][_gradients(r)] = r["seconds_per_epoch"]
    for r in read(Path(results_dir) / "peer_larq_seed000.jsonl"):
        if "round" in r and (r["series"], r["round"]) in rounds:
            rounds[(r["series"], r["round"])]["larq"] = [e["train_seconds"] for e in r["epochs"]]
    return [x for x in rounds.values() if "larq" in x]


def train(results_dir: Path = RESULTS) -> str:
    rows = []
    for x in _rounds(results_dir):
        larq = x["larq"]
        mean = statistics.mean(larq)
        ratio = lambda k: f"{x[k] / mean:.2f}x" if k in x else "-"  # noqa: E731
        rows.append([f"{x['series']} {x['round']}", x["date"],
                     f"{x['bfloat16']:.2f} s" if "bfloat16" in x else "-",
                     f"{x['float32']:.2f} s" if "float32" in x else "-",
                     " / ".join(f"{s:.1f}" for s in larq) + " s", ratio("bfloat16"), ratio("float32"),
                     f"{x['bfloat16'] / min(larq):.2f}x" if "bfloat16" in x else "-"])
    return _table(["series, round", "date", "bnnjax, bfloat16 gradients", "bnnjax, float32 gradients",
                   "Larq epochs", "bf16 / Larq mean", "f32 / Larq mean", "bf16 / Larq fastest epoch"], rows)


def _paired_peer(rows: list[dict], i: int) -> dict | None:
    """The Larq run a bnnjax row is compared with: the first one after it in the file (each is run right
    after bnnjax's), else the last one before it."""
    after = next((r for r in rows[i + 1:] if r.get("peer")), None)
    return after or next((r for r in reversed(rows[:i]) if r.get("peer")), None)


def train_quicknet(results_dir: Path = RESULTS) -> str:
    """QuickNet's training step (224x224, Adam): bnnjax's paths beside Larq's, and compiled memory."""
    rows = _latest(read(Path(results_dir) / "train_quicknet.jsonl"))
    out = []
    for i, r in enumerate(rows):
        peer = _paired_peer(rows, i)
        if r.get("peer"):
            out.append([f"Larq 0.14 + larq-zoo 2.4 (TF {r['versions'].get('tensorflow-cpu', '?')})", r["batch"],
                        f"{r['step_s']:.2f} s", "-", f"{r['peak_rss_MiB']:,.0f} MiB", "-"])
        elif "step_s" in r:
            ratio = f" ({r['step_s'] / peer['step_s']:.2f}x Larq)" if peer else ""
            rss = f" ({r['peak_rss_MiB'] / peer['peak_rss_MiB']:.2f}x)" if peer else ""
            out.append([f"bnnjax {r['api']}, {r['residuals']} residuals", r["batch_size"], f"{r['step_s']:.2f} s{ratio}",
                        f"{r['temp_MiB']:,.0f} MiB", f"{r['peak_rss_MiB']:,.0f} MiB{rss}", f"{r['images_per_second']:.1f}"])
    table = _table(["", "batch", "s/step (median)", "compiled temp", "peak RSS", "img/s"], out)
    mem: dict[int, dict] = {}
    for r in rows:
        if r.get("benchmark") == "train_quicknet" and r.get("api") == "linen":
            mem.setdefault(r["batch_size"], {})[r["residuals"]] = r["temp_MiB"]
    mrows = [[b, f"{m['bits']:,.0f} MiB", f"{m['float']:,.0f} MiB", f"{m['bits'] / m['float']:.2f}"]
             for b, m in sorted(mem.items()) if {"bits", "float"} <= set(m)]
    return table + "\n\n" + _table(["batch", "bit residuals", "float residuals (float_forward)", "ratio"], mrows)


def input_pipeline(results_dir: Path = RESULTS) -> str:
    rows = {r["benchmark"]: r for r in _latest(read(Path(results_dir) / "input_pipeline.jsonl"))}
    out = []
    if "input_per_image" in rows:
        r = rows["input_per_image"]
        out.append(["JPEG decode, one image, one core", _ms(r["decode_ms"]),
                    f"{r['mean_file_kib']:.1f} KiB on average"])
        out.append(["random-resized crop + TF1 bicubic resize + flip, one image", _ms(r["augment_ms"]),
                    f"to {r['image_size']}x{r['image_size']}"])
    if "input_pipeline" in rows:
        r = rows["input_pipeline"]
        out.append([f"`pipeline.train_loader`, {r['workers']} worker processes", _rate(r["images_per_second"]),
                    f"batch {r['batch_size']}, {r['image_size']}x{r['image_size']}"])
    if "train_step" in rows:
        r = rows["train_step"]
        out.append([f"{r['model']} training step (batch {r['batch_size']}, {r['binary_gradients']} gradient operands)",
                    f"{r['seconds_per_step']:.2f} s = {_rate(r['images_per_second'])}", "compilation excluded"])
    if "input_vs_compute" in rows:
        r = rows["input_vs_compute"]
        out.append(["input over training rate", f"{r['input_over_train']:.0f}x", f"{r['bound']}-bound"])
    smoke = Path(results_dir) / "zoo_eval_smoke.jsonl"
    for r in (_latest(read(smoke)) if smoke.exists() else []):
        out.append([f"`zoo_eval.py --model {r['model']} --weights {r['weights']}`{' --packed' if r['packed'] else ''}, "
                    f"{r['images']} images", _rate(r["images_per_second"]), "input and model on the same cores"])
    return _table(["what", "time or rate", "note"], out)


def zoo_parity(results_dir: Path = RESULTS) -> str:
    rows = sorted(_latest(read(Path(results_dir) / "zoo_parity.jsonl")), key=lambda r: r["model"])

    def cell(r, key):
        return (f"{r[key + '_max_abs_diff']:.1e} ({r[key + '_top1_agree']}/{r['images']})"
                if key + "_max_abs_diff" in r else "-")

    out = []
    for r in rows:
        tf_self = (f"{r['tf_onednn_vs_eigen']:.1e} ({r['tf_onednn_vs_eigen_top1_agree']}/{r['images']})"
                   if "tf_onednn_vs_eigen" in r else "-")
        out.append([r["model"], f"{r['params']:,} ({'yes' if r['params'] == r['keras_params'] else 'NO'})",
                    "yes" if r["summary_same"] else "NO", cell(r, "onednn"), cell(r, "eigen"), tf_self,
                    cell(r, "f64"), f"{r['packed_top1_agree']}/{r['images']}"])
    return _table(["model", "parameters (= Keras)", "summary = Larq's",
                   "float32 vs larq-zoo on oneDNN: max diff. (same top-1)", "float32 vs larq-zoo on Eigen",
                   "larq-zoo: oneDNN vs Eigen", "float64 vs larq-zoo float64", "packed vs float: same top-1"], out)


_ACCURACY = re.compile(r"([\d.]+) % top-1 / ([\d.]+) % top-5")


def zoo_models() -> list[dict]:
    """The zoo's models with their published ImageNet accuracy (the model's docstring) and
    ``bnnjax.summary``'s figures at 224x224 (shapes only: nothing is computed)."""
    import jax
    import jax.numpy as jnp

    import bnnjax
    from bnnjax import zoo

    out = []
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    for name in zoo.names():
        cls = zoo.MODELS[name]
        m = _ACCURACY.search(cls.__doc__ or "")
        s = bnnjax.summary(cls(), x, print_fn=None)
        out.append({"model": name, "top1": m and m.group(1), "top5": m and m.group(2),
                    "memory_kib": s["memory_kib"], "total_macs": s["total_macs"], "macs_by_bits": s["macs_by_bits"],
                    "binarized_mac_ratio": s["binarized_mac_ratio"]})
    return out


def zoo(results_dir: Path = RESULTS, models: list[dict] | None = None) -> str:
    models = models if models is not None else zoo_models()
    parity_file = Path(results_dir) / "zoo_parity.jsonl"
    params = {r["model"]: r["keras_params"] for r in read(parity_file)} if parity_file.exists() else {}
    rows = []
    for m in sorted(models, key=lambda m: -float(m["top1"] or 0)):
        macs = m["total_macs"]
        ratio = f"{m['binarized_mac_ratio']:.4f}"
        by_bits = {int(k): v for k, v in m["macs_by_bits"].items()}
        if not by_bits.get(1):  # no 1-bit MACs: the share of the low-bit ones
            low = {b: v for b, v in by_bits.items() if b < 32}
            if low:
                ratio = f"{sum(low.values()) / macs:.4f} ({'/'.join(map(str, sorted(low)))}-bit)"
        rows.append([m["model"], f"{m['top1']} / {m['top5']} %" if m["top1"] else "-",
                     f"{params[m['model']]:,}" if m["model"] in params else "-", f"{m['memory_kib'] / 1024:.2f} MiB",
                     f"{macs / 1e9:.2f} B" if macs >= 1e9 else f"{macs / 1e6:.0f} M", ratio])
    return _table(["model", "ImageNet top-1 / top-5 (larq-zoo's weights)", "parameters (Keras' count)",
                   "model size (Larq's count)", "MACs", "binarized MACs"], rows)


def headline(results_dir: Path = RESULTS) -> str:
    """The front page's figures: bnnjax beside its peers, each from the benchmark files."""
    f = summary_figures(results_dir)
    k = {r["case"]: r for r in _latest(read(Path(results_dir) / "kernels.jsonl"))}
    rows = []
    if "quicknet_artifact_b1" in f:
        rows.append(["QuickNet inference, batch 1, 224x224", f"{f['quicknet_artifact_b1']} (StableHLO artifact)",
                     f"LCE x86, 2 threads: {f['lce_t2_b1']}; Keras/Larq float: {f['keras_b1']}; "
                     f"LCE on an Apple M1 (published): {f['lce_published_apple_m1']}"])
        if "lce_tflite_random_bytes" in f:  # the same model, the same BatchNorm statistics
            rows.append(["QuickNet file, ready to run", f"{f['quicknet_artifact_bytes']} bytes (StableHLO artifact)",
                         f"LCE's .tflite: {f['lce_tflite_random_bytes']} bytes"])
        else:
            rows.append(["QuickNet model size", f"{f['quicknet_packed_bytes']} bytes (packed variables)",
                         f"LCE's .tflite: {f['lce_tflite_bytes']} bytes"])
    if "seed000_artifact_b1000" in f:
        rows.append(["seed 000 inference, batch 1000", f"{f['seed000_artifact_b1000']} (artifact)",
                     f"bnnjax float: {f['seed000_float_b1000']}"])
    if "train_bf16_mean" in f:
        rows.append(["seed 000 training, Fashion-MNIST, batch 64", f"{f['train_bf16_mean']} per epoch",
                     f"Larq 0.14: {f['larq_epoch_mean']} per epoch (bnnjax/Larq per round: median "
                     f"{f['train_ratio_median']}, {f['train_rounds']} rounds)"])
    tq = _latest(read(Path(results_dir) / "train_quicknet.jsonl")) if (Path(results_dir) / "train_quicknet.jsonl").exists() else []
    # the newest bnnjax run and the Larq run paired with it
    i = next((i for i in reversed(range(len(tq))) if tq[i].get("api") == "linen" and tq[i].get("residuals") == "bits"
              and "step_s" in tq[i]), None)
    ours, peer = (tq[i], _paired_peer(tq, i)) if i is not None else (None, None)
    if ours and peer:
        rows.append([f"QuickNet training step, batch {ours['batch_size']}, 224x224, Adam",
                     f"{ours['step_s']:.2f} s, peak RSS {ours['peak_rss_MiB']:,.0f} MiB",
                     f"Larq 0.14 + larq-zoo: {peer['step_s']:.2f} s, {peer['peak_rss_MiB']:,.0f} MiB"])
    if "square_2048" in k:
        r = k["square_2048"]
        rows.append(["±1 matmul 2048x2048x2048", f"{_ms(r['packed_ms'])} (packed XNOR-popcount)",
                     f"float32 dot: {_ms(r['f32_ms'])}; int8 dot: {_ms(r['int8_ms'])}"])
    return _table(["", "bnnjax", "peers, same machine unless stated"], rows)


TABLES = {"runs": runs, "kernels": kernels, "inference": inference, "inference_sizes": inference_sizes,
          "peer_inference": peer_inference, "train": train, "input": input_pipeline, "zoo_parity": zoo_parity,
          "zoo": zoo, "headline": headline, "train_quicknet": train_quicknet}

# the README's headline table lies between these lines (``--update-readme`` rewrites it)
README_BEGIN = "<!-- rendered by: python experiments/results_table.py --table headline --update-readme -->"
README_END = "<!-- end of rendered table -->"


def update_readme(path: Path, results_dir: Path = RESULTS) -> bool:
    """Rewrite the headline table in the README at ``path``; True if it changed."""
    text = Path(path).read_text()
    head, sep, rest = text.partition(README_BEGIN)
    _, sep2, tail = rest.partition(README_END)
    if not sep or not sep2:
        raise ValueError(f"{path}: no {README_BEGIN!r} ... {README_END!r} block")
    new = f"{head}{README_BEGIN}\n{render('headline', results_dir)}\n{README_END}{tail}"
    Path(path).write_text(new)
    return new != text


def render(name: str, results_dir: Path = RESULTS) -> str:
    """One table as Markdown."""
    return TABLES[name](results_dir=Path(results_dir))


def summary_figures(results_dir: Path = RESULTS) -> dict[str, str]:
    """The single figures the documentation's text quotes, formatted, by name."""
    d = Path(results_dir)
    out = {}
    inf = {(r["model"], r["path"], r["batch"]): r for r in _inference_rows(d)}
    get = lambda *k: inf.get(k)  # noqa: E731
    if get("quicknet", "artifact", 1):
        out["quicknet_artifact_b1"] = _ms(get("quicknet", "artifact", 1)["latency_ms"])
        out["quicknet_float_b1"] = _ms(get("quicknet", "float", 1)["latency_ms"])
        out["quicknet_artifact_bytes"] = f"{get('quicknet', 'artifact', 1)['bytes']:,}"
        out["quicknet_packed_bytes"] = f"{get('quicknet', 'packed', 1)['bytes']:,}"
    if get("seed000", "artifact", 1000):
        out["seed000_artifact_b1000"] = _rate(get("seed000", "artifact", 1000)["img_s"])
        out["seed000_float_b1000"] = _rate(get("seed000", "float", 1000)["img_s"])
        out["seed000_packed_bytes"] = f"{get('seed000', 'packed', 1)['bytes']:,}"
        out["seed000_artifact_speedup"] = (f"{get('seed000', 'artifact', 1000)['img_s'] / get('seed000', 'float', 1000)['img_s']:.1f}x")
    peer_file = d / "peer_quicknet_inference.jsonl"
    if peer_file.exists():
        peer = _latest(read(peer_file))[-1]
        out["lce_t2_b1"] = _ms(peer["lce_t2_b1_ms"])
        out["keras_b1"] = _ms(peer["keras_b1_ms"])
        out["lce_tflite_bytes"] = f"{peer['tflite_bytes']:,}"
        if get("quicknet", "artifact", 1):
            a = get("quicknet", "artifact", 1)["latency_ms"]
            out["quicknet_vs_lce"] = f"{peer['lce_t2_b1_ms'] / a:.0f}x"
            out["quicknet_vs_keras"] = f"{peer['keras_b1_ms'] / a:.1f}x"
    size_file = d / "peer_quicknet_tflite_size.jsonl"
    if size_file.exists():
        peer = _latest(read(size_file))[-1]
        out["lce_tflite_random_bytes"] = f"{peer['tflite_bytes_random_stats']:,}"
        out["lce_tflite_initial_bytes"] = f"{peer['tflite_bytes_initial_stats']:,}"
        if get("quicknet", "artifact", 1):
            ratio = get("quicknet", "artifact", 1)["bytes"] / peer["tflite_bytes_random_stats"]
            out["quicknet_artifact_vs_tflite"] = f"{ratio:.4f}x"
    for dev, ms in LCE_PUBLISHED_MS.items():
        out["lce_published_" + dev.lower().replace(" ", "_")] = _ms(ms)
    rounds = _rounds(d) if (d / "train_seed000.jsonl").exists() else []
    if rounds:
        last = max(x["date"] for x in rounds)
        latest = [x for x in rounds if x["date"] == last]
        ratios = [x["bfloat16"] / statistics.mean(x["larq"]) for x in latest if "bfloat16" in x]
        out["train_ratio_median"] = f"{statistics.median(ratios):.2f}x"
        out["train_ratio_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}x"
        out["train_rounds"] = str(len(latest))
        out["train_bf16_mean"] = f"{statistics.mean(x['bfloat16'] for x in latest if 'bfloat16' in x):.2f} s"
        out["larq_epoch_mean"] = f"{statistics.mean(s for x in latest for s in x['larq']):.2f} s"
    k = {r["case"]: r for r in _latest(read(d / "kernels.jsonl"))} if (d / "kernels.jsonl").exists() else {}
    if "square_2048" in k:
        out["kernel_square_vs_f32"] = f"{k['square_2048']['packed_vs_f32']:.1f}x"
        out["kernel_square_vs_int8"] = f"{k['square_2048']['packed_vs_int8']:.1f}x"
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", help="result.json files (the runs table)")
    p.add_argument("--table", default="runs", choices=[*TABLES, "all"])
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--out-dir", type=Path, default=None, help="write <table>.md files here instead of printing")
    p.add_argument("--update-readme", nargs="?", type=Path, const=RESULTS.parent / "README.md", default=None,
                   help="rewrite the headline table of README.md (or of the file given)")
    a = p.parse_args(argv)
    if a.update_readme is not None:
        print(f"{a.update_readme}: {'updated' if update_readme(a.update_readme, a.results_dir) else 'up to date'}")
        return
    names = list(TABLES) if a.table == "all" else [a.table]
    for name in names:
        text = runs(a.results, a.results_dir) if name == "runs" else render(name, a.results_dir)
        if a.out_dir is None:
            print(text + ("\n" if len(names) > 1 else ""))
        else:
            a.out_dir.mkdir(parents=True, exist_ok=True)
            (a.out_dir / f"{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
