"""attn_mode="block": tile-sparse attention, run by (compiled) FlexAttention or, on CPU, by TileGather.

Small real timm models: 32 px / patch 4 gives 64 patches (+ prefix tokens), several 16-token tiles;
128 px gives 1,024, long enough for the CPU to gather the kept tiles. ``token_blocks=(1,)`` on depth 4
so blocks 2 and 3 attend with the block mask (a pruning block itself attends densely). torch has no
CPU backward for FlexAttention, so the model does not use it on CPU; the ``flex`` fixture makes it
(inference only) to test the CUDA path's masks here, and its backward is tested on CUDA only.
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


def make(family="class_token", seed=0, img_size=32, **extra):
    torch.manual_seed(seed)
    kwargs = dict(img_size=img_size, patch_size=4, depth=4, num_classes=10, **FAMILIES[family][0], **extra)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


@pytest.fixture
def flex(monkeypatch):
    """The model runs FlexAttention on CPU too, as it does on CUDA (forward only: no CPU backward)."""
    monkeypatch.setattr(sparse_vit, "FLEX_FORWARD_ONLY", frozenset())


def recording(monkeypatch, name):
    """Every value ``sparse_vit.<name>`` returns, in a list, as the model calls it."""
    made, build = [], getattr(sparse_vit, name)
    monkeypatch.setattr(sparse_vit, name, lambda *a: made.append(build(*a)) or made[-1])
    return made


def block_sparse(vit, **rates):
    return sparsify(vit, token_blocks=(1,), attn_mode="block", attn_block=BLOCK, **rates)


def images(batch=2, seed=1, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


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
def test_flex_output_equals_dense_masked_reference(family, attn_keep, token_keep, fuse, flex, monkeypatch):
    sparse = block_sparse(make(family), token_keep=token_keep, attn_keep=attn_keep, fuse_token=fuse)
    made = recording(monkeypatch, "tile_block_mask")
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


# (family, token_keep, fuse) at 128 px: 1,024 patches, after block 1 718-1,029 tokens (45-65 tiles).
GATHER_CASES = [("class_token", 1.0, False), ("class_token", 0.7, False), ("registers", 0.7, False),
                ("class_free", 0.7, True), ("class_free", 1.0, False)]


@pytest.mark.parametrize("family,token_keep,fuse", GATHER_CASES)
def test_cpu_gathers_the_kept_tiles_with_the_reference_outputs_and_gradients(family, token_keep, fuse, monkeypatch):
    sparse = block_sparse(make(family, img_size=128).train(), token_keep=token_keep, attn_keep=0.3, fuse_token=fuse)
    made = recording(monkeypatch, "tile_gather")
    x = images(size=128)
    out = sparse(x)
    assert len(made) == 1 and isinstance(made[0], sparse_vit.TileGather)  # the kept tiles were gathered
    out.logsumexp(-1).mean().backward()
    grads = [p.grad.clone() for p in sparse.parameters()]
    sparse.zero_grad(set_to_none=True)
    expected = reference(sparse, x)
    expected.logsumexp(-1).mean().backward()
    # Same scores in another order (tile by tile): float32 rounding only (seen <= 5e-7, both).
    assert (out - expected).abs().max().item() <= 1e-5
    assert all(torch.allclose(a, p.grad, atol=1e-5, rtol=1e-4) for a, p in zip(grads, sparse.parameters()))
    assert (out - make(family, img_size=128)(x)).abs().max().item() > 1e-3  # and it is really sparse


def test_tile_gather_lists_exactly_the_kept_tiles_and_only_where_it_pays():
    torch.manual_seed(0)
    keep, prefix = 0.3, 1
    for tokens, fused in ((600, True), (1025, False)):
        tiles = block_keep_tiles(torch.rand(2, tokens, tokens), keep, BLOCK, prefix, fused)
        gather = sparse_vit.tile_gather(tiles, BLOCK, tokens, prefix, keep, fused)
        count = math.ceil(tokens / BLOCK)
        width = kept_count(keep, count) + 1 + fused  # top tiles, the prefix tile, the fused token's tile
        assert gather.order.shape == (2, count - 1, width) and gather.prefix_tiles == 1
        bias = gather.bias.reshape(2, count - 1, width, BLOCK)
        listed = torch.zeros_like(tiles[:, 1:]).scatter_(-1, gather.order, bias[..., 0] == 0)
        assert torch.equal(listed, tiles[:, 1:])  # the query tiles after the prefix tile: kept tiles, no others
        keys = gather.order[..., None] * BLOCK + torch.arange(BLOCK)
        assert torch.isinf(bias[keys >= tokens]).all()  # keys past the sequence never count
        assert (bias[(keys < tokens) & (bias[..., :1] == 0)] == 0).all()
    # Where dense masked SDPA is faster (measured): 70 tokens, 5 tiles, 3 of them per query tile is over
    # half the scores; 400 tokens, a third of the scores, but 16-token tiles are too small to pay (32 pay).
    for tokens, block, pays in ((70, 16, False), (400, 16, False), (400, 32, True)):
        tiles = block_keep_tiles(torch.rand(2, tokens, tokens), 0.3, block, 1, True)
        gather = sparse_vit.tile_gather(tiles, block, tokens, 1, 0.3, True)
        assert (gather is not None) == pays, (tokens, block)


def test_default_tile_side_leaves_at_most_24_tiles():
    sides = {tokens: sparse_vit.tile_side(tokens) for tokens in (1, 46, 384, 385, 719, 768, 769, 1536, 1537, 4097)}
    assert sides == {1: 16, 46: 16, 384: 16, 385: 32, 719: 32, 768: 32, 769: 64, 1536: 64, 1537: 128, 4097: 256}


@pytest.mark.parametrize("size,side,gathers", [(32, 16, False), (128, 32, True)])
def test_default_tiles_are_chosen_per_sequence_length(size, side, gathers, monkeypatch):
    """By default a 65-token model pools 16-token tiles (46 tokens after pruning: 3 tiles); a 1,025-token
    one 32-token tiles (719 after pruning: 23 tiles), which the CPU gathers."""
    vit = make(img_size=size).train()
    x = images(size=size)
    chosen, gathered = recording(monkeypatch, "block_keep_tiles"), recording(monkeypatch, "tile_gather")
    default = sparsify(vit, token_blocks=(1,), attn_mode="block", token_keep=0.7, attn_keep=0.3)
    assert default.attn_block is None
    out = default(x)
    tokens = default.last_token_counts[-1]
    assert chosen[0].shape[-1] == math.ceil(tokens / side)
    assert (gathered[0].block if gathers else gathered[0]) == (side if gathers else None)
    explicit = sparsify(vit, token_blocks=(1,), attn_mode="block", token_keep=0.7, attn_keep=0.3, attn_block=side)
    assert torch.equal(out, explicit(x))  # the same tiles as asking for that side
    other = sparsify(vit, token_blocks=(1,), attn_mode="block", token_keep=0.7, attn_keep=0.3,
                     attn_block=48 - side)  # the other of 16 and 32
    assert (out - other(x)).abs().max().item() > 1e-4  # which really differs


@pytest.mark.parametrize("fuse", [False, True])
def test_block_mask_computes_only_the_kept_tiles(fuse, flex, monkeypatch):
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


@pytest.mark.parametrize("size,cpu_mask,side", [(32, torch.Tensor, 16), (128, sparse_vit.TileGather, 32)])
def test_cpu_paths_and_flex_agree_and_checkpointing_passes_the_mask(size, cpu_mask, side, monkeypatch):
    """With the default tiles: 16-token tiles at 32 px, 32-token tiles at 128 px (719 tokens after pruning)."""
    vit = make(img_size=size)
    x = images(size=size)
    seen = []
    monkeypatch.setattr(sparse_vit, "checkpoint",
                        lambda fn, *args, **kw: seen.append(type(args[2])) or torch.utils.checkpoint.checkpoint(
                            fn, *args, **kw))
    vit.set_grad_checkpointing(True)
    default_tiles = dict(token_blocks=(1,), attn_mode="block", token_keep=0.7, attn_keep=0.3)
    cpu = sparsify(vit.train(), **default_tiles)(x)  # 32 px: masked SDPA; 128 px: gathered
    assert seen[2:] == [cpu_mask, cpu_mask]  # blocks 2 and 3 received the CPU's mask through checkpoint
    with monkeypatch.context() as forced:
        forced.setattr(sparse_vit, "FLEX_FORWARD_ONLY", frozenset())
        made = recording(forced, "tile_block_mask")
        for p in vit.parameters():  # nothing needs a gradient: FlexAttention's forward runs on CPU
            p.requires_grad_(False)
        seen.clear()
        flex = sparsify(vit, **default_tiles)(x)
    assert seen[2:] == [BlockMask, BlockMask] and made[0].BLOCK_SIZE == (side, side)
    assert (cpu - flex).abs().max().item() <= 1e-5


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
