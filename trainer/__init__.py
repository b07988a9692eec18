"""Models and optimisation: the token/attention-sparse timm ViT and the streaming training loop.

``from trainer import sparsify`` is the public entry point for one's own training loop. It is
loaded on first use (PEP 562): importing ``trainer.config`` alone does not import torch or timm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.sparse_vit import SparseVisionTransformer, sparsify


def __getattr__(name: str) -> object:
    if name not in ("SparseVisionTransformer", "sparsify"):
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    from trainer import sparse_vit

    value = getattr(sparse_vit, name)
    globals()[name] = value
    return value


__all__ = ["SparseVisionTransformer", "sparsify"]
