"""Run compile_iree's aarch64 modules (rpi4, apple-m1) under qemu-user and check them against the x86 outputs.

For each model (seed 000's LarqTutorialCNN on 28x28x1, QuickNet on 224x224x3; random weights with
random BatchNorm statistics) the packed model (``bnnjax.export.pack``) is run on x86 by jax
(``jax.jit(lambda a: model.apply(packed, a))``) and by IREE compiled for this host; then
``bnnjax.export.compile_iree(..., target=T)`` cross-compiles it for each aarch64 target ``T``, and
IREE's aarch64 ``iree-run-module`` (from the ``iree-base-runtime`` wheel of the installed compiler's
version, fetched with ``pip download`` into ``--cache-dir``) runs the module under
``qemu-aarch64``. The emulated CPU is the target's: ``cortex-a72`` for ``rpi4`` (the Raspberry Pi
4's core; an instruction it lacks would stop the run with SIGILL), ``max`` for ``apple-m1`` (qemu has
no M1 model; ``max`` implements a superset of its features). A module for another target is also
tried on a Cortex-A72 (``runs_on_cortex_a72``).

compile_iree links IREE's ``embedded-elf`` executables (OS-independent ELF code loaded by IREE's own
loader), so the ``arm64-apple-darwin`` module is not Mach-O and Linux's aarch64 runtime can run it;
a module holding a platform library (``system-dylib``) is reported compiled but not executed.

Prints one JSON line per (model, target): ``argmax_identical`` (each image's predicted class equals
jax's on x86; ``argmax_identical_iree_x86``: equals x86 IREE's), ``max_abs_diff`` (largest
``|aarch64 - x86 jax|`` over all outputs; ``..._iree_x86``: against x86 IREE), ``max_abs_output``
(scale of the outputs), ``distinct_predictions`` (classes predicted: the check is not
degenerate), ``vmfb_bytes``, ``executable_format``, ``qemu_command`` (relative to ``workdir``) and the
IREE versions. ``qemu_wall_s`` is the emulated run's wall time: it says nothing about a device's
speed.

A missing prerequisite prints one ``error: ...`` line naming it and its installation, exit status 2:

    apt-get install qemu-user libc6-arm64-cross libstdc++6-arm64-cross
    python experiments/check_arm.py [--models seed000,quicknet] [--targets rpi4,apple-m1]
    python experiments/check_arm.py --fetch-only     # only put the aarch64 runtime in the cache
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta, unfreeze

import bnnjax
from bnnjax import export, layers, zoo

QEMU_CPU = {"rpi4": "cortex-a72", "apple-m1": "max"}  # the emulated CPU of each aarch64 target
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
WHEEL_TOOL = "iree/_runtime_libs/iree-run-module"
WHEEL_VERSION = "iree/_runtime_libs/version.py"
APT_QEMU = "apt-get install qemu-user (or qemu-user-static)"
APT_LIBS = "apt-get install libc6-arm64-cross libstdc++6-arm64-cross"


class Missing(Exception):
    """A prerequisite is absent; the message names it and how to install it."""


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("seed000", "quicknet")
    targets: tuple[str, ...] = ("rpi4", "apple-m1")
    seed000_images: int = 8
    quicknet_images: int = 4
    seed: int = 0
    runtime: str | None = None  # an aarch64 iree-run-module; default: the cached one (fetched if absent)
    cache_dir: str = "~/.cache/bnnjax/iree-aarch64"
    fetch: bool = True  # pip download the runtime wheel when it is not cached
    qemu: str | None = None  # default: qemu-aarch64 (or qemu-aarch64-static) on PATH
    sysroot: str | None = None  # arm64 libraries; default: /usr/aarch64-linux-gnu (Debian cross) or / (multiarch)
    device: str = "local-task"
    workdir: str | None = None  # keep the .vmfb and .npy files in WORKDIR/MODEL (default: a temporary directory)
    timeout_s: float = 3600.0  # per emulated run


@dataclasses.dataclass(frozen=True)
class Tools:
    qemu: str
    sysroot: str | None  # None: the host's own /lib holds the arm64 loader (multiarch), no -L
    runtime: str
    iree: dict

    def command(self, cpu: str, *args: str) -> list[str]:
        prefix = [] if self.sysroot is None else ["-L", self.sysroot]
        return [self.qemu, "-cpu", cpu, *prefix, self.runtime, *args]


# --- prerequisites -------------------------------------------------------------------------------

def _revision(version_py: str) -> str | None:
    m = re.search(r'"IREE":\s*"([0-9a-f]+)"', version_py)
    return m.group(1) if m else None


def iree_compiler() -> dict:
    """The installed IREE compiler's version and source revision."""
    try:
        from iree.compiler import version
        v = importlib.metadata.version("iree-base-compiler")
    except (ImportError, importlib.metadata.PackageNotFoundError) as e:
        raise Missing("the IREE compiler is not installed: pip install 'bnnjax[iree]' "
                      "(iree-base-compiler, iree-base-runtime)") from e
    return {"version": v, "revision": getattr(version, "REVISIONS", {}).get("IREE")}


def _pip_download_args(version: str, dest: str) -> list[str]:
    return ["-m", "pip", "download", f"iree-base-runtime=={version}", "--platform", WHEEL_PLATFORM,
            "--only-binary=:all:", "--no-deps", "-d", dest]


def fetch_runtime(version: str, dest: Path) -> None:
    """``pip download`` the aarch64 ``iree-base-runtime`` wheel and unpack its ``iree-run-module`` (and
    ``version.py``) into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, *_pip_download_args(version, tmp), "--quiet", "--disable-pip-version-check"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("iree_base_runtime-*.whl"))
        if r.returncode != 0 or not wheels:
            why = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise Missing(f"could not fetch IREE's aarch64 runtime ({why}); fetch it by hand: "
                          f"python3 {shlex.join(_pip_download_args(version, 'DIR'))}, unzip DIR/*.whl and pass "
                          f"--runtime DIR/{WHEEL_TOOL}")
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        with zipfile.ZipFile(wheels[0]) as z:
            if WHEEL_TOOL not in z.namelist():
                raise Missing(f"{wheels[0].name} holds no {WHEEL_TOOL}; pass --runtime PATH to an aarch64 "
                              "iree-run-module")
            (staging / "iree-run-module").write_bytes(z.read(WHEEL_TOOL))
            if WHEEL_VERSION in z.namelist():
                (staging / "version.py").write_bytes(z.read(WHEEL_VERSION))
        (staging / "iree-run-module").chmod(0o755)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(staging), str(dest))
        except OSError as e:
            raise Missing(f"cannot write IREE's aarch64 runtime to {dest} ({e}): pass --cache-dir DIR") from e


def runtime_tool(config: Config, compiler: dict) -> tuple[str, dict]:
    """The aarch64 ``iree-run-module`` (``config.runtime``, or the cache's, fetched when absent and
    ``config.fetch``) and its version."""
    if config.runtime:
        tool = Path(config.runtime).expanduser()
        if not (tool.is_file() and os.access(tool, os.X_OK)):
            raise Missing(f"--runtime {config.runtime}: no such executable (an aarch64 iree-run-module, "
                          f"from the iree-base-runtime {WHEEL_PLATFORM} wheel's {WHEEL_TOOL})")
    else:
        tool = Path(config.cache_dir).expanduser() / compiler["version"] / "iree-run-module"
        if not tool.is_file():
            if not config.fetch:
                cache = "" if config.cache_dir == Config.cache_dir else f" --cache-dir {shlex.quote(config.cache_dir)}"
                raise Missing(f"IREE's aarch64 runtime is not in {tool.parent}: python3 experiments/check_arm.py "
                              f"--fetch-only{cache} (runs pip download iree-base-runtime=={compiler['version']} "
                              f"--platform {WHEEL_PLATFORM} --only-binary=:all: --no-deps), or pass --runtime PATH")
            fetch_runtime(compiler["version"], tool.parent)
    version_py = tool.parent / "version.py"
    text = version_py.read_text() if version_py.is_file() else ""
    m = re.search(r'VERSION\s*=\s*"([^"]+)"', text)
    info = {"version": m.group(1) if m else None, "revision": _revision(text)}
    if info["revision"] and compiler["revision"] and info["revision"] != compiler["revision"]:
        raise Missing(f"the aarch64 runtime {tool} is IREE revision {info['revision'][:12]}, the compiler "
                      f"{compiler['revision'][:12]}: use iree-base-runtime=={compiler['version']} (delete "
                      f"{tool.parent} to refetch)")
    return str(tool), info


def find_qemu(config: Config) -> str:
    names = [config.qemu] if config.qemu else ["qemu-aarch64", "qemu-aarch64-static"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise Missing(f"{' / '.join(names)} not found (user-mode aarch64 emulator): {APT_QEMU}")


def find_sysroot(config: Config) -> str | None:
    """The prefix qemu's ``-L`` needs for the arm64 loader and C/C++ libraries (None: the host's /)."""
    roots = [config.sysroot] if config.sysroot else ["/usr/aarch64-linux-gnu", "/"]
    for root in roots:
        r = Path(root)
        loader = r / "lib" / "ld-linux-aarch64.so.1"
        cxx = [r / "lib" / "libstdc++.so.6", r / "usr" / "lib" / "aarch64-linux-gnu" / "libstdc++.so.6"]
        if loader.exists() and any(p.exists() for p in cxx):
            return None if r.resolve() == Path("/") else str(r)
    raise Missing(f"no arm64 C/C++ libraries for qemu (ld-linux-aarch64.so.1 and libstdc++.so.6 under "
                  f"{' or '.join(roots)}): {APT_LIBS}")


def prerequisites(config: Config) -> Tools:
    """qemu, the arm64 libraries and IREE's aarch64 runtime, checked by starting the runtime once.

    Raises:
      Missing: one is absent (the message says how to install it).
    """
    unknown = sorted(set(config.targets) - set(QEMU_CPU))
    if unknown:
        raise ValueError(f"targets {unknown} are not aarch64 targets; choose from {sorted(QEMU_CPU)}.")
    compiler = iree_compiler()
    qemu = find_qemu(config)
    sysroot = find_sysroot(config)
    runtime, runtime_info = runtime_tool(config, compiler)
    tools = Tools(qemu, sysroot, runtime, {"compiler": compiler, "runtime_aarch64": runtime_info})
    r = subprocess.run(tools.command("cortex-a72", "--help"), capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        why = ((r.stderr or r.stdout).strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise Missing(f"{runtime} does not start under {qemu} ({why}): {APT_LIBS}")
    return tools


# --- models --------------------------------------------------------------------------------------

def random_batch_stats(batch_stats, rng: np.random.Generator):
    """Running means and variances drawn from U(0.5, 2), as bench_inference.py does."""
    return jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype), batch_stats)


def _centre_head(model, variables, x):
    """Set the last QuantDense's bias to ``-mean(input) @ kernel`` over the batch ``x``.

    QuickNet's head averages ReLU features: with random weights that input is nearly one positive
    vector for every image, and one class wins everywhere, which makes an argmax check empty.
    Centring it keeps the network random but lets the predicted class depend on the image.
    """
    def head_inputs(v, a):
        seen = {}

        def record(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, layers.QuantDense):
                seen["/".join(context.module.path)] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(v, a)
        return seen

    seen = jax.jit(head_inputs)(variables, x)
    path = list(seen)[-1].split("/")
    params = unfreeze(variables["params"])  # nested dicts copied, leaves shared
    dense = params
    for key in path:
        dense = dense[key]
    kernel = np.asarray(meta.unbox(dense["kernel"]))
    dense["bias"] = jnp.asarray(-(np.asarray(seen["/".join(path)]).mean(0) @ kernel), jnp.float32)
    return {**variables, "params": params}


def seed000(config: Config):
    model = bnnjax.models.LarqTutorialCNN()
    rng = np.random.default_rng(config.seed + 1)
    x = jnp.asarray(rng.uniform(-1, 1, (config.seed000_images, 28, 28, 1)).astype(np.float32))
    variables = model.init(jax.random.key(config.seed), x[:1])
    return model, {**variables, "batch_stats": random_batch_stats(variables["batch_stats"], rng)}, x


def quicknet(config: Config):
    model, variables = zoo.load("QuickNet", weights=None, classifier_activation=None, seed=config.seed)
    rng = np.random.default_rng(config.seed + 1)
    x = jnp.asarray(rng.uniform(-2, 2, (config.quicknet_images, 224, 224, 3)).astype(np.float32))
    variables = {**variables, "batch_stats": random_batch_stats(variables["batch_stats"], rng)}
    return model, _centre_head(model, variables, x), x


MODELS = {"seed000": seed000, "quicknet": quicknet}


# --- the check -----------------------------------------------------------------------------------

def executable_format(vmfb: bytes) -> str | None:
    """The HAL executable format named in an IREE module (``embedded-elf-arm_64``, ``system-dylib-...``)."""
    m = re.search(rb"(?:embedded-elf|system-dylib|system-elf)-[a-z0-9_]+", vmfb)
    return m.group(0).decode() if m else None


def _failure(r: subprocess.CompletedProcess) -> str:
    if r.returncode < 0:
        try:
            return f"killed by {signal.Signals(-r.returncode).name}"
        except ValueError:
            return f"killed by signal {-r.returncode}"
    lines = (r.stderr or r.stdout).strip().splitlines()
    return f"exit status {r.returncode}: {lines[-1] if lines else ''}"


def run_module(tools: Tools, cpu: str, workdir: Path, module: str, device: str, timeout_s: float):
    """Run ``module``'s ``main`` on ``workdir/input.npy`` under qemu; ``(output or None, failure or
    None, command, seconds)``."""
    out = workdir / f"{Path(module).stem}.out.npy"
    out.unlink(missing_ok=True)
    cmd = tools.command(cpu, f"--device={device}", f"--module={module}", "--function=main",
                        "--input=@input.npy", f"--output=@{out.name}")
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s} s", cmd, time.perf_counter() - t
    seconds = time.perf_counter() - t
    if r.returncode != 0 or not out.exists():
        return None, _failure(r), cmd, seconds
    return np.load(out), None, cmd, seconds


def check_model(name: str, config: Config, tools: Tools, workdir: str | os.PathLike) -> list[dict]:
    """Check ``name`` on each of ``config.targets``; one row per target."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, variables, x = MODELS[name](config)
    packed = export.pack(model, variables, x[:1])
    want = np.asarray(jax.jit(lambda a: model.apply(packed, a))(x))
    iree_x86 = export.load_iree(export.compile_iree(model, packed, x, target="host"))(x)
    np.save(workdir / "input.npy", np.asarray(x, np.float32))
    rows = []
    for target in config.targets:
        module = f"{name}-{target}.vmfb"
        vmfb = export.compile_iree(model, packed, x, target=target, path=workdir / module)
        fmt = executable_format(vmfb)
        row = {"model": name, "target": target, "triple": _flag(target, "triple"), "cpu": _flag(target, "cpu"),
               "images": int(x.shape[0]), "vmfb_bytes": len(vmfb), "executable_format": fmt,
               "qemu_cpu": QEMU_CPU[target]}
        if not (fmt or "").startswith("embedded-elf-arm_64"):
            rows.append({**row, "executed": False, "argmax_identical": None,
                         "reason": f"the module's executables are {fmt}, not IREE's embedded ELF: only that "
                                   "platform's loader runs them"})
            continue
        got, failure, cmd, seconds = run_module(tools, QEMU_CPU[target], workdir, module, config.device,
                                                config.timeout_s)
        row.update(executed=got is not None, qemu_command=shlex.join(cmd), qemu_wall_s=round(seconds, 1))
        if got is None or got.shape != want.shape:
            row.update(argmax_identical=False, failure=failure or f"output shape {got.shape} != {want.shape}")
        else:
            row.update(argmax_identical=bool(np.array_equal(got.argmax(-1), want.argmax(-1))),
                       argmax_identical_iree_x86=bool(np.array_equal(got.argmax(-1), iree_x86.argmax(-1))),
                       max_abs_diff=float(np.abs(got - want).max()),
                       max_abs_diff_iree_x86=float(np.abs(got - iree_x86).max()),
                       max_abs_output=float(np.abs(want).max()),
                       distinct_predictions=int(np.unique(want.argmax(-1)).size))
        if QEMU_CPU[target] != "cortex-a72" and got is not None:
            _, a72_failure, _, _ = run_module(tools, "cortex-a72", workdir, module, config.device, config.timeout_s)
            row.update(runs_on_cortex_a72=a72_failure is None,
                       **({"cortex_a72_failure": a72_failure} if a72_failure else {}))
        row.update(iree_version=tools.iree["compiler"]["version"],
                   iree_revision=(tools.iree["compiler"]["revision"] or "")[:12] or None,
                   iree_runtime_aarch64=tools.iree["runtime_aarch64"]["version"])
        rows.append(row)
    return rows


def _flag(target: str, name: str) -> str | None:
    prefix = f"--iree-llvmcpu-target-{name}="
    return next((a[len(prefix):] for a in export.IREE_TARGETS[target] if a.startswith(prefix)), None)


# --- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag, t = "--" + f.name.replace("_", "-"), hints[f.name]
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif typing.get_origin(t) is tuple:
            p.add_argument(flag, type=lambda s: tuple(v for v in s.split(",") if v), default=f.default)
        else:
            inner = [a for a in typing.get_args(t) if a is not type(None)] or [t]
            p.add_argument(flag, type=inner[0], default=f.default)
    p.add_argument("--fetch-only", action="store_true", help="only put the aarch64 runtime in --cache-dir")
    return p


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    fetch_only = args.pop("fetch_only")
    config = Config(**args)
    unknown = sorted(set(config.models) - set(MODELS))
    if unknown:
        print(f"error: unknown models {unknown}; choose from {sorted(MODELS)}", file=sys.stderr)
        return 2
    try:
        if fetch_only:
            runtime, info = runtime_tool(config, iree_compiler())
            print(json.dumps({"runtime": runtime, "version": info["version"]}))
            return 0
        tools = prerequisites(config)
    except (Missing, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in config.models:
            for row in check_model(name, config, tools, Path(config.workdir or tmp) / name):
                ok &= row["argmax_identical"] is not False
                print(json.dumps(row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
