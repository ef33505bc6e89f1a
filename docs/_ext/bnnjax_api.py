"""``{bnnjax-module} NAME``: a module's API page from its ``__all__``.

The directive emits the module docstring, a summary table of every public name, then one autodoc entry
per name that lives in this module. A name re-exported from another documented module (``bnnjax.QuantConv``
is :class:`bnnjax.layers.QuantConv`) is listed in the table and linked to its home page, not documented
twice. Linen and NNX module classes get the signature of their constructor (no ``parent``/``name``).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import stringify_signature

# every module with an API page, in the order of the reference
MODULES = ("bnnjax", "bnnjax.quantizers", "bnnjax.layers", "bnnjax.nnx", "bnnjax.nnx.models", "bnnjax.nnx.bridge",
           "bnnjax.ops", "bnnjax.optim", "bnnjax.summary", "bnnjax.packing", "bnnjax.export", "bnnjax.zoo",
           "bnnjax.datasets", "bnnjax.pipeline", "bnnjax.train", "bnnjax.models", "bnnjax.experiment")


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def home(modname: str, name: str, obj) -> str:
    """The documented module whose page holds ``obj`` (its defining module when that has a page and
    exports it, else ``modname``)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    defined = getattr(obj, "__module__", None) if not isinstance(obj, functools.partial) else None
    if defined in MODULES and defined != modname:
        mod = _module(defined)
        for candidate in getattr(mod, "__all__", ()):
            if getattr(mod, candidate, None) is obj:
                return f"{defined}.{candidate}"
    return f"{modname}.{name}"


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 70 else ""


def _describe_data(value) -> list[str]:
    if isinstance(value, dict):
        keys = list(value)
        shown = ", ".join(f"``{k!r}``" for k in keys[:16]) + (", ..." if len(keys) > 16 else "")
        return [f"A ``dict`` of {len(keys)} entries, keyed {shown}."]
    if isinstance(value, (frozenset, set, tuple, list)) and len(repr(value)) > 70:
        return [f"A ``{type(value).__name__}`` of {len(value)} entries."]
    return []


def entries(modname: str) -> tuple[list[str], list[str]]:
    """(summary-table targets, reST of this module's own entries)."""
    mod = _module(modname)
    table, body = [], []
    for name in mod.__all__:
        obj = getattr(mod, name)
        target = home(modname, name, obj)
        table.append(target if isinstance(obj, types.ModuleType) else f"~{target}")
        if target != f"{modname}.{name}" or isinstance(obj, types.ModuleType):
            continue  # documented on its home page (a submodule: on its own page)
        full = f"{modname}.{name}"
        if isinstance(obj, functools.partial):
            bound = ", ".join([*map(repr, obj.args), *(f"{k}={v!r}" for k, v in obj.keywords.items())])
            body += [f".. function:: {full}(**kwargs)", "",
                     f"   Larq-style name: ``{obj.func.__name__}({bound}, **kwargs)``, a "
                     f":class:`~{modname}.Quantizer` with the keyword parameters bound "
                     f"(see :func:`~{obj.func.__module__}.{obj.func.__name__}`).", ""]
        elif inspect.isclass(obj) and issubclass(obj, BaseException):
            body += [f".. autoexception:: {full}", "   :show-inheritance:", ""]
        elif inspect.isclass(obj):
            body += [f".. autoclass:: {full}", "   :members:", "   :special-members: __call__", ""]
        elif callable(obj):
            body += [f".. autofunction:: {full}", ""]
        else:
            shown = _short_repr(obj)
            body += [f".. autodata:: {full}"] + ([] if shown else ["   :no-value:"]) + [""]
            body += [f"   {line}" for line in _describe_data(obj)] + [""]
    return table, body


class ModuleAPI(SphinxDirective):
    required_arguments = 1

    def run(self):
        modname = self.arguments[0]
        table, body = entries(modname)
        # the table names its entries in full; autosummary warns about full names under the current
        # module, so the table is written outside it and the module is made current again after it
        lines = [f".. automodule:: {modname}", "   :no-members:", "", ".. rubric:: Summary", "",
                 ".. currentmodule:: None", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {t}" for t in table] + ["", f".. currentmodule:: {modname}", ""]
        if body:
            lines += [".. rubric:: Reference", ""] + body
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source=f"<{modname} API>"), self.content_offset, node)
        return node.children


class _Name:
    """A default value shown by name (``jnp.float32``, ``zeros``) instead of its repr."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


def _default(value):
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
        mod = getattr(value, "__module__", "") or ""
        short = {"jax.numpy": "jnp", "numpy": "np"}.get(mod, mod.split(".")[-1] if mod else "")
        return _Name(f"{short}.{value.__qualname__}" if short and "<locals>" not in value.__qualname__
                     else value.__name__)
    if callable(value) and "<locals>" in getattr(value, "__qualname__", ""):
        return _Name(value.__qualname__.split(".<locals>")[0])  # e.g. an initializer factory's product
    return value


def _constructor_signature(cls) -> inspect.Signature | None:
    from flax import linen, nnx

    if issubclass(cls, linen.Module):
        sig = inspect.signature(cls)
        params = [p for n, p in sig.parameters.items() if n not in ("parent", "name")]
    elif issubclass(cls, nnx.Module):
        sig = inspect.signature(cls.__init__)
        params = list(sig.parameters.values())[1:]
    else:
        return None
    params = [p.replace(default=_default(p.default)) if p.default is not p.empty else p for p in params]
    return sig.replace(parameters=params, return_annotation=inspect.Signature.empty)


def process_signature(app, what, name, obj, options, signature, return_annotation):
    if what in ("class", "exception") and inspect.isclass(obj):
        try:
            sig = _constructor_signature(obj)
        except (TypeError, ValueError):
            sig = None
        if sig is not None:
            return stringify_signature(sig, show_return_annotation=False), None
    return None


# ``Quantizer``s: reST ends an inline literal only before whitespace or punctuation, so a plural "s"
# right after one would break the markup; a backslash-escaped space joins them without a gap
_PLURAL_LITERAL = re.compile(r"``([^`]+)``s\b")


def process_docstring(app, what, name, obj, options, lines):
    type_doc = inspect.getdoc(type(obj)) if what in ("data", "attribute") else None
    if type_doc and lines and lines[0].strip() == type_doc.splitlines()[0].strip():
        lines[:] = []  # a constant (dict, tuple, str) without a doc comment: its type's docstring says nothing of it
        return
    lines[:] = [_PLURAL_LITERAL.sub(r"``\1``\\ s", line) for line in lines]


def setup(app):
    app.add_directive("bnnjax-module", ModuleAPI)
    app.connect("autodoc-process-signature", process_signature)
    app.connect("autodoc-process-docstring", process_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
