"""Result files: one JSON object per line, each with how, where and when it was measured.

Every line a benchmark or experiment writes under ``results/`` carries, next to its figures:

- ``command``: the command line that produced it (environment variables that change the result, such as
  ``JAX_DEFAULT_MATMUL_PRECISION`` or ``XLA_FLAGS``, in front);
- ``versions``: ``{"python", "jax", "jaxlib", "flax", "optax", ...}`` (a peer's lines name its own:
  ``tensorflow``, ``larq``, ``larq-zoo``, ``larq-compute-engine``);
- ``hardware``: CPU model, core count, the AVX-512 features the packed kernels use, and the JAX backend;
- ``date``: ``YYYY-MM-DD``.

Use from a script::

    from _results import append          # experiments/ is on sys.path when a script there runs
    append("results/kernels.jsonl", row)  # row + provenance, one line appended

``read(path)`` returns the rows of a file (blank lines skipped). A peer's line (printed in its own
virtualenv) is appended from the shell::

    PEER_COMMAND | python experiments/_results.py results/FILE.jsonl --command "PEER_COMMAND" \
        --set benchmark=train_quicknet_peer --set series=S --set round=1
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["provenance", "append", "read", "versions", "hardware", "current_command", "PROVENANCE_KEYS"]

PROVENANCE_KEYS = ("command", "versions", "hardware", "date")
_PACKAGES = ("jax", "jaxlib", "flax", "optax")
# environment variables that change what a run measures; recorded in front of the command
_ENV = ("JAX_DEFAULT_MATMUL_PRECISION", "XLA_FLAGS", "JAX_PLATFORMS", "GLIBC_TUNABLES", "TF_USE_LEGACY_KERAS",
        "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION")


def versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """``{"python": "3.x.y", package: version, ...}`` of the installed packages (missing ones left out)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cpuinfo() -> tuple[str, int, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, os.cpu_count() or 0, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, os.cpu_count() or 0, flags


def _backend() -> str:
    jax = sys.modules.get("jax")
    if jax is None:  # a script that never imported jax (a peer, a plotting step): do not start a backend
        return "jax not loaded"
    try:
        devices = jax.devices()
    except Exception as e:  # no usable backend
        return f"no jax backend ({type(e).__name__})"
    kinds = sorted({d.device_kind for d in devices})
    backend = jax.default_backend()
    if backend == "cpu":
        return f"jax backend cpu ({len(devices)} device{'s' if len(devices) != 1 else ''}), no GPU"
    return f"jax backend {backend}: {len(devices)} x {', '.join(kinds)}"


def hardware() -> str:
    """E.g. ``"AMD EPYC, 2 cores, x86_64, AVX-512 (avx512f) with VPOPCNTDQ, jax backend cpu (1 device), no GPU"``."""
    model, cores, flags = _cpuinfo()
    parts = [model, f"{cores} cores", platform.machine()]
    if "avx512f" in flags:
        parts.append("AVX-512 (avx512f)" + (" with VPOPCNTDQ" if "avx512_vpopcntdq" in flags else ", no VPOPCNTDQ"))
    elif flags:
        parts.append("no AVX-512")
    parts.append(_backend())
    return ", ".join(parts)


def current_command() -> str:
    """This process's command line as one would type it: ``[VAR=value ...] python script args``."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in _ENV if k in os.environ]
    argv = list(sys.argv) or ["python"]
    script = argv[0]
    try:  # relative to the working directory when the script lies below it
        script = os.path.relpath(script) if not os.path.relpath(script).startswith("..") else script
    except ValueError:
        pass
    return " ".join(env + ["python", shlex.join([script] + argv[1:])]).strip()


def provenance(command: str, *, extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"command", "versions", "hardware", "date"}`` for a row measured now by ``command``.

    Args:
      command: the command line that produced the row (see :func:`current_command`).
      extra_versions: more package versions to record (a peer's ``tensorflow``, ``larq``, ...).
    """
    return {"command": command, "versions": {**versions(), **(extra_versions or {})}, "hardware": hardware(),
            "date": datetime.date.today().isoformat()}


def append(path: str | os.PathLike, row: dict, *, command: str | None = None) -> dict:
    """Append ``row`` plus its provenance as one JSON line to ``path`` (created with its folder); returns
    the line written. Keys already in ``row`` win (a row that names its own ``command`` keeps it)."""
    full = {**row, **{k: v for k, v in provenance(command or row.get("command") or current_command()).items()
                      if k not in row}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(full) + "\n")
    return full


def read(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv=None) -> None:
    """Append the last JSON line on standard input to a results file, with ``--set KEY=VALUE`` pairs
    (JSON values where they parse) and the given command; the peer's own ``versions`` are kept."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--command", required=True, help="the command line that printed the line")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    lines = [line for line in sys.stdin.read().splitlines() if line.strip().startswith("{")]
    if not lines:
        raise SystemExit("error: no JSON line on standard input; run the peer command and pipe its output here")
    row = json.loads(lines[-1])
    for kv in a.set:
        key, _, value = kv.partition("=")
        try:
            row[key] = json.loads(value)
        except json.JSONDecodeError:
            row[key] = value
    peer_versions = {k: row.pop(k) for k in ("larq", "larq-zoo", "larq-compute-engine", "tensorflow", "tensorflow-cpu",
                                             "tf-keras") if isinstance(row.get(k), str)}
    # only the versions the peer names (or --set gives): this process's jax and flax are not the peer's
    row["versions"] = {**(row.get("versions") if isinstance(row.get("versions"), dict) else {}), **peer_versions}
    print(json.dumps(append(a.path, row, command=a.command)))


if __name__ == "__main__":
    main()
