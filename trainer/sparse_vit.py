"""Token- and attention-sparse forward pass for timm Vision Transformers.

``sparsify(vit, ...)`` returns a view of a timm ``VisionTransformer`` (or DeiT's distilled
``VisionTransformerDistilled``) that shares every parameter (same module tree, same state_dict
keys) but runs a forward pass that:

* **token level**: at the pruning blocks, after attention and before the MLP, ranks patch tokens
  by a *ranking row* (below) and gathers the top ``ceil(keep * N)``; the prefix tokens (the first
  ``num_prefix_tokens``: class, distillation and register tokens) are always kept, whatever their
  score; optionally the dropped ones are fused into one token weighted by their scores (EViT);
* **attention level**: at the same blocks, from the head-averaged attention among the kept
  tokens, each query keeps its top ``ceil(attn_keep * M)`` keys (prefix tokens' rows and columns
  always kept); that boolean mask serves the following blocks until the next pruning block.

The ranking row:

* with a class token (plain and distilled ViTs, with or without registers): the class token's
  attention to every token, averaged over heads;
* without one (``class_token=False``, e.g. ``global_pool="avg"``): the attention each token
  *receives*, averaged over all queries and heads, a class-free importance.

``last_cls_attention_variance`` (recorded at the last block when ``record_cls_attention``) is the
variance of that same row over the patch tokens, so in the class-free case it is the variance of
the attention received.

Every block runs the fused ``scaled_dot_product_attention`` kernel, forward and backward. The
ranking row (the whole map when the attention level is on or there is no class token) is formed on
the side without autograd at pruning blocks only: indices carry no gradient, and the fused token's
weights are treated as constants. With gradient checkpointing on (``set_grad_checkpointing``), each
block runs under ``torch.utils.checkpoint`` while training. With both rates at 1.0 the output
equals timm's own forward.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint


def default_token_blocks(depth: int) -> tuple[int, ...]:
    """Blocks 3, 6, 9 (0-based) of 12, scaled to other depths."""
    return tuple(sorted({max(1, depth * k // 4) for k in (1, 2, 3)} - {depth}))


def kept_count(rate: float, total: int) -> int:
    return max(1, min(total, math.ceil(rate * total - 1e-9)))


class SparseVisionTransformer(VisionTransformer):
    """A timm VisionTransformer whose forward drops tokens and attention connections.

    Made by :func:`sparsify`, never constructed directly.
    """

    token_keep: float
    attn_keep: float
    token_blocks: frozenset[int]
    fuse_token: bool
    record_cls_attention: bool
    last_cls_attention_variance: torch.Tensor | None
    last_token_counts: list[int]

    def set_rates(self, token_keep: float | None = None, attn_keep: float | None = None) -> None:
        """Change the keep rates between steps (for schedules)."""
        for name, value in (("token_keep", token_keep), ("attn_keep", attn_keep)):
            if value is not None:
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"{name} must be in (0, 1], not {value}")
                setattr(self, name, float(value))

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("the sparse ViT computes its own attention masks")
        x = self.patch_embed(x)
        x = self._pos_embed(x)  # the model's own: adds the class, distillation and register tokens
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        mask = None
        counts = []
        last = len(self.blocks) - 1
        # Checkpointing only pays when there is a backward pass to recompute for.
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            prune = i in self.token_blocks and (self.token_keep < 1.0 or self.attn_keep < 1.0)
            record = self.record_cls_attention and i == last
            if checkpointing:
                # Non-reentrant: the recomputation sees the same input and RNG state, so it ranks
                # and keeps the same tokens; _block has no side effects to repeat.
                x, mask, variance = checkpoint(self._block, block, x, mask, prune, record, use_reentrant=False)
            else:
                x, mask, variance = self._block(block, x, mask, prune, record)
            if record:
                self.last_cls_attention_variance = variance
            counts.append(x.shape[1])
        self.last_token_counts = counts
        return self.norm(x)

    def _block(self, block: Block, x: torch.Tensor, mask: torch.Tensor | None, prune: bool,
               record: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One block: (tokens out, attention mask for the next blocks, ranking variance if ``record``)."""
        attn: Attention = block.attn
        h = block.norm1(x)
        batch, tokens, _ = h.shape
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        dropout = attn.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if prune or mask is None else mask.to(q.dtype), dropout_p=dropout,
        )  # a pruning block ranks afresh, without the previous block's mask
        row = full = variance = None
        if prune or record:
            row, full = self._ranking(q, k, attn.scale, full_map=prune and self.attn_keep < 1.0)
        # num_heads * head_dim rather than attn.attn_dim, which timm < 1.0.23 lacks
        out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
        out = attn.proj_drop(attn.proj(attn.norm(out)))
        x = x + block.drop_path1(block.ls1(out))
        if record:
            variance = row[:, self.num_prefix_tokens:].float().var(dim=1)
        if prune:
            x, full = self._drop_tokens(x, row, full)
            mask = additive(self._attention_mask(full)) if full is not None else None
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, mask, variance

    @torch.no_grad()
    def _ranking(self, q: torch.Tensor, k: torch.Tensor, scale: float,
                 full_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ranking row (B, N) and, if ``full_map``, the head-averaged attention map (B, N, N).

        The row is the class token's attention (class token first, as timm places it) or, without a
        class token, the attention each key receives averaged over queries. Rankings choose indices,
        which carry no gradient: formed without autograd, the fused kernel keeps the whole backward.
        """
        class_token = self.cls_token is not None
        if class_token and not full_map:
            return ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, 0], None
        full = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
        row = full[:, 0] if class_token else full.mean(dim=1)
        return row, (full if full_map else None)

    def _drop_tokens(self, x: torch.Tensor, row: torch.Tensor,
                     full: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gather the prefix tokens and the top patch tokens; ``full`` is cut to the kept tokens."""
        prefix = self.num_prefix_tokens
        batch, _, dim = x.shape
        if self.token_keep >= 1.0:
            return x, full
        scores = row[:, prefix:]
        keep = kept_count(self.token_keep, scores.shape[1])
        top = scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
        index = torch.cat([torch.arange(prefix, device=x.device).expand(batch, prefix), top + prefix], dim=1)
        kept = x.gather(1, index.unsqueeze(-1).expand(-1, -1, dim))
        if full is not None:
            rows = full.gather(1, index.unsqueeze(-1).expand(-1, -1, full.shape[2]))
            full = rows.gather(2, index.unsqueeze(1).expand(-1, index.shape[1], -1))
        if self.fuse_token and keep < scores.shape[1]:
            weights = scores.scatter(1, top, 0.0)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
            fused = (weights.unsqueeze(-1) * x[:, prefix:]).sum(dim=1, keepdim=True)
            kept = torch.cat([kept, fused], dim=1)
            if full is not None:
                full = F.pad(full, (0, 1, 0, 1), value=1.0)  # the fused token attends and is attended fully
        return kept, full

    def _attention_mask(self, full: torch.Tensor) -> torch.Tensor | None:
        """(B, M, M), True where a query keeps a key: its top keys, plus every prefix row and column."""
        if self.attn_keep >= 1.0:
            return None
        batch, tokens, _ = full.shape
        keys = kept_count(self.attn_keep, tokens)
        top = full.topk(keys, dim=-1, sorted=False).indices
        mask = torch.zeros(batch, tokens, tokens, dtype=torch.bool, device=full.device).scatter_(-1, top, True)
        mask[:, :, : self.num_prefix_tokens] = True
        mask[:, : self.num_prefix_tokens, :] = True
        return mask


class SparseVisionTransformerDistilled(SparseVisionTransformer, VisionTransformerDistilled):
    """The sparse view of DeiT's distilled ViT.

    Keeps DeiT's own ``_pos_embed`` (class and distillation tokens, two prefix tokens) and
    ``forward_head`` (the two heads averaged, or both when ``distilled_training`` and training).
    """


# A module-level class per supported timm class, so a sparse model still pickles.
SPARSE_CLASSES: dict[type[VisionTransformer], type[SparseVisionTransformer]] = {
    VisionTransformer: SparseVisionTransformer,
    VisionTransformerDistilled: SparseVisionTransformerDistilled,
}


def additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean keep-mask as the (B, 1, M, M) additive bias SDPA takes (0 kept, -inf dropped).

    Made once per pruning block: handing SDPA the boolean mask would convert it in every block,
    forward and backward.
    """
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf")).unsqueeze(1)


def sparsify(
    vit: VisionTransformer,
    token_keep: float = 1.0,
    token_blocks: Sequence[int] | None = None,
    attn_keep: float = 1.0,
    fuse_token: bool = False,
) -> SparseVisionTransformer:
    """A sparse view of ``vit`` that shares its parameters (and state_dict keys).

    Supported: timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` (DeiT) with standard
    pre-norm blocks, with or without a class token, with register tokens, ``no_embed_class`` and
    gradient checkpointing. Prefix tokens (class, distillation, registers) are never dropped. Patch
    tokens are ranked by the class token's attention (averaged over heads) or, without a class token,
    by the attention they receive (averaged over queries and heads); ``last_cls_attention_variance``
    is the variance of that same ranking row over the patch tokens. With gradient checkpointing on,
    each block is checkpointed while training.

    Args:
        vit: the timm model; the view copies its flags (training, grad_checkpointing) once.
        token_keep: share of patch tokens kept at each pruning block (1.0: none dropped).
        token_blocks: 0-based blocks that prune (default 3, 6, 9 of 12, scaled to the depth).
        attn_keep: share of keys each query keeps from a pruning block on (1.0: dense).
        fuse_token: add one token that is the score-weighted sum of the dropped ones.
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"sparsify needs a timm VisionTransformer, not {type(vit).__name__}")
    # A sparse view may be sparsified again; any other subclass is refused.
    sparse_class = type(vit) if type(vit) in SPARSE_CLASSES.values() else SPARSE_CLASSES.get(type(vit))
    if sparse_class is None:  # a subclass's own _pos_embed or forward_head would be silently bypassed
        raise TypeError(f"sparsify needs a timm VisionTransformer or VisionTransformerDistilled, not the subclass "
                        f"{type(vit).__name__}")
    for i, block in enumerate(vit.blocks):
        gated = getattr(block.attn, "gate", None) is not None  # getattr: timm < 1.0.28 has no gate at all
        if type(block) is not Block or type(block.attn) is not Attention or gated:
            raise TypeError(f"block {i} is {type(block).__name__}/{type(block.attn).__name__}: "
                            "sparsify supports timm's pre-norm Block with the standard, ungated Attention")
    blocks = tuple(default_token_blocks(len(vit.blocks)) if token_blocks is None else token_blocks)
    if any(not 0 <= b < len(vit.blocks) for b in blocks):
        raise ValueError(f"token_blocks {blocks} outside 0..{len(vit.blocks) - 1}")
    sparse = copy.copy(vit)  # shares the module and parameter dicts, so every parameter is shared
    sparse.__class__ = sparse_class
    sparse.token_blocks = frozenset(blocks)
    sparse.fuse_token = fuse_token
    sparse.record_cls_attention = False
    sparse.last_cls_attention_variance = None
    sparse.last_token_counts = []
    sparse.token_keep = sparse.attn_keep = 1.0
    sparse.set_rates(token_keep, attn_keep)
    return sparse
