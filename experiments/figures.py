"""Draw the documentation's figures from the files under results/ (PNG, docs/_static/figures/).

    python experiments/figures.py [--results-dir results] [--out-dir docs/_static/figures]

- ``curves_seed000.png``: seed 000's train and test accuracy per epoch (``results/larq_tutorial_*/log.jsonl``,
  bfloat16 and float32 gradient operands, three seeds each) beside Larq's 6-epoch run
  (``peer_larq_seed000.jsonl``);
- ``curves_experiments.png``: test accuracy per epoch of every other logged experiment run;
- ``inference_quicknet.png``: QuickNet's batch-1 latency per bnnjax path beside Keras/Larq and LCE
  (``inference_quicknet.jsonl``, ``peer_quicknet_inference.jsonl``; LCE's published ARM figures marked);
- ``inference_seed000.png``: seed 000's throughput per path at batch 1000 (``inference_seed000.jsonl``);
- ``training_time.png``: seconds per epoch, bnnjax beside Larq, round by round (``train_seed000.jsonl``,
  ``peer_larq_seed000.jsonl``);
- ``kernels.png``: the packed XNOR-popcount matmul's speed-up over float32 and int8 dots (``kernels.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_table as rt  # noqa: E402
from _results import read  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "_static" / "figures"
PNG = {"dpi": 110, "metadata": {"Software": None}}  # no version stamp: a rerun on the same data is the same file
COLORS = {"bfloat16": "#1f77b4", "float32": "#2ca02c", "larq": "#444444", "lce": "#d62728"}


def _save(fig, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, **PNG)
    plt.close(fig)
    return path


def curves_seed000(results_dir: Path, out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for kind, pattern, style in (("bfloat16", "larq_tutorial_s*", "-"), ("float32", "larq_tutorial_f32_s*", "--")):
        for i, log in enumerate(sorted(results_dir.glob(f"{pattern}/log.jsonl"))):
            rows = read(log)
            epochs = [r["epoch"] for r in rows]
            label = f"bnnjax, {kind} gradients" if i == 0 else None
            for ax, key in zip(axes, ("train_accuracy", "test_accuracy")):
                ax.plot(epochs, [100 * r[key] for r in rows], style, color=COLORS[kind], alpha=0.8, label=label,
                        marker="o", markersize=3)
    peer_file = results_dir / "peer_larq_seed000.jsonl"
    if peer_file.exists():
        longest = max(read(peer_file), key=lambda r: len(r["epochs"]))
        axes[1].plot([e["epoch"] for e in longest["epochs"]], [100 * e["test_accuracy"] for e in longest["epochs"]],
                     ":", color=COLORS["larq"], marker="s", markersize=3,
                     label=f"Larq {longest['versions'].get('larq', '')}")
    for ax, title in zip(axes, ("training accuracy", "test accuracy")):
        ax.set_title(f"seed 000 on Fashion-MNIST: {title}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    return _save(fig, out_dir, "curves_seed000.png")


def curves_experiments(results_dir: Path, out_dir: Path) -> Path:
    groups = {"BinaryConnect / BinaryNet MLPs": ("bc_", "binarynet"), "Larq report BNN (seed 001)": ("larq_report",),
              "XNOR-Net CNN, Bi-Real nets": ("xnornet", "birealnet")}
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(14, 3.6))
    for ax, (title, prefixes) in zip(axes, groups.items()):
        for log in sorted(results_dir.glob("*/log.jsonl")):
            run = log.parent.name
            if not run.startswith(prefixes):
                continue
            rows = [r for r in read(log) if "test_accuracy" in r]
            ax.plot([r["epoch"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="o", markersize=3,
                    label=run)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy (%)")
    # ABC-Net: one fine-tuning epoch per (M weight bases, N activation bases), beside the float CNN
    ax = axes[-1]
    sweep = {}
    for p in results_dir.glob("abcnet-*/result.json"):
        r = json.loads(p.read_text())
        if "num_weight_bases" in r:
            sweep[(r["num_weight_bases"], r["num_act_bases"])] = 100 * r["test_accuracy"]
        else:
            ax.axhline(100 * r["test_accuracy"], color=COLORS["larq"], linestyle="--", linewidth=1,
                       label="float CNN")
    ms, ns = sorted({m for m, _ in sweep}), sorted({n for _, n in sweep})
    width = 0.8 / max(len(ns), 1)
    for j, n in enumerate(ns):
        ax.bar([i + (j - (len(ns) - 1) / 2) * width for i in range(len(ms))], [sweep.get((m, n), 0) for m in ms],
               width, label=f"N = {n}")
    ax.set_xticks(range(len(ms)), [f"M = {m}" for m in ms])
    low = min(sweep.values()) if sweep else 0
    ax.set_ylim(low - 5, 100 if not sweep else max(sweep.values()) + 4)
    ax.set_title("ABC-Net: M x N bases after 1 fine-tuning epoch", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir, "curves_experiments.png")


def inference_quicknet(results_dir: Path, out_dir: Path) -> Path:
    ours = rt._quicknet_b1(results_dir)
    bars = [(f"bnnjax {p}", ms, COLORS["bfloat16"]) for p, ms in ours.items()]
    peer_file = results_dir / "peer_quicknet_inference.jsonl"
    if peer_file.exists():
        peer = rt._latest(read(peer_file))[-1]
        bars += [("Keras / Larq float", peer["keras_b1_ms"], COLORS["larq"]),
                 ("LCE x86, 1 thread", peer["lce_t1_b1_ms"], COLORS["lce"]),
                 ("LCE x86, 2 threads", peer["lce_t2_b1_ms"], COLORS["lce"])]
    published = [(f"LCE {dev} (published)", ms, "white") for dev, ms in rt.LCE_PUBLISHED_MS.items()]
    bars += published
    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    colors = [b[2] for b in bars][::-1]
    ax.barh(names, values, color=colors, edgecolor="#333333")
    for y, v in enumerate(values):
        ax.text(v * 1.05, y, rt._ms(v), va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 1.5, max(values) * 3)
    ax.set_xlabel("QuickNet, batch 1, 224x224: latency (ms, log scale; white bars: LCE's published ARM figures)")
    ax.grid(axis="x", alpha=0.3, which="both")
    return _save(fig, out_dir, "inference_quicknet.png")


def inference_seed000(results_dir: Path, out_dir: Path) -> Path:
    rows = {r["path"]: r for r in rt._inference_rows(results_dir) if r["model"] == "seed000" and r["batch"] > 1}
    paths = [p for p in rt.PATHS if p in rows]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    values = [rows[p]["img_s"] / 1000 for p in paths]
    ax.bar(paths, values, color=COLORS["bfloat16"], edgecolor="#333333")
    for x, v in enumerate(values):
        ax.text(x, v * 1.02, f"{v:.1f}k", ha="center", fontsize=8)
    batch = rows[paths[0]]["batch"] if paths else ""
    ax.set_ylabel(f"thousand images/s (batch {batch})")
    ax.set_title("seed 000 inference throughput by path", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_dir, "inference_seed000.png")


def training_time(results_dir: Path, out_dir: Path) -> Path:
    rounds = rt._rounds(results_dir)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.27
    for i, x in enumerate(rounds):
        for j, (key, color, label) in enumerate((("bfloat16", COLORS["bfloat16"], "bnnjax, bfloat16 gradients"),
                                                 ("float32", COLORS["float32"], "bnnjax, float32 gradients"))):
            if key in x:
                ax.bar(i + (j - 1) * width, x[key], width, color=color, label=label if i == 0 else None)
        mean = sum(x["larq"]) / len(x["larq"])
        ax.bar(i + width, mean, width, color=COLORS["larq"], label="Larq, mean epoch" if i == 0 else None)
        ax.plot([i + width] * len(x["larq"]), x["larq"], "o", color="#999999", markersize=3,
                label="Larq, each epoch" if i == 0 else None)
    ax.set_xticks(range(len(rounds)), [f"{x['series']}{x['round']}" for x in rounds])
    ax.set_xlabel("round (bnnjax and Larq timed one after the other)")
    ax.set_ylabel("seconds per epoch")
    ax.set_title("seed 000 on Fashion-MNIST, batch 64, Adam: training time per epoch", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    ax.set_ylim(0, max(max(x["larq"]) for x in rounds) * 1.3 if rounds else 1)
    return _save(fig, out_dir, "training_time.png")


def kernels(results_dir: Path, out_dir: Path) -> Path:
    rows = rt._latest(read(results_dir / "kernels.jsonl"))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    names = [rt.KERNEL_CASES.get(r["case"], r["case"]) for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["packed_vs_f32"] for r in rows], 0.4, label="vs float32 dot",
           color=COLORS["bfloat16"])
    ax.bar([x + 0.2 for x in xs], [r["packed_vs_int8"] for r in rows], 0.4, label="vs XLA int8 dot",
           color=COLORS["float32"])
    ax.axhline(1, color="#333333", linewidth=0.8)
    ax.set_xticks(list(xs), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("speed-up of the packed matmul")
    ax.set_title("XNOR-popcount matmul on packed bits (exact: equal to the float32 result)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "kernels.png")


FIGURES = (curves_seed000, curves_experiments, inference_quicknet, inference_seed000, training_time, kernels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=ROOT / "results")
    p.add_argument("--out-dir", type=Path, default=OUT)
    a = p.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for fig in FIGURES:
        print(fig(a.results_dir, a.out_dir))


if __name__ == "__main__":
    main()
