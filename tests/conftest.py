import warnings

# Hypothesis imports libcst lazily while reporting a failure; on some installs that import emits a
# DeprecationWarning that our warnings-as-errors setting would turn into an INTERNALERROR hiding the
# real failure. Import it once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except Exception:
        pass
