"""Which NNX modules a forward pass calls, in call order, with their input and output shapes.

Flax NNX has no ``nn.intercept_methods``; like ``flax.nnx.tabulate`` this wraps the ``__call__`` of the
model's module classes for the duration of one ``jax.eval_shape`` of the model in evaluation mode (a
clone: the model itself is not touched, nothing is computed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
from flax import nnx


@dataclasses.dataclass
class Call:
    """One module call: the module's path in the model (a tuple of attribute names), the module (of the
    traced clone: read its static attributes, not its variables), the shapes in and out."""

    path: tuple
    module: nnx.Module
    input_shape: tuple
    output_shape: tuple


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else ()


@contextlib.contextmanager
def _recording(classes, paths: dict, calls: list):
    active: set[int] = set()
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
            try:
                out = __original(self, *args, **kwargs)
            finally:
                active.discard(id(self))
            calls.append(Call(paths[id(self)], self, _shape(args[0]) if args else (), _shape(out)))
            return out

        patched.append((owner, original))
        setattr(owner, "__call__", wrapper)
    try:
        yield
    finally:
        for owner, original in patched:
            setattr(owner, "__call__", original)


def trace_calls(model: nnx.Module, *args, **kwargs) -> list[Call]:
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
