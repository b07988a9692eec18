"""Building the timm ViT for a dataset and making it sparse."""
from __future__ import annotations

import timm

from trainer.config import TrainConfig
from trainer.sparse_vit import SparseVisionTransformer, sparsify


def model_kwargs(config: TrainConfig, img_size: int, num_classes: int) -> dict:
    """The overrides handed to ``timm.create_model`` (also what a user needs to rebuild it)."""
    kwargs = {"img_size": img_size, "num_classes": num_classes, "drop_path_rate": config.drop_path,
              "patch_size": config.patch_size or (4 if img_size >= 16 else 2)}
    for name in ("depth", "embed_dim", "num_heads"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    return kwargs


def build_model(config: TrainConfig, img_size: int, num_classes: int) -> SparseVisionTransformer:
    vit = timm.create_model(config.model, pretrained=False, **model_kwargs(config, img_size, num_classes))
    return sparsify(vit, token_keep=1.0, token_blocks=config.token_blocks, attn_keep=1.0,
                    fuse_token=config.fuse_token, attn_mode=config.attn_mode, attn_block=config.attn_block)
