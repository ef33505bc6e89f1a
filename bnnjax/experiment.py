"""What every experiment script shares: flags from a config dataclass, and one ``run`` of the engine.

A script defines a frozen dataclass config (defaults = the seed/paper setting), a model, an optax
transform and ``train_and_evaluate(config, workdir)`` that calls :func:`run`; its ``main`` is
``cli(Config, train_and_evaluate)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from bnnjax import datasets, export, ops, packing, summary, train

__all__ = ["Config", "cli", "run", "load_data", "steps_per_epoch", "add_distributed_flags", "start_distributed",
           "fail"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Fields every experiment has; a script subclasses it, re-declaring defaults and adding its own.

    ``train_examples``/``test_examples`` slice the data (tests and quick looks); ``export`` packs the
    trained model and evaluates it packed; ``api`` picks the model family: Flax ``"linen"`` or ``"nnx"``.
    """

    dataset: str = "mnist"
    api: str = "linen"
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


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """``--coordinator-address``, ``--num-processes``, ``--process-id``: a multi-process run."""
    g = p.add_argument_group("several processes (hosts)", "give all three on a machine of your own; on a cluster "
                             "(SLURM, Open MPI, Kubernetes, TPU pods) JAX detects them")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="how many processes run this command")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")


_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def start_distributed(args: dict) -> None:
    """Join a multi-process run when the flags of :func:`add_distributed_flags` (popped from ``args``) ask
    for one, or when a cluster's launcher set its environment; else run as one process."""
    flags = [args.pop(k, None) for k in ("coordinator_address", "num_processes", "process_id")]
    if any(v is not None for v in flags):
        if any(v is None for v in flags):
            fail("--coordinator-address, --num-processes and --process-id go together: give all three.")
        train.initialize_distributed(*flags)
    elif any(int(os.environ.get(k, "1")) > 1 if k.endswith(("NTASKS", "SIZE")) else k in os.environ
             for k in _CLUSTER_ENV):
        train.initialize_distributed()


def fail(message: str):
    """Print ``error: message`` on stderr, without a traceback, and exit with status 2.

    After a lost peer the process exits at once: JAX's exit-time barrier with the dead process would
    only add a crash report to the message."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        sys.stdout.flush()
        os._exit(2)
    raise SystemExit(2)


def cli(config_cls, train_and_evaluate: Callable, argv=None, description: str | None = None):
    """Parse ``--field-name value`` flags for every field of ``config_cls`` plus ``--workdir`` and the
    multi-process flags (:func:`add_distributed_flags`).

    Booleans take ``--name`` / ``--no-name``; tuples take comma-separated values (``--hidden 512,512``).
    A data error (dataset missing or corrupt, download or checksum failure: ``datasets.DataError``), a
    checkpoint that does not fit, or a lost process of a multi-process run is printed as one line
    ``error: ...`` on stderr, without a traceback, and exits with status 2.
    """
    hints = typing.get_type_hints(config_cls)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", default=None, help="log.jsonl, checkpoints/, result.json go here")
    add_distributed_flags(p)
    for f in dataclasses.fields(config_cls):
        name = "--" + f.name.replace("_", "-")
        if hints.get(f.name) is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(name, type=_flag_type(f, hints), default=f.default)
    args = vars(p.parse_args(argv))
    if args.get("api", "linen") not in ("linen", "nnx"):
        fail(f"--api must be linen or nnx, not {args['api']!r}.")
    start_distributed(args)
    script = getattr(sys.modules.get(config_cls.__module__), "__file__", None) or config_cls.__module__
    workdir = args.pop("workdir") or f"runs/{Path(script).stem}"
    try:
        return train_and_evaluate(config_cls(**args), workdir)
    except (datasets.DataError, train.PeerLostError) as e:  # the message says the cause and the fix
        fail(str(e))
    except ValueError as e:
        if "checkpoint" not in str(e):
            raise
        fail(str(e))  # a workdir whose checkpoint does not fit this run: the message says what to do


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
    from flax import nnx

    api = getattr(config, "api", "linen")
    if api not in ("linen", "nnx"):
        raise ValueError(f"api must be 'linen' or 'nnx', got {api!r}.")
    if isinstance(model, nnx.Module) != (api == "nnx"):
        raise TypeError(f"config.api is {api!r} but the model is a {'Flax NNX' if isinstance(model, nnx.Module) else 'linen'} "
                        "module: build the model family the config names.")
    (x, y), (xt, yt) = data or load_data(config, scale, flatten)
    lead = jax.process_index() == 0  # one process prints and writes the results
    summary(model, x[:1], print_fn=print_fn if lead else None)
    state = train.create_train_state(model, tx, x[:1], seed=config.seed, params=params, batch_stats=batch_stats)
    t0 = time.perf_counter()
    state, hist = train.fit(state, (x, y), (xt, yt), epochs=config.epochs, batch_size=config.batch_size,
                            seed=config.seed, loss=loss, workdir=workdir,
                            progress=getattr(config, "progress", True),
                            log_fn=lambda row: print_fn(json.dumps(row)))
    result = {"experiment": name, "api": state.api, "dataset": config.dataset, "epochs": config.epochs,
              "test_accuracy": hist[-1]["test_accuracy"] if hist else None,
              "seconds": round(time.perf_counter() - t0, 2), "backend": jax.default_backend(),
              **(extra or {})}
    if jax.process_count() > 1:
        result["processes"] = jax.process_count()
    if jax.config.jax_default_matmul_precision is not None:
        result["matmul_precision"] = jax.config.jax_default_matmul_precision
    result["binary_gradients"] = ops.binary_gradient_precision()
    if getattr(config, "export", False):
        if state.api == "nnx":  # the packed model is a model; a linen model's are its variables
            model, variables = train.trained_model(state, model), None
            packed = export.pack(model, xt[:min(len(xt), 1000)])
            save = lambda path: export.save_artifact(path, packed, xt[:8])
        else:
            variables = {**state.extra_variables, "params": state.params, "batch_stats": state.batch_stats}
            packed = export.pack(model, variables, xt[:min(len(xt), 1000)])
            save = lambda path: export.save_artifact(path, model, packed, xt[:8])
        artifact = Path(workdir) / "model.stablehlo"
        if lead:
            result["packed_file_bytes"] = save(artifact)
        result["packed_variables_bytes"] = export.packed_bytes(packed)
        if lead:
            deployed = jax.jit(export.load_artifact(artifact).call,  # evaluated as deployed: the file alone
                               compiler_options=packing.compiler_options())
            pred_p = np.concatenate([np.asarray(deployed(xt[i:i + 1000])).argmax(-1)
                                     for i in range(0, len(xt), 1000)])
            apply = jax.jit(export._inference_fn(model, variables))
            pred_f = np.concatenate([np.asarray(apply(xt[i:i + 1000])).argmax(-1) for i in range(0, len(xt), 1000)])
            result["packed_test_accuracy"] = float(np.mean(pred_p == yt))
            result["predictions_identical"] = bool(np.array_equal(pred_p, pred_f))
    if not lead:
        return result
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "result.json").write_text(json.dumps(result) + "\n")
    print_fn(json.dumps(result))
    return result
