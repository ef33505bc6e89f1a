"""What every experiment script shares: flags from a config dataclass, and one ``run`` of the engine.

A script defines a frozen dataclass config (defaults = the seed/paper setting), a model, an optax
transform and ``train_and_evaluate(config, workdir)`` that calls :func:`run`; its ``main`` is
``cli(Config, train_and_evaluate)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from bnnjax import datasets, export, ops, summary, train

__all__ = ["Config", "cli", "run", "load_data", "steps_per_epoch"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Fields every experiment has; a script subclasses it, re-declaring defaults and adding its own.

    ``train_examples``/``test_examples`` slice the data (tests and quick looks); ``export`` packs the
    trained model and evaluates it packed.
    """

    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    export: bool = False
    progress: bool = True
    train_examples: int | None = None
    test_examples: int | None = None


def _flag_type(field, hints):
    t = hints.get(field.name, str)
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if args else str
    if typing.get_origin(t) is tuple:
        inner = typing.get_args(t)[0]
        return lambda s: tuple(inner(v) for v in s.split(",") if v)
    return t


def cli(config_cls, train_and_evaluate: Callable, argv=None, description: str | None = None):
    """Parse ``--field-name value`` flags for every field of ``config_cls`` plus ``--workdir``.

    Booleans take ``--name`` / ``--no-name``; tuples take comma-separated values (``--hidden 512,512``).
    A data error (dataset missing or corrupt, download or checksum failure: ``datasets.DataError``) is
    printed as one line ``error: ...`` on stderr, without a traceback, and exits with status 2.
    """
    hints = typing.get_type_hints(config_cls)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default=None, help="log.jsonl, checkpoints/, result.json go here")
    for f in dataclasses.fields(config_cls):
        name = "--" + f.name.replace("_", "-")
        if hints.get(f.name) is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(name, type=_flag_type(f, hints), default=f.default)
    args = vars(p.parse_args(argv))
    script = getattr(sys.modules.get(config_cls.__module__), "__file__", None) or config_cls.__module__
    workdir = args.pop("workdir") or f"runs/{Path(script).stem}"
    try:
        return train_and_evaluate(config_cls(**args), workdir)
    except datasets.DataError as e:  # the message already says the cause and the fix; a traceback hides it
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def load_data(config, scale: str = "[-1, 1]", flatten: bool = False):
    """Train and test arrays of ``config.dataset`` (sliced by ``train_examples``/``test_examples``)."""
    out = []
    for split, limit in (("train", getattr(config, "train_examples", None)),
                         ("test", getattr(config, "test_examples", None))):
        x, y = datasets.load_dataset(config.dataset, split, getattr(config, "data_dir", None),
                                     progress=getattr(config, "progress", True))
        if limit:
            x, y = x[:limit], y[:limit]
        out.append((datasets.preprocess(x, scale, flatten), y))
    return out


def steps_per_epoch(config, n_train: int) -> int:
    return -(-n_train // config.batch_size)


def run(name: str, model, tx, config, workdir, data=None, *, loss="cross_entropy", params=None, batch_stats=None,
        scale: str = "[-1, 1]", flatten: bool = False, extra: dict | None = None,
        print_fn: Callable[[str], Any] = print) -> dict:
    """Summary, ``fit`` (progress bar, log, checkpoints, resume), optional packed export, result line.

    Returns the result dict (also written to ``workdir/result.json`` and printed as one JSON line):
    ``experiment``, ``dataset``, ``epochs``, ``test_accuracy``, ``seconds`` (training wall time of
    this invocation) and, with ``config.export``, ``packed_test_accuracy`` (of the exported StableHLO file
    ``model.stablehlo``), ``predictions_identical`` (with the float model), ``packed_file_bytes``,
    ``packed_variables_bytes``.
    """
    (x, y), (xt, yt) = data or load_data(config, scale, flatten)
    summary(model, x[:1], print_fn=print_fn)
    state = train.create_train_state(model, tx, x[:1], seed=config.seed, params=params, batch_stats=batch_stats)
    t0 = time.perf_counter()
    state, hist = train.fit(state, (x, y), (xt, yt), epochs=config.epochs, batch_size=config.batch_size,
                            seed=config.seed, loss=loss, workdir=workdir,
                            progress=getattr(config, "progress", True),
                            log_fn=lambda row: print_fn(json.dumps(row)))
    result = {"experiment": name, "dataset": config.dataset, "epochs": config.epochs,
              "test_accuracy": hist[-1]["test_accuracy"] if hist else None,
              "seconds": round(time.perf_counter() - t0, 2), "backend": jax.default_backend(),
              **(extra or {})}
    if jax.config.jax_default_matmul_precision is not None:
        result["matmul_precision"] = jax.config.jax_default_matmul_precision
    result["binary_gradients"] = ops.binary_gradient_precision()
    if getattr(config, "export", False):
        variables = {**state.extra_variables, "params": state.params, "batch_stats": state.batch_stats}
        packed = export.pack(model, variables, xt[:min(len(xt), 1000)])
        artifact = Path(workdir) / "model.stablehlo"
        result["packed_file_bytes"] = export.save_artifact(artifact, model, packed, xt[:8])
        result["packed_variables_bytes"] = export.packed_bytes(packed)
        deployed = export.load_artifact(artifact)  # evaluated as deployed: the file alone
        pred_p = np.concatenate([np.asarray(deployed.call(xt[i:i + 1000])).argmax(-1) for i in range(0, len(xt), 1000)])
        apply = jax.jit(lambda a: model.apply(variables, a))
        pred_f = np.concatenate([np.asarray(apply(xt[i:i + 1000])).argmax(-1) for i in range(0, len(xt), 1000)])
        result["packed_test_accuracy"] = float(np.mean(pred_p == yt))
        result["predictions_identical"] = bool(np.array_equal(pred_p, pred_f))
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "result.json").write_text(json.dumps(result) + "\n")
    print_fn(json.dumps(result))
    return result
