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


# pytest-xdist (--dist loadfile) hands whole files to the two workers in collection order: the slowest
# files first, so that the workers finish together instead of one of them running a long file alone at
# the end (about 35 s of the suite's wall time when they came alphabetically).
_SLOWEST_FIRST = ["test_experiments.py", "test_experiments_nnx.py", "test_train_distributed.py", "test_layers.py",
                  "test_export.py", "test_train.py", "test_zoo_scripts.py", "test_zoo.py", "test_nnx.py",
                  "test_docs.py", "test_readme.py", "test_packing.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
