"""``python -m bnnjax``: the version, the JAX backend and devices, the packed kernel, the extras found."""
from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

# optional extras: (what it is for, the module that says it is installed)
EXTRAS = (("iree", "IREE modules (export.compile_iree)", "iree.compiler"),
          ("iree runtime", "running IREE modules (export.load_iree)", "iree.runtime"),
          ("matplotlib", "plots (experiments/plot.py, figures)", "matplotlib"),
          ("tensorflow_datasets", "tfds data (pipeline.TfdsSource)", "tensorflow_datasets"),
          ("sphinx", "building the documentation", "sphinx"))


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def report() -> list[str]:
    """The lines ``python -m bnnjax`` prints."""
    import jax

    import bnnjax
    from bnnjax import packing

    devices = jax.devices()
    backend = jax.default_backend()
    kernel = packing.backend_kernel()
    lines = [f"bnnjax {bnnjax.__version__} ({Path(bnnjax.__file__).parent})",
             f"python {platform.python_version()}, jax {jax.__version__}, {platform.machine()}",
             f"backend: {backend}, {len(devices)} device{'s' if len(devices) != 1 else ''}: "
             + ", ".join(sorted({d.device_kind for d in devices}))]
    if kernel == "popcount":
        flags = packing.cpu_flags()
        if "avx512_vpopcntdq" in flags:
            simd = "AVX-512 VPOPCNTDQ: yes (vector popcounts)"
        elif flags:
            simd = "AVX-512 VPOPCNTDQ: no (the kernel runs without vector popcounts)"
        else:
            simd = "CPU features unknown"
        lines.append(f"packed kernel: popcount on CPU; {simd}")
    else:
        lines.append(f"packed kernel: {kernel} (bits unpacked to int8, integer dot units)")
    lines.append("extras:")
    lines += [f"  {name:<20} {'found' if _found(module) else 'missing':<8} {what}" for name, what, module in EXTRAS]
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
