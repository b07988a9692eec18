"""Analytic FLOPs of a ViT forward pass, from the token count each block sees.

A multiply-add counts as 2 FLOPs. Only the matrix products count (norms, softmax and GELU are
a few percent at these sizes); the same rule for dense and sparse makes their ratio meaningful.
A training step costs about 3x its forward pass for both, so the ratio predicts step speed-up.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.sparse_vit import kept_count


@dataclass(frozen=True)
class ViTShape:
    depth: int
    dim: int
    mlp_hidden: int
    patches: int
    patch_pixels: int  # channels * patch * patch
    prefix_tokens: int
    num_classes: int
    heads: int = 1  # classifier heads: 2 for distilled DeiT (class and distillation token)

    @classmethod
    def of(cls, vit) -> ViTShape:  # noqa: ANN001 - any timm VisionTransformer
        first = vit.blocks[0]
        return cls(
            depth=len(vit.blocks), dim=vit.embed_dim, mlp_hidden=first.mlp.fc1.out_features,
            patches=vit.patch_embed.num_patches,
            patch_pixels=(vit.patch_embed.proj.in_channels * vit.patch_embed.proj.kernel_size[0]
                          * vit.patch_embed.proj.kernel_size[1]),
            prefix_tokens=vit.num_prefix_tokens, num_classes=vit.num_classes,
            heads=2 if getattr(vit, "head_dist", None) is not None else 1,
        )


def token_counts(shape: ViTShape, token_keep: float, token_blocks: frozenset[int] | set[int],
                 fuse_token: bool = False) -> list[tuple[int, int]]:
    """(tokens in attention, tokens in MLP) per block."""
    counts = []
    tokens = shape.prefix_tokens + shape.patches
    for block in range(shape.depth):
        attention_tokens = tokens
        if block in token_blocks and token_keep < 1.0:
            patches = tokens - shape.prefix_tokens  # an earlier fused token competes like a patch
            kept = kept_count(token_keep, patches)
            tokens = shape.prefix_tokens + kept + (1 if fuse_token and kept < patches else 0)
        counts.append((attention_tokens, tokens))
    return counts


def forward_flops(shape: ViTShape, token_keep: float = 1.0, token_blocks: frozenset[int] | set[int] = frozenset(),
                  fuse_token: bool = False) -> int:
    """One image's forward pass at the token counts the token level's settings give (all patches in)."""
    return counted_flops(shape, shape.patches, token_counts(shape, token_keep, token_blocks, fuse_token))


def measured_forward_flops(shape: ViTShape, input_tokens: tuple[int, int], block_tokens: Sequence[int]) -> int:
    """One image's forward pass at the token counts a forward really ran with: ``input_tokens`` is
    (patches embedded, tokens into the first block: fewer under patch dropout) and ``block_tokens``
    the tokens out of each block (a block's MLP sees its output count: tokens are dropped or merged
    between its attention and its MLP)."""
    embedded, first = input_tokens
    return counted_flops(shape, embedded, list(zip([first, *block_tokens[:-1]], block_tokens, strict=True)))


def counted_flops(shape: ViTShape, embedded: int, counts: list[tuple[int, int]]) -> int:
    """Patch embedding of ``embedded`` patches, then per block (tokens in attention, tokens in MLP), then the head."""
    d, h = shape.dim, shape.mlp_hidden
    total = 2 * embedded * shape.patch_pixels * d + 2 * d * shape.num_classes * shape.heads
    for attention_tokens, mlp_tokens in counts:
        n = attention_tokens
        total += 2 * n * d * 3 * d + 2 * n * n * d * 2 + 2 * n * d * d  # qkv, scores and weighted sum, proj
        total += 2 * mlp_tokens * d * h * 2  # fc1, fc2
    return total
