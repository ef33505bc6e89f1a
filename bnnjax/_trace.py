"""Which modules a forward pass calls, in call order, with their input and output shapes.

What the summary (layer rows), the exporter (which BatchNorms to fold), the Keras weights loader and
the linen-to-NNX variable loader (layer order) read. Linen: ``nn.intercept_methods`` around any thunk
(an ``init`` or ``apply`` under ``jax.eval_shape``). NNX has no interceptor; like ``flax.nnx.tabulate``
this wraps the ``__call__`` of the model's module classes for the duration of one ``jax.eval_shape`` of
the model in evaluation mode (a clone: the model itself is not touched). Nothing is computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

from typing import Any, Callable

import jax
from flax import linen as nn
from flax import nnx


@dataclasses.dataclass
class Call:
    """One module call: the module's path in the model (names; NNX list entries are ints), the module
    (for NNX the traced clone's: read its static attributes, not its variables), the shapes in and out,
    and ``start``, the call's position in order of entry (the list itself is in order of return)."""

    path: tuple
    module: Any
    input_shape: tuple
    output_shape: tuple
    start: int = 0


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else ()


@contextlib.contextmanager
def _recording(classes, paths: dict, calls: list):
    active: set[int] = set()
    counter = [0]
    patched = []
    for cls in classes:
        owner = next((c for c in cls.__mro__ if "__call__" in c.__dict__), None)
        if owner is None or owner in [p[0] for p in patched]:
            continue
        original = owner.__dict__["__call__"]

        @functools.wraps(original)
        def wrapper(self, *args, __original=original, **kwargs):
            if id(self) in active or id(self) not in paths:  # a super().__call__ or a module outside the model
                return __original(self, *args, **kwargs)
            active.add(id(self))
            start = counter[0] = counter[0] + 1
            try:
                out = __original(self, *args, **kwargs)
            finally:
                active.discard(id(self))
            calls.append(Call(paths[id(self)], self, _shape(args[0]) if args else (), _shape(out), start))
            return out

        patched.append((owner, original))
        setattr(owner, "__call__", wrapper)
    try:
        yield
    finally:
        for owner, original in patched:
            setattr(owner, "__call__", original)


def linen_calls(thunk: Callable[[], Any]) -> tuple[Any, list[Call]]:
    """``thunk()``'s result and every linen submodule ``__call__`` it made, in order of return (run the
    thunk's ``init``/``apply`` under ``jax.eval_shape`` to compute nothing)."""
    calls: list[Call] = []
    counter = [0]

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        start = counter[0] = counter[0] + 1
        out = next_fun(*args, **kwargs)
        calls.append(Call(tuple(context.module.path), context.module, _shape(args[0]) if args else (), _shape(out),
                          start))
        return out

    with nn.intercept_methods(interceptor):
        result = thunk()
    return result, calls


def nnx_calls(model: nnx.Module, *args, **kwargs) -> list[Call]:
    """Every module call of ``model(*args, **kwargs)`` in evaluation mode, innermost first (a module's
    call is listed when it returns, after the calls it made). ``args`` may be arrays or
    ``jax.ShapeDtypeStruct``s."""
    graphdef, state = nnx.split(model)
    calls: list[Call] = []

    def run(state, *a):
        m = nnx.merge(graphdef, state)
        m.eval()
        modules = list(nnx.iter_modules(m))
        paths = {id(mod): tuple(path) for path, mod in modules}
        with _recording({type(mod) for _, mod in modules}, paths, calls):
            return m(*a, **kwargs)

    specs = [jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a)) for a in args]
    jax.eval_shape(run, state, *specs)
    return calls
