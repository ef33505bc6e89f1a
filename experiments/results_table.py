"""Print the README's results table (markdown) from experiments' result.json and log.jsonl files.

    python experiments/results_table.py results/*/result.json
"""
import argparse
import json
from pathlib import Path

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


def describe(r):
    bits = [f"{k}={r[k]}" for k in ("mode", "optimizer", "input_scale", "hidden", "stage_sizes", "width",
                                     "num_weight_bases", "num_act_bases", "matmul_precision", "binary_gradients") if k in r]
    return ", ".join(str(b) for b in bits)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    a = p.parse_args(argv)
    print("| run | experiment | setting | dataset | epochs | published | test acc. | packed acc. (identical) "
          "| train s | s/epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in a.results:
        r = json.loads(Path(path).read_text())
        log = Path(path).with_name("log.jsonl")
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        per_epoch = sum(x["epoch_seconds"] for x in rows) / len(rows) if rows else float("nan")
        packed = (f"{100 * r['packed_test_accuracy']:.2f} % ({r['predictions_identical']})"
                  if "packed_test_accuracy" in r else "-")
        print(f"| {Path(path).parent.name} | {r['experiment']} | {describe(r)} | {r['dataset']} | {r['epochs']} "
              f"| {PUBLISHED.get(r['experiment'], '-')} | {100 * r['test_accuracy']:.2f} % | {packed} "
              f"| {r['seconds']:.0f} | {per_epoch:.1f} |")


if __name__ == "__main__":
    main()
