"""attn_mode="block": tile-sparse attention run by (compiled) FlexAttention.

Small real timm models: 32 px / patch 4 gives 64 patches (+ prefix tokens), several 16-token tiles.
``token_blocks=(1,)`` on depth 4 so blocks 2 and 3 attend with the block mask (a pruning block
itself attends densely). On CPU, FlexAttention runs compiled in inference only (torch has no CPU
backward for it), so the gradient tests exercise the documented dense fallback there and the
FlexAttention backward only on CUDA.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from trainer import sparse_vit, sparsify
from trainer.sparse_vit import block_keep_tiles, kept_count

BLOCK = 16
PATCHES = 64
FAMILIES = {  # family: (timm overrides, prefix tokens)
    "class_token": ({}, 1),
    "registers": (dict(reg_tokens=4), 5),
    "class_free": (dict(class_token=False, global_pool="avg"), 0),
}
CUDA = torch.cuda.is_available()


def make(family="class_token", seed=0, **extra):
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=4, depth=4, num_classes=10, **FAMILIES[family][0], **extra)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def block_sparse(vit, **rates):
    return sparsify(vit, token_blocks=(1,), attn_mode="block", attn_block=BLOCK, **rates)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference(sparse, x):
    """The forward pass with dense SDPA, masked by the tile choice expanded to tokens.

    Ranking and token dropping are the model's own (``_ranking``, ``_drop_tokens``), so both sides
    choose the same tokens and tiles; the attention after a pruning block is what is under test.
    """
    prefix = sparse.num_prefix_tokens
    x = sparse.norm_pre(sparse.patch_drop(sparse._pos_embed(sparse.patch_embed(x))))
    mask = None
    for i, block in enumerate(sparse.blocks):
        attn = block.attn
        q, k, v = attn.qkv(block.norm1(x)).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
        prune = i in sparse.token_blocks
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if prune else mask)
        x = x + attn.proj(out.transpose(1, 2).flatten(2))
        if prune:
            row, full = sparse._ranking(q, k, attn.scale, full_map=True)
            patches = x.shape[1] - prefix
            x, full = sparse._drop_tokens(x, row, full)
            fused = x.shape[1] > prefix + (kept_count(sparse.token_keep, patches) if sparse.token_keep < 1 else patches)
            tiles = block_keep_tiles(full, sparse.attn_keep, BLOCK, prefix, fused)
            tokens = x.shape[1]
            mask = tiles.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)[:, None, :tokens, :tokens]
        x = x + block.mlp(block.norm2(x))
    return sparse.forward_head(sparse.norm(x))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_with_timm_at_keep_one(family):
    vit = make(family)
    sparse = block_sparse(vit, token_keep=1.0, attn_keep=1.0)
    assert (sparse.attn_mode, sparse.attn_block) == ("block", BLOCK)
    x = images()
    with torch.no_grad():
        assert (sparse(x) - vit(x)).abs().max().item() <= 1e-5  # the same ops, float32 rounding at most


# (family, attn_keep, token_keep, fuse): token counts after block 1 are 65, 47, 46, 51, 69, 64, 46.
CASES = [("class_token", 0.3, 1.0, False), ("class_token", 0.5, 0.7, True), ("class_token", 0.3, 0.7, False),
         ("registers", 0.3, 0.7, True), ("registers", 0.5, 1.0, False), ("class_free", 0.5, 1.0, False),
         ("class_free", 0.3, 0.7, True)]


@pytest.mark.parametrize("family,attn_keep,token_keep,fuse", CASES)
def test_flex_output_equals_dense_masked_reference(family, attn_keep, token_keep, fuse, monkeypatch):
    sparse = block_sparse(make(family), token_keep=token_keep, attn_keep=attn_keep, fuse_token=fuse)
    made = []
    build = sparse_vit.tile_block_mask
    monkeypatch.setattr(sparse_vit, "tile_block_mask", lambda *a: made.append(build(*a)) or made[-1])
    x = images()
    with torch.no_grad():
        out = sparse(x)
        expected = reference(sparse, x)
        dense = make(family)(x)
    assert len(made) == 1  # FlexAttention ran, with a BlockMask
    # Same scores, computed tile by tile instead of at once: float32 rounding only (seen ~3e-7).
    assert (out - expected).abs().max().item() <= 1e-5
    assert (out - dense).abs().max().item() > 1e-3  # and it is really sparse


def test_block_keep_tiles_pools_ranks_and_forces_prefix_and_fused_tiles():
    torch.manual_seed(0)
    tokens, keep = 70, 0.4  # 5 tiles of 16, the last holding 6 tokens
    full = torch.rand(3, tokens, tokens)
    tiles = math.ceil(tokens / BLOCK)
    for prefix, fused in ((0, False), (1, True), (20, False)):  # 20 prefix tokens span two tiles
        mask = block_keep_tiles(full, keep, BLOCK, prefix, fused)
        assert mask.shape == (3, tiles, tiles) and mask.dtype == torch.bool
        pooled = torch.tensor([[[full[b, i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].mean()
                                 for j in range(tiles)] for i in range(tiles)] for b in range(3)])
        top = pooled.topk(kept_count(keep, tiles), dim=-1).indices
        assert mask.gather(-1, top).all()  # each query tile keeps its strongest key tiles
        forced = torch.zeros(tiles, tiles, dtype=torch.bool)
        forced[:, :math.ceil(prefix / BLOCK)] = True
        forced[:math.ceil(prefix / BLOCK)] = True
        forced[:, -1] |= fused
        assert mask[:, forced].all()
        rest = mask.clone().scatter_(-1, top, False) & ~forced
        assert not rest.any()  # and nothing else


@pytest.mark.parametrize("fuse", [False, True])
def test_block_mask_computes_only_the_kept_tiles(fuse, monkeypatch):
    sparse = block_sparse(make(), token_keep=1.0 if not fuse else 0.7, attn_keep=0.3, fuse_token=fuse)
    made = []
    build = sparse_vit.tile_block_mask
    monkeypatch.setattr(sparse_vit, "tile_block_mask", lambda tiles, *a: made.append((tiles, build(tiles, *a)))
                        or made[-1][1])
    with torch.no_grad():
        sparse(images())
    (tiles, mask), = made
    tokens = 65 if not fuse else 1 + math.ceil(0.7 * PATCHES) + 1
    count = math.ceil(tokens / BLOCK)
    assert isinstance(mask, BlockMask) and mask.seq_lengths == (tokens, tokens) and mask.BLOCK_SIZE == (BLOCK, BLOCK)
    computed = mask.kv_num_blocks + mask.full_kv_num_blocks  # (B, 1, query tiles): key tiles each computes
    assert torch.equal(computed[:, 0], tiles.sum(-1).int())
    assert torch.equal(mask.to_dense()[:, 0].bool(), tiles)  # exactly the chosen tiles
    keep = kept_count(0.3, count)
    forced = 1 + fuse  # the prefix tile, and the fused token's tile
    assert (computed[:, 0, 0] == count).all()  # the class token's query tile keeps every key tile
    assert ((computed[:, 0, 1:] >= keep) & (computed[:, 0, 1:] <= keep + forced)).all()
    assert computed.sum().item() < 2 * count * count  # really fewer than all the tiles


@pytest.mark.parametrize("family", ["class_token", "class_free"])
def test_gradients_reach_every_parameter(family):
    sparse = block_sparse(make(family).train(), token_keep=0.7, attn_keep=0.3, fuse_token=True)
    sparse(images(4)).logsumexp(-1).mean().backward()  # CPU: the dense fallback, same tile choice
    missing = [n for n, p in sparse.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.norm() > 0]
    assert missing == []


def test_fallback_and_flex_agree_and_checkpointing_passes_the_block_mask(monkeypatch):
    vit = make()
    sparse = block_sparse(vit, token_keep=0.7, attn_keep=0.3)
    x = images()
    with torch.no_grad():
        flex = sparse(x)
    assert (sparse(x) - flex).abs().max().item() <= 1e-5  # with gradients on CPU: the dense masked fallback
    for p in vit.parameters():  # nothing needs a gradient, so CPU training runs FlexAttention
        p.requires_grad_(False)
    vit.set_grad_checkpointing(True)
    sparse = block_sparse(vit.train(), token_keep=0.7, attn_keep=0.3)
    seen = []
    monkeypatch.setattr(sparse_vit, "checkpoint",
                        lambda fn, *args, **kw: seen.append(type(args[2])) or torch.utils.checkpoint.checkpoint(
                            fn, *args, **kw))
    assert (sparse(x) - flex).abs().max().item() <= 1e-5
    assert seen[2:] == [BlockMask, BlockMask]  # blocks 2 and 3 received the BlockMask through checkpoint


@pytest.mark.skipif(not CUDA, reason="FlexAttention backward needs CUDA (torch has none for CPU)")
def test_flex_backward_on_cuda_matches_the_dense_reference():
    sparse = block_sparse(make().cuda().train(), token_keep=0.7, attn_keep=0.3, fuse_token=True)
    x = images(4).cuda()
    sparse(x).logsumexp(-1).mean().backward()
    grads = [p.grad.clone() for p in sparse.parameters()]
    sparse.zero_grad(set_to_none=True)
    reference(sparse, x).logsumexp(-1).mean().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-4, rtol=1e-3) for a, p in zip(grads, sparse.parameters()))


def test_refusals():
    with pytest.raises(ValueError, match="attention dropout"):
        block_sparse(make(attn_drop_rate=0.1), attn_keep=0.3)
    sparsify(make(attn_drop_rate=0.1), attn_keep=0.3)  # exact mode applies dropout, it is fine
    with pytest.raises(ValueError, match="attn_mode must be one of"):
        sparsify(make(), attn_mode="blocks")
    for bad in (8, 24, 16.0, True):
        with pytest.raises(ValueError, match="attn_block must be a power of two"):
            sparsify(make(), attn_mode="block", attn_block=bad)
