"""What every zoo family shares: the classifier head, global pooling and larq-zoo's weight releases."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import linen as nn

RELEASES = "https://github.com/larq/zoo/releases/download"


@dataclasses.dataclass(frozen=True)
class Weights:
    """One released weights file of larq-zoo: its URL and SHA-256 (as larq-zoo's factories give them)."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def release(model: str, version: str, file: str, sha256: str) -> Weights:
    """larq-zoo's ``download_pretrained_model(model, version, file, file_hash)`` as a registry entry."""
    return Weights(f"{RELEASES}/{model}-{version}/{file}", sha256)


def global_pool(x):
    """larq-zoo's ``utils.global_pool``: average over the whole feature map, then flatten."""
    return jnp.mean(x, axis=(1, 2))


def classifier_activation(x, activation: str | None):
    """The top's activation: ``"softmax"`` (larq-zoo's models end in a float32 softmax) or None (logits)."""
    if activation is None:
        return x
    if activation != "softmax":
        raise ValueError(f"classifier_activation must be 'softmax' or None (logits), got {activation!r}.")
    return nn.softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
