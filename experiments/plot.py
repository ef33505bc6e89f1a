"""Plot loss and accuracy curves of one or more JSON-lines training logs to a PNG.

    python experiments/plot.py runs/larq_tutorial/log.jsonl runs/xnornet/log.jsonl -o curves.png
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty log.")
    return rows


def plot(paths, out, labels=None):
    """Two panels (loss, accuracy) with train and test curves for every log; returns ``out``."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, path in enumerate(paths):
        rows = read_log(path)
        label = labels[i] if labels else Path(path).parent.name
        epochs = [r["epoch"] for r in rows]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            line, = ax.plot(epochs, [r[f"train_{key}"] for r in rows], label=f"{label} train")
            if "test_" + key in rows[0]:
                ax.plot(epochs, [r[f"test_{key}"] for r in rows], "--", color=line.get_color(), label=f"{label} test")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+")
    p.add_argument("-o", "--out", default="curves.png")
    p.add_argument("--labels", default=None, help="comma-separated, one per log")
    a = p.parse_args(argv)
    print(plot(a.logs, a.out, a.labels.split(",") if a.labels else None))


if __name__ == "__main__":
    main()
