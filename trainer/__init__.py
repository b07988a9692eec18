"""Models and optimisation: the token/attention-sparse timm ViT and the streaming training loop.

``from trainer import sparsify`` is the public entry point for one's own training loop.
"""
from trainer.sparse_vit import SparseVisionTransformer, sparsify

__all__ = ["SparseVisionTransformer", "sparsify"]
