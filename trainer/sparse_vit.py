"""Token- and attention-sparse forward pass for timm Vision Transformers.

``sparsify(vit, ...)`` returns a view of a timm ``VisionTransformer`` (or DeiT's distilled
``VisionTransformerDistilled``) that shares every parameter (same module tree, same state_dict
keys) but runs a forward pass that:

* **token level**: at the pruning blocks, after attention and before the MLP, ranks patch tokens
  by a *ranking row* (below) and gathers the top ``ceil(keep * N)``; the prefix tokens (the first
  ``num_prefix_tokens``: class, distillation and register tokens) are always kept, whatever their
  score; optionally the dropped ones are fused into one token weighted by their scores (EViT),
  appended last;
* **token merging** (``token_merge = r > 0``, an alternative token level, with both rates at 1.0):
  in every block, between attention and MLP, ``r`` patch tokens merge into their most similar ones
  (ToMe's bipartite soft matching; sizes carried forward and weighed in attention:
  :mod:`trainer.token_merging`);
* **attention level** (``attn_keep < 1``): at the same blocks, from the head-averaged attention map
  among the kept tokens, a mask is chosen that serves the following blocks until the next pruning
  block (a pruning block itself attends densely: it ranks afresh). Two modes:

  - ``attn_mode="exact"`` (default; the paper's regulariser): each query keeps its top
    ``ceil(attn_keep * M)`` keys, prefix tokens' rows and columns always kept; every other query
    keeps the fused token's column (its padded score, 1.0, beats every attention weight), while the
    fused token's own row is all ties, so it keeps ``ceil(attn_keep * M)`` keys picked by
    ``topk``'s tie-break plus the prefix columns (not necessarily itself). The mask is an additive
    bias to the dense fused ``scaled_dot_product_attention``: every score is still computed, so it
    saves no time.
  - ``attn_mode="block"``: the map is pooled into ``attn_block`` x ``attn_block`` tiles (by default
    a side chosen from M, :func:`tile_side`; mean over each tile, the last tile partial when the
    side does not divide M) and each query tile keeps its top ``ceil(attn_keep * T)`` of the T key
    tiles (:func:`block_keep_tiles`). At tile granularity: the key tiles holding prefix tokens are
    kept for every query tile, the query tiles holding prefix tokens keep every key tile, and the
    key tile holding the fused token is kept for every query tile, so the patch tokens sharing those
    tiles are kept with them; the fused token's query tile ranks its key tiles like any other (its
    padded row shifts every tile's mean equally). The following blocks run FlexAttention with a
    ``BlockMask`` built from those tile choices: kept tiles are computed whole, skipped tiles are
    not computed at all, so attention cost falls with ``attn_keep`` once sequences span several
    tiles. Keys past M in the last partial tile never contribute (FlexAttention bounds-checks
    lengths that are not a multiple of the tile). FlexAttention runs compiled (``torch.compile``;
    eager FlexAttention is an unfused reference that computes everything). It has no backward on CPU
    (or MPS), and in inference there it would compile a graph per token count, so on those devices
    it is not used: the following blocks gather each query tile's kept key and value tiles and
    attend to those alone (:class:`TileGather`; same outputs and gradients) where that pays (at most
    half the scores, on a long sequence: :func:`gathering_pays`), and otherwise run the same tile
    choice, expanded to a token mask, through dense masked SDPA (same outputs, no time saved). Block
    mode has no attention dropout (FlexAttention has none): it refuses models with
    ``attn_drop > 0``.

The ranking row:

* with a class token (plain and distilled ViTs, with or without registers): the class token's
  attention to every token, averaged over heads;
* without one (``class_token=False``, e.g. ``global_pool="avg"``): the attention each token
  *receives*, averaged over all queries and heads, a class-free importance.

``last_cls_attention_variance`` (recorded at the last block when ``record_cls_attention``) is the
variance of that same row over the patch tokens, so in the class-free case it is the variance of
the attention received.

Blocks without a block-mode mask run the fused ``scaled_dot_product_attention`` kernel, forward and
backward. The ranking row (the whole map when the attention level is on or there is no class token)
is formed on the side without autograd at pruning blocks only: indices carry no gradient, and the
fused token's weights are treated as constants. On CPU a pruning block that needs the whole map
computes its attention explicitly instead and ranks with those same probabilities (detached), which
costs less than the fused kernel plus a second pass over the scores (:func:`reuses_attention_map`).
With gradient checkpointing on (``set_grad_checkpointing``), each block runs under
``torch.utils.checkpoint`` while training (the mask handed between blocks, a tensor or a
``BlockMask``, passes through it). With both rates at 1.0 the output equals timm's own forward, in
either mode.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from trainer.compile import allow_static_graphs
from trainer.token_merging import bipartite_matching, merge_tokens, proportional_bias

ATTN_MODES = ("exact", "block")
# Block mode's tile side when none is given: per pruning block, the smallest power of two >= 16 (the
# smallest tile FlexAttention's GPU kernels take) that leaves at most this many tiles. Short ViT
# sequences keep 16-token tiles and a fine choice (65 tokens at 32 px / patch 4: 3 tiles after
# pruning; 197 at 224 / 16: 9); long ones get larger tiles, which skip as large a share of the
# scores at the same keep rate but make each kept tile more work: FlexAttention's GPU kernels run
# fuller tiles, and on CPU the gathered tiles pay from 256 tokens at 32 where 16 needs 512. Measured
# on CPU, side by side (docs/benchmarks.md "Sparse training (CPU)"): at 577 tokens (405 after pruning) 16-token
# tiles never gather and block mode cost 1.042x of the token level alone, these tiles 1.019x.
MAX_AUTO_TILES = 24
# Devices whose FlexAttention has no backward (torch 2.14 raises "does not support backward on CPU"):
# block mode runs TileGather or dense masked SDPA there instead.
FLEX_FORWARD_ONLY = frozenset({"cpu", "mps"})
_compiled_flex = None


def default_token_blocks(depth: int) -> tuple[int, ...]:
    """Blocks 3, 6, 9 (0-based) of 12, scaled to other depths."""
    return tuple(sorted({max(1, depth * k // 4) for k in (1, 2, 3)} - {depth}))


def kept_count(rate: float, total: int) -> int:
    return max(1, min(total, math.ceil(rate * total - 1e-9)))


def tile_side(tokens: int) -> int:
    """Block mode's default tile side for ``tokens`` tokens: the smallest power of two >= 16 leaving at
    most ``MAX_AUTO_TILES`` tiles (16 up to 384 tokens, 32 up to 768, 64 up to 1,536, ...)."""
    side = 16
    while math.ceil(tokens / side) > MAX_AUTO_TILES:
        side *= 2
    return side


class SparseVisionTransformer(VisionTransformer):
    """A timm VisionTransformer whose forward drops tokens and attention connections.

    Made by :func:`sparsify`, never constructed directly.
    """

    token_keep: float
    attn_keep: float
    attn_mode: str
    attn_block: int | None  # None: tile_side of each pruning block's token count
    token_blocks: frozenset[int]
    token_merge: int  # ToMe: patch tokens merged away in every block (0: off; trainer/token_merging.py)
    fuse_token: bool
    record_cls_attention: bool
    last_cls_attention_variance: torch.Tensor | None
    last_token_counts: list[int]  # tokens out of each block in the last forward pass
    last_input_tokens: tuple[int, int]  # (patches embedded, tokens into the first block) in the last forward pass

    def set_rates(self, token_keep: float | None = None, attn_keep: float | None = None) -> None:
        """Change the keep rates between steps (for schedules)."""
        for name, value in (("token_keep", token_keep), ("attn_keep", attn_keep)):
            if value is not None:
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"{name} must be in (0, 1], not {value}")
                if value < 1.0 and self.token_merge:
                    raise ValueError(f"token merging is the token level here: {name} must stay 1.0, not {value}")
                setattr(self, name, float(value))

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("the sparse ViT computes its own attention masks")
        x = self.patch_embed(x)
        embedded = math.prod(x.shape[1:-1])  # (B, N, D), or (B, H, W, D) with timm's dynamic_img_size
        x = self._pos_embed(x)  # the model's own: adds the class, distillation and register tokens
        x = self.patch_drop(x)  # PatchDropout (patch_drop_rate) while training, else nothing
        self.last_input_tokens = (embedded, x.shape[1])
        x = self.norm_pre(x)
        mask = size = None  # size: how many patches each token holds, once tokens merge (token_merge)
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
                x, mask, variance, size = checkpoint(self._block, block, x, mask, size, prune, record,
                                                     use_reentrant=False)
            else:
                x, mask, variance, size = self._block(block, x, mask, size, prune, record)
            if record:
                self.last_cls_attention_variance = variance
            counts.append(x.shape[1])
        self.last_token_counts = counts
        return self.norm(x)

    def _block(self, block: Block, x: torch.Tensor, mask: Mask, size: torch.Tensor | None, prune: bool,
               record: bool) -> tuple[torch.Tensor, Mask, torch.Tensor | None, torch.Tensor | None]:
        """One block: (tokens out, attention mask for the next blocks, ranking variance if ``record``,
        token sizes once tokens merge).

        The mask is an additive bias (exact mode, or block mode where FlexAttention has no backward
        and gathering does not pay), a ``BlockMask`` (block mode, run by FlexAttention) or a
        :class:`TileGather` (block mode where FlexAttention has no backward, long sequences).
        """
        attn: Attention = block.attn
        h = block.norm1(x)
        batch, tokens, _ = h.shape
        qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        dropout = attn.attn_drop.p if self.training else 0.0
        full_map = prune and self.attn_keep < 1.0
        row = full = variance = None
        if isinstance(mask, (BlockMask, TileGather)) and not prune:
            if dropout > 0.0:
                raise ValueError("attn_mode='block' cannot apply attention dropout (FlexAttention has none)")
            out = attend_blocks(q, k, v, mask) if isinstance(mask, BlockMask) else mask.attend(q, k, v, attn.scale)
        elif prune and (full_map or self.cls_token is None) and reuses_attention_map(q.device):
            out, row, full = self._attend_and_rank(q, k, v, attn.scale, dropout, full_map)
        else:
            # a pruning block ranks afresh, without the previous block's mask; merged tokens weigh by their size
            bias = proportional_bias(size, q.dtype) if size is not None else (
                None if prune or mask is None else mask.to(q.dtype))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        if (prune or record) and row is None:
            row, full = self._ranking(q, k, attn.scale, full_map=full_map)
        # num_heads * head_dim rather than attn.attn_dim, which timm < 1.0.23 lacks
        out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
        out = attn.proj_drop(attn.proj(attn.norm(out)))
        x = x + block.drop_path1(block.ls1(out))
        if record:
            variance = row[:, self.num_prefix_tokens:].float().var(dim=1)
        if prune:
            fused = self._fuses(tokens - self.num_prefix_tokens)
            x, full = self._drop_tokens(x, row, full)
            mask = None if full is None else self._next_mask(full, fused)
        if self.token_merge:
            merge = bipartite_matching(k.mean(dim=1), self.token_merge, self.num_prefix_tokens)
            if merge is not None:
                x, size = merge_tokens(merge, x, size)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, mask, variance, size

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

    def _attend_and_rank(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float,
                         full_map: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A pruning block's attention computed explicitly, its probabilities reused for the ranking.

        Returns (attention output, ranking row, map if ``full_map``): the same values as the fused
        kernel followed by :meth:`_ranking`, without computing the scores twice. Used only where the
        whole map is needed (the attention level, or no class token) and :func:`reuses_attention_map`.
        """
        probs = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        with torch.no_grad():
            full = probs.mean(dim=1)
            row = full[:, 0] if self.cls_token is not None else full.mean(dim=1)
        out = F.dropout(probs, dropout, training=dropout > 0.0) @ v
        return out, row, (full if full_map else None)

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
        if self._fuses(scores.shape[1]):
            weights = scores.scatter(1, top, 0.0)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
            fused = (weights.unsqueeze(-1) * x[:, prefix:]).sum(dim=1, keepdim=True)
            kept = torch.cat([kept, fused], dim=1)
            if full is not None:
                # 1.0 beats every attention weight, so every other query keeps the fused token's column;
                # its own row is all ties (exact mode keeps topk's tie-break; block mode ranks its tile)
                full = F.pad(full, (0, 1, 0, 1), value=1.0)
        return kept, full

    def _fuses(self, patches: int) -> bool:
        """Whether a pruning block with ``patches`` patch tokens appends a fused token (last)."""
        return self.fuse_token and self.token_keep < 1.0 and kept_count(self.token_keep, patches) < patches

    def _next_mask(self, full: torch.Tensor, fused: bool) -> Mask:
        """The mask the blocks after a pruning block attend with, from the map among the kept tokens."""
        if self.attn_mode == "exact":
            return additive(self._attention_mask(full))
        tokens = full.shape[-1]
        side = self.attn_block or tile_side(tokens)
        count = math.ceil(tokens / side)
        if kept_count(self.attn_keep, count) == count:
            return None  # every key tile kept: plain dense attention
        tiles = block_keep_tiles(full, self.attn_keep, side, self.num_prefix_tokens, fused)
        if full.device.type not in FLEX_FORWARD_ONLY:
            return tile_block_mask(tiles, side, tokens)
        # No FlexAttention backward here, and in inference it would compile a graph per token count:
        # gather the kept tiles where that pays, else the same choice as a token mask, dense SDPA.
        gather = tile_gather(tiles, side, tokens, self.num_prefix_tokens, self.attn_keep, fused)
        return gather if gather is not None else additive(expand_tiles(tiles, side, tokens))

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


def reuses_attention_map(device: torch.device) -> bool:
    """Whether a pruning block that needs the whole attention map computes attention explicitly.

    On CPU it does: one explicit pass (scores, softmax, weighted sum) costs less than the fused
    kernel plus a second, forward-only pass for the map (2 cores, DeiT-Tiny shape, forward and
    backward: 39 vs 46 ms at 1,025 tokens, 9 vs 13 ms at 257, 2.8 vs 4.4 ms at 65; docs/benchmarks.md "Sparse
    training (CPU)"). Elsewhere the fused kernel keeps its backward and memory (a GPU has not been
    measured either way).
    """
    return device.type == "cpu"


def additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean keep-mask as the (B, 1, M, M) additive bias SDPA takes (0 kept, -inf dropped).

    Made once per pruning block: handing SDPA the boolean mask would convert it in every block,
    forward and backward.
    """
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf")).unsqueeze(1)


def block_keep_tiles(full: torch.Tensor, keep: float, block: int, prefix: int, fused: bool) -> torch.Tensor:
    """(B, T, T) boolean: which key tiles each query tile keeps, from the (B, M, M) attention map.

    ``full`` is pooled into ``block`` x ``block`` tiles (mean over each tile; the last tile holds
    the remaining ``M - (T - 1) * block`` tokens) and each query tile keeps its top
    ``kept_count(keep, T)`` key tiles. Key tiles holding any of the first ``prefix`` tokens are kept
    for every query tile and query tiles holding them keep every key tile; if ``fused``, the last
    token is a fused token and its key tile is kept for every query tile.
    """
    batch, tokens, _ = full.shape
    tiles = math.ceil(tokens / block)
    pad = tiles * block - tokens
    sums = F.pad(full.float(), (0, pad, 0, pad)).reshape(batch, tiles, block, tiles, block).sum(dim=(2, 4))
    # Tokens per tile, from device ops (no host copy): block, ..., block, the rest.
    sizes = (tokens - torch.arange(tiles, device=full.device) * block).clamp(max=block).float()
    pooled = sums / (sizes[:, None] * sizes[None, :])
    top = pooled.topk(kept_count(keep, tiles), dim=-1, sorted=False).indices
    mask = torch.zeros(batch, tiles, tiles, dtype=torch.bool, device=full.device).scatter_(-1, top, True)
    prefix_tiles = math.ceil(prefix / block)
    mask[:, :, :prefix_tiles] = True
    mask[:, :prefix_tiles, :] = True
    if fused:
        mask[:, :, -1] = True
    return mask


def expand_tiles(tiles: torch.Tensor, block: int, tokens: int) -> torch.Tensor:
    """A (B, T, T) tile mask as the (B, M, M) token mask it stands for."""
    return tiles.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :tokens, :tokens]


def tile_block_mask(tiles: torch.Tensor, block: int, tokens: int) -> BlockMask:
    """The FlexAttention ``BlockMask`` (one head, broadcast over heads) for a (B, T, T) tile mask.

    Every kept tile is a *full* block (computed whole, no mask_mod evaluated); the rest are absent,
    never computed. ``seq_lengths`` is the true M: FlexAttention masks keys past it in the last tile.
    """
    kept = tiles.to(torch.int32)
    count = kept.sum(dim=-1, dtype=torch.int32)[:, None]  # (B, 1, T)
    # Kept tiles first, in increasing order; entries past the count are ignored.
    order = kept.argsort(dim=-1, descending=True, stable=True).to(torch.int32)[:, None]  # (B, 1, T, T)
    # No partial blocks: zero of them, and their own (ignored) index tensor, since handing the same
    # tensor as both index sets breaks inductor's CPU kernel ("'kv_indices' was not declared").
    return BlockMask.from_kv_blocks(torch.zeros_like(count), torch.zeros_like(order), count, order, BLOCK_SIZE=block,
                                    seq_lengths=(tokens, tokens))


@dataclass(frozen=True)
class TileGather:
    """Block-mode attention without FlexAttention: each query tile attends to its kept key tiles only.

    For devices whose FlexAttention has no backward (CPU). The key and value tiles each query tile
    keeps are copied next to each other (one ``index_select`` over a tile-major layout, whose
    backward is one ``index_add``), then one batched matmul, softmax and matmul per query tile:
    about ``width / T`` of the scores, against all of them for dense masked SDPA. The copies are
    ``width`` x the keys in memory traffic, so it pays only on long sequences (:func:`gathering_pays`).
    Query tiles holding prefix tokens keep every key tile: they run the fused kernel, unmasked.
    """

    order: torch.Tensor  # (B, T - prefix tiles, width): key tiles each other query tile computes, kept first
    bias: torch.Tensor  # (B, 1, T - prefix tiles, 1, width * block): 0, or -inf for a padding tile or a key past M
    block: int
    prefix_tiles: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output (B, H, M, D), as dense SDPA masked by the same tiles would give."""
        batch, heads, tokens, dim = q.shape
        tiles = math.ceil(tokens / self.block)
        pad, rest, width = tiles * self.block - tokens, tiles - self.prefix_tiles, self.order.shape[-1] * self.block
        # Row of each (batch, head, kept key tile) in the tile-major (B * H * T, block * D) layout.
        rows = self.order[:, None] + tiles * torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1)

        def gathered(t: torch.Tensor) -> torch.Tensor:
            tile_major = F.pad(t, (0, 0, 0, pad)).reshape(batch * heads * tiles, self.block * dim)
            return tile_major.index_select(0, rows.flatten()).view(batch, heads, rest, width, dim)

        head = self.prefix_tiles * self.block
        queries = F.pad(q, (0, 0, 0, pad))[:, :, head:].reshape(batch, heads, rest, self.block, dim)
        scores = (queries * scale) @ gathered(k).transpose(-1, -2) + self.bias.to(q.dtype)
        out = (scores.softmax(dim=-1) @ gathered(v)).reshape(batch, heads, rest * self.block, dim)
        if head:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, :head], k, v, scale=scale), out], dim=2)
        return out[:, :, :tokens]


def tile_gather(tiles: torch.Tensor, block: int, tokens: int, prefix: int, keep: float,
                fused: bool) -> TileGather | None:
    """The :class:`TileGather` for a (B, T, T) tile choice, or None where dense masked SDPA is faster.

    ``width`` is the most key tiles a query tile outside the prefix tiles can keep (its top
    ``kept_count(keep, T)``, the prefix tiles, the fused token's tile): a static bound, so no host
    read of the counts. Rows keeping fewer pad with masked tiles.
    """
    count = tiles.shape[-1]
    prefix_tiles = math.ceil(prefix / block)
    width = gather_width(count, prefix_tiles, keep, fused)
    if prefix_tiles >= count or not gathering_pays(width, block, tokens):
        return None
    return gathered_tiles(tiles, block, tokens, prefix_tiles, width)


def gather_width(tiles: int, prefix_tiles: int, keep: float, fused: bool) -> int:
    """The most key tiles a query tile outside the prefix tiles keeps (:func:`block_keep_tiles`)."""
    return min(tiles, kept_count(keep, tiles) + prefix_tiles + int(fused))


def gathering_pays(width: int, block: int, tokens: int) -> bool:
    """Whether gathering ``width`` key tiles per query tile beats dense masked SDPA on a CPU.

    Measured (``benchmarks/training.py``, 2 CPUs, DeiT-Tiny heads, forward + backward, over runs): it
    needs at most half the scores *and* enough rows per matmul for the copies to pay: with 16-token
    tiles 0.86-0.89x of masked SDPA at 718 tokens but 0.96-1.03x at 405 and 0.81-1.10x at 181; with
    32-token tiles 0.56-0.70x at 718 and 0.60-0.81x at 405. Hence sequences of at least 8,192 /
    ``block`` tokens (512 at 16, 256 at 32); conservative below (181 tokens at 32: 0.86x once).
    """
    return 2 * width * block <= tokens and tokens * block >= 8192


def gathered_tiles(tiles: torch.Tensor, block: int, tokens: int, prefix_tiles: int, width: int) -> TileGather:
    """A :class:`TileGather` listing, for each query tile after the first ``prefix_tiles``, its kept
    key tiles (increasing), padded to ``width`` with masked ones."""
    rows = tiles[:, prefix_tiles:]
    order = rows.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]
    keys = order[..., None] * block + torch.arange(block, device=tiles.device)  # (B, T', width, block)
    kept = rows.gather(-1, order)[..., None] & (keys < tokens)
    bias = torch.zeros(kept.shape, device=tiles.device).masked_fill_(~kept, float("-inf"))
    return TileGather(order, bias.flatten(-2)[:, None, :, None], block, prefix_tiles)


# What a block hands the blocks after it until the next pruning block (see SparseVisionTransformer._block).
Mask = torch.Tensor | BlockMask | TileGather | None


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """FlexAttention with ``mask``, compiled so that skipped tiles are really skipped.

    Inside a ``torch.compile`` trace the plain function is traced into the model's graph; otherwise
    a module-level ``torch.compile(flex_attention, dynamic=False)`` is made on first use (one static
    graph per distinct shape; the recompile limit is raised so those never fall back to the unfused
    eager reference).
    """
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=mask)
    global _compiled_flex
    if _compiled_flex is None:
        allow_static_graphs()
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask)


def sparsify(
    vit: VisionTransformer,
    token_keep: float = 1.0,
    token_blocks: Sequence[int] | None = None,
    attn_keep: float = 1.0,
    fuse_token: bool = False,
    attn_mode: str = "exact",
    attn_block: int | None = None,
    token_merge: int = 0,
) -> SparseVisionTransformer:
    """A sparse view of ``vit`` that shares its parameters (and state_dict keys).

    Supported: timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` (DeiT) with standard
    pre-norm blocks, with or without a class token, with register tokens, ``no_embed_class`` and
    gradient checkpointing. Prefix tokens (class, distillation, registers) are never dropped. Patch
    tokens are ranked by the class token's attention (averaged over heads) or, without a class token,
    by the attention they receive (averaged over queries and heads); ``last_cls_attention_variance``
    is the variance of that same ranking row over the patch tokens. With gradient checkpointing on,
    each block is checkpointed while training.

    The attention level (``attn_keep < 1``) has two modes (module docstring for details):
    ``"exact"``, each query keeps its top keys, applied as a mask to dense attention (every score
    still computed: a regulariser, no time saved); ``"block"``, each ``attn_block``-token tile of
    queries keeps its top tiles of keys and FlexAttention computes only those (prefix tokens' tiles
    kept as rows and columns, the fused token's tile as a column, whole tiles at a time). Block mode
    runs FlexAttention compiled; where it has no backward (CPU, MPS) it gathers the kept tiles
    instead where that pays (long sequences), else runs the same tile choice as a dense
    masked SDPA (same result, no time saved). Block mode cannot apply attention dropout and refuses
    models with ``attn_drop > 0``.

    Args:
        vit: the timm model; the view copies its flags (training, grad_checkpointing) once.
        token_keep: share of patch tokens kept at each pruning block (1.0: none dropped).
        token_blocks: 0-based blocks that prune (default 3, 6, 9 of 12, scaled to the depth).
        attn_keep: share of keys (exact) or key tiles (block) each query (tile) keeps from a
            pruning block on (1.0: dense).
        fuse_token: add one token that is the score-weighted sum of the dropped ones.
        attn_mode: ``"exact"`` (default) or ``"block"``.
        attn_block: tile side in tokens for block mode, a power of two >= 16 (FlexAttention's GPU
            kernels need their own tiles to divide it, and shrink them to at most it only for powers
            of two >= 16). Default None: at each pruning block, :func:`tile_side` of its token count
            (the smallest such side leaving at most 24 tiles), so short sequences keep a fine choice
            among 16-token tiles (FlexAttention's own default, 128, would leave 1-5 tiles on them:
            nearly dense at any keep rate) and long ones get tiles that skip work efficiently.
        token_merge: ToMe's ``r``: patch tokens merged away in every block, between attention and
            MLP, by bipartite soft matching with proportional attention (:mod:`trainer.token_merging`);
            an alternative token level, so the keep rates must stay 1.0. 0: off.
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"sparsify needs a timm VisionTransformer, not {type(vit).__name__}")
    # A sparse view may be sparsified again; any other subclass is refused.
    sparse_class = type(vit) if type(vit) in SPARSE_CLASSES.values() else SPARSE_CLASSES.get(type(vit))
    if sparse_class is None:  # a subclass's own _pos_embed or forward_head would be silently bypassed
        raise TypeError(f"sparsify needs a timm VisionTransformer or VisionTransformerDistilled, not the subclass "
                        f"{type(vit).__name__}")
    for i, block in enumerate(vit.blocks):
        attn = getattr(block, "attn", None)  # parallel blocks have none (attns)
        gated = getattr(attn, "gate", None) is not None  # getattr: timm < 1.0.28 has no gate at all
        if type(block) is not Block or type(attn) is not Attention or gated:
            raise TypeError(f"block {i} is {type(block).__name__}/{type(attn).__name__}: "
                            "sparsify supports timm's pre-norm Block with the standard, ungated Attention")
    if attn_mode not in ATTN_MODES:
        raise ValueError(f"attn_mode must be one of {ATTN_MODES}, not {attn_mode!r}")
    if attn_block is not None and (isinstance(attn_block, bool) or not isinstance(attn_block, int)
                                   or attn_block < 16 or attn_block & (attn_block - 1)):
        raise ValueError(f"attn_block must be a power of two >= 16 (FlexAttention's GPU kernels need it), "
                         f"not {attn_block!r}")
    if attn_mode == "block":
        dropping = [i for i, block in enumerate(vit.blocks) if block.attn.attn_drop.p > 0]
        if dropping:
            raise ValueError(f"attn_mode='block' cannot apply attention dropout, which FlexAttention does not "
                             f"support, but blocks {dropping} have attn_drop p > 0: use attn_mode='exact' or "
                             f"attn_drop_rate=0")
    blocks = tuple(default_token_blocks(len(vit.blocks)) if token_blocks is None else token_blocks)
    if any(not 0 <= b < len(vit.blocks) for b in blocks):
        raise ValueError(f"token_blocks {blocks} outside 0..{len(vit.blocks) - 1}")
    sparse = copy.copy(vit)  # shares the module and parameter dicts, so every parameter is shared
    sparse.__class__ = sparse_class
    sparse.token_blocks = frozenset(blocks)
    sparse.fuse_token = fuse_token
    sparse.attn_mode = attn_mode
    sparse.attn_block = attn_block
    sparse.record_cls_attention = False
    sparse.last_cls_attention_variance = None
    sparse.last_token_counts = []
    sparse.last_input_tokens = (0, 0)
    if isinstance(token_merge, bool) or not isinstance(token_merge, int) or token_merge < 0:
        raise ValueError(f"token_merge must be a whole number >= 0, not {token_merge!r}")
    sparse.token_merge = token_merge
    sparse.token_keep = sparse.attn_keep = 1.0
    sparse.set_rates(token_keep, attn_keep)
    return sparse
