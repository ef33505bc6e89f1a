import os
import warnings

# XLA compiles several hundred small programs in this suite, and LLVM's optimization passes took ~40 %
# of its time. The tests check values, gradients, shapes and files, which compare programs compiled
# under the same flags (or within tolerances); speed is measured by experiments/bench_*.py, which run
# with XLA's defaults. BNNJAX_TEST_XLA_OPT=1 runs the suite fully optimized. Set here, before jax is
# imported, so xdist workers and the subprocesses tests start inherit it.
_flags = os.environ.get("XLA_FLAGS", "")
if os.environ.get("BNNJAX_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()

# Hypothesis imports libcst lazily while reporting a failure; on some installs that import emits a
# DeprecationWarning that our warnings-as-errors setting would turn into an INTERNALERROR hiding the
# real failure. Import it once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except Exception:
        pass
