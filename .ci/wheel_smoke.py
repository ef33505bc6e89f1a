"""Smoke test of an installed bnnjax wheel: run from outside the source tree by .ci/run.

Checks that ``bnnjax`` is imported from the virtual environment it was installed into (not from a
checkout), then builds a small binarized model, packs it and requires the packed predictions to equal
the float model's; also exercises the lazily loaded submodules the wheel must hold.
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import flax.linen as nn

import bnnjax
from bnnjax import export, nnx, zoo  # noqa: F401  (every subpackage is in the wheel)

where = Path(bnnjax.__file__).resolve()
assert Path(sys.prefix).resolve() in where.parents, f"bnnjax imported from {where}, not from {sys.prefix}"
assert not (where.parent.parent / "pyproject.toml").exists(), f"{where} is a source checkout"


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = bnnjax.QuantConv(16, (3, 3), kernel_quantizer="ste_sign", use_bias=False)(x)
        x = bnnjax.BatchNorm(use_running_average=not train)(x)
        x = bnnjax.QuantDense(10, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                              use_bias=False)(x.reshape(x.shape[0], -1))
        return bnnjax.BatchNorm(use_running_average=not train)(x)


x = jax.random.normal(jax.random.key(0), (64, 12, 12, 1))
model = Net()
variables = model.init(jax.random.key(1), x[:1])
_, stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
variables = {**variables, **stats}
packed = export.pack(model, variables, x)
same = bool((model.apply(packed, x).argmax(-1) == model.apply(variables, x).argmax(-1)).all())
assert same, "packed predictions differ from the float model's"
print(f"bnnjax {bnnjax.__version__} from {where.parent}: packed = float predictions on {len(x)} inputs, "
      f"{export.packed_bytes(packed)} packed bytes; zoo has {len(zoo.names())} models")
