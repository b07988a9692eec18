import math
import pickle

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from trainer import sparse_vit, sparsify
from trainer.flops import ViTShape, forward_flops, token_counts
from trainer.schedule import KeepSchedule, rate_pairs
from trainer.sparse_vit import SparseVisionTransformerDistilled, default_token_blocks

CONFIGS = [
    ("deit_tiny_patch16_224", dict(img_size=32, patch_size=4, num_classes=10)),
    ("vit_small_patch16_224",
     dict(img_size=48, patch_size=8, num_classes=7, depth=5, global_pool="avg", reg_tokens=2, qkv_bias=False)),
]


# Tiny models of every family sparsify supports: 64 patches, depth 4, so pruning blocks (1, 2, 3).
TINY = dict(img_size=32, patch_size=4, depth=4, embed_dim=32, num_heads=2, num_classes=10)
PATCHES = 64
# family: (timm model, overrides, prefix tokens, ranked by the class token's attention)
FAMILIES = {
    "class_token": ("deit_tiny_patch16_224", TINY, 1, True),
    "distilled": ("deit_tiny_distilled_patch16_224", TINY, 2, True),
    "registers": ("vit_small_patch16_224",
                  dict(TINY, reg_tokens=4, no_embed_class=True, global_pool="avg", qkv_bias=False), 5, True),
    "class_free": ("vit_small_patch16_224", dict(TINY, class_token=False, global_pool="avg"), 0, False),
    "class_free_registers": ("vit_small_patch16_224",
                             dict(TINY, class_token=False, reg_tokens=2, global_pool="avg", no_embed_class=True),
                             2, False),
}
each_family = pytest.mark.parametrize("family", list(FAMILIES))


def make(name, kwargs, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def make_family(family, seed=0):
    name, kwargs, _, _ = FAMILIES[family]
    return make(name, kwargs, seed)


def ranking_row(block, h, by_class):
    """The documented ranking row, from scratch, from a block's normalised input ``h``: the class
    token's attention, or the attention each token receives averaged over queries; heads averaged."""
    attn = block.attn
    q, k, _ = attn.qkv(h).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1).mean(1)  # (B, query, key)
    return weights[:, 0] if by_class else weights.mean(1)


@each_family
def test_identity_with_timm_at_full_rates(family):
    vit = make_family(family)
    sparse = sparsify(vit, token_keep=1.0, attn_keep=1.0)
    assert list(sparse.state_dict()) == list(vit.state_dict())
    assert all(a is b for a, b in zip(sparse.parameters(), vit.parameters()))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (sparse(x) - vit(x)).abs().max().item() <= 1e-5
    sparse.set_rates(token_keep=0.5, attn_keep=0.5)
    with torch.no_grad():
        assert (sparse(x) - vit(x)).abs().max().item() > 1e-3  # really sparse now
        sparse.set_rates(1.0, 1.0)
        assert (sparse(x) - vit(x)).abs().max().item() <= 1e-5  # and rates can go back


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep", [0.7, 0.35])
def test_token_counts_follow_the_rate_and_the_flops_model(keep, fuse):
    vit = make(*CONFIGS[0])
    sparse = sparsify(vit, token_keep=keep, token_blocks=(3, 6, 9), fuse_token=fuse)
    with torch.no_grad():
        sparse(torch.randn(2, 3, 32, 32))
    expected = [mlp for _, mlp in token_counts(ViTShape.of(vit), keep, {3, 6, 9}, fuse)]
    assert sparse.last_token_counts == expected
    patches = 64
    for block in (3, 6, 9):
        kept = math.ceil(keep * patches)
        assert expected[block] == 1 + kept + (1 if fuse else 0)
        patches = kept + (1 if fuse else 0)


def test_class_token_and_top_tokens_are_kept():
    sparse = sparsify(make(*CONFIGS[0]), token_keep=0.25)
    x = torch.randn(2, 9, 4)
    scores = torch.tensor([[0.0, 1, 9, 2, 8, 3, 7, 4, 5], [0.0, 9, 8, 7, 6, 5, 4, 3, 2]])
    kept, _ = sparse._drop_tokens(x, scores, None)
    assert torch.equal(kept[:, 0], x[:, 0])  # the class token, whatever its own score
    assert torch.equal(kept[0, 1:], x[0, [2, 4]]) and torch.equal(kept[1, 1:], x[1, [1, 2]])
    sparse.fuse_token = True
    fused, _ = sparse._drop_tokens(x, scores, None)
    weights = scores[0, [1, 3, 5, 6, 7, 8]] / scores[0, [1, 3, 5, 6, 7, 8]].sum()
    assert torch.allclose(fused[0, -1], (weights[:, None] * x[0, [1, 3, 5, 6, 7, 8]]).sum(0))


def test_attention_mask_keeps_top_keys_and_prefix_rows_and_columns():
    sparse = sparsify(make(*CONFIGS[1]), attn_keep=0.3)
    prefix = sparse.num_prefix_tokens
    full = torch.rand(3, 20, 20).softmax(-1)
    mask = sparse._attention_mask(full)
    keys = math.ceil(0.3 * 20)
    assert mask[:, :prefix].all() and mask[:, :, :prefix].all()
    top = full.topk(keys, dim=-1).indices
    assert mask.gather(-1, top).all()  # every query keeps its strongest keys
    per_row = mask[:, prefix:].sum(-1)
    assert ((per_row >= keys) & (per_row <= keys + prefix)).all()
    others = mask[:, prefix:].clone().scatter_(-1, top[:, prefix:], False)
    assert not others[:, :, prefix:].any()  # and nothing else beyond the prefix columns


@each_family
def test_gradients_reach_every_parameter_when_sparse(family):
    sparse = sparsify(make_family(family).train(), token_keep=0.5, attn_keep=0.4, fuse_token=True)
    loss = sparse(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in sparse.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_sparse_trained_weights_load_into_plain_timm():
    name, kwargs = CONFIGS[0]
    sparse = sparsify(make(name, kwargs).train(), token_keep=0.5, attn_keep=0.5)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(sparse(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    dense = timm.create_model(name, pretrained=False, **kwargs).eval()
    dense.load_state_dict(sparse.state_dict())
    sparse.eval().set_rates(1.0, 1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (dense(x) - sparse(x)).abs().max().item() <= 1e-5


def test_sparsify_refuses_models_it_cannot_handle():
    with pytest.raises(TypeError, match="needs a timm VisionTransformer"):
        sparsify(torch.nn.Linear(2, 2))

    class Custom(VisionTransformer):  # its own overrides would be bypassed
        pass

    with pytest.raises(TypeError, match="not the subclass Custom"):
        sparsify(Custom(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    gated = make_family("class_token")
    gated.blocks[1].attn.gate = torch.nn.Linear(32, 32)  # as timm >= 1.0.28 builds with gated=True
    with pytest.raises(TypeError, match="block 1 .*ungated Attention"):
        sparsify(gated)
    with pytest.raises(ValueError, match="token_keep must be in"):
        sparsify(make(*CONFIGS[0]), token_keep=0.0)


@pytest.mark.parametrize("fuse", [False, True])
@each_family
def test_pruning_keeps_prefix_tokens_and_the_top_ranked_patches(family, fuse):
    name, kwargs, prefix, by_class = FAMILIES[family]
    keep = 0.4
    sparse = sparsify(make(name, kwargs), token_keep=keep, attn_keep=0.5, fuse_token=fuse)
    sparse.record_cls_attention = True
    normed, drops = [], []
    for block in sparse.blocks:
        block.norm1.register_forward_hook(lambda module, args, out: normed.append(out))
    drop_tokens = sparse._drop_tokens

    def spy(x, row, full):
        kept, full = drop_tokens(x, row, full)
        drops.append((x, row, kept))
        return kept, full

    sparse._drop_tokens = spy
    with torch.no_grad():
        out = sparse(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, kwargs["num_classes"])
    assert sorted(sparse.token_blocks) == [1, 2, 3] and len(drops) == 3
    expected, patches, tokens = [], PATCHES, prefix + PATCHES
    for block in range(4):
        if block in sparse.token_blocks:
            patches = math.ceil(keep * patches) + fuse  # a fused token competes like a patch later
            tokens = prefix + patches
        expected.append(tokens)
    assert sparse.last_token_counts == expected
    for block, (x, row, kept) in zip((1, 2, 3), drops):
        assert torch.allclose(row, ranking_row(sparse.blocks[block], normed[block], by_class), atol=1e-6)
        assert torch.equal(kept[:, :prefix], x[:, :prefix])  # every prefix token, first, whatever its score
        n = math.ceil(keep * (x.shape[1] - prefix))
        top = row[:, prefix:].topk(n, dim=1).indices.sort(dim=1).values + prefix
        assert torch.equal(kept[:, prefix:prefix + n], x.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[2])))
    last_row = ranking_row(sparse.blocks[-1], normed[-1], by_class)  # the trainer's tie-break statistic
    assert torch.allclose(sparse.last_cls_attention_variance, last_row[:, prefix:].var(dim=1), rtol=1e-3, atol=0)


def test_distilled_deit_keeps_its_heads_and_pickles():
    vit = make_family("distilled").train()
    vit.set_distilled_training(True)  # timm then returns (class head, distillation head) while training
    sparse = sparsify(vit)
    assert type(sparse) is SparseVisionTransformerDistilled
    x = torch.randn(4, 3, 32, 32)
    ours, theirs = sparse(x), vit(x)
    assert isinstance(ours, tuple) and len(ours) == len(theirs) == 2
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(ours, theirs))
    sparse.set_rates(token_keep=0.5)
    assert [logits.shape for logits in sparse(x)] == [(4, 10), (4, 10)]
    assert type(pickle.loads(pickle.dumps(sparse))) is SparseVisionTransformerDistilled


@each_family
def test_grad_checkpointing_checkpoints_each_block_and_changes_nothing(family, monkeypatch):
    vit = make_family(family).train()
    vit.set_grad_checkpointing(True)
    sparse = sparsify(vit, token_keep=0.5, attn_keep=0.5, fuse_token=True)
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(sparse_vit, "checkpoint", counting)
    x = torch.randn(4, 3, 32, 32)

    def step():
        sparse.zero_grad(set_to_none=True)
        out = sparse(x)
        out.logsumexp(-1).mean().backward()
        return out.detach(), [p.grad.clone() for p in sparse.parameters()]

    out, grads = step()
    assert calls == [False] * 4  # every block, non-reentrant
    sparse.grad_checkpointing = False
    plain_out, plain_grads = step()
    assert len(calls) == 4
    assert torch.allclose(out, plain_out, atol=1e-6)  # recomputation kept the same tokens
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain_grads))
    sparse.grad_checkpointing = True
    sparse.set_rates(1.0, 1.0)
    assert (sparse(x) - vit(x)).abs().max().item() <= 1e-5  # timm checkpoints its own forward too
    with torch.no_grad():
        sparse(x)
    sparse.eval()
    sparse(x)
    assert len(calls) == 8  # only the one training forward with gradients added calls


@pytest.mark.parametrize("family,attn_mode", [("class_token", "exact"), ("class_token", "block"),
                                               ("registers", "exact"), ("class_free", "exact"),
                                               ("class_free_registers", "block")])
def test_explicit_attention_at_pruning_blocks_equals_the_fused_kernel(family, attn_mode, monkeypatch):
    """On CPU a pruning block that needs the whole map computes attention explicitly and ranks with
    its probabilities; the fused kernel plus a separate ranking pass must give the same outputs and
    gradients (float32 rounding only), so the same tokens and tiles."""
    vit = make_family(family).train()
    sparse = sparsify(vit, token_keep=0.5, attn_keep=0.4, fuse_token=True, attn_mode=attn_mode)
    x = torch.randn(4, 3, 32, 32)
    explicit = []
    attend = sparse_vit.SparseVisionTransformer._attend_and_rank
    monkeypatch.setattr(sparse_vit.SparseVisionTransformer, "_attend_and_rank",
                        lambda *a: explicit.append(1) or attend(*a))

    def step(reuse):
        monkeypatch.setattr(sparse_vit, "reuses_attention_map", lambda device: reuse)
        sparse.zero_grad(set_to_none=True)
        out = sparse(x)
        out.logsumexp(-1).mean().backward()
        return out.detach(), [p.grad.clone() for p in sparse.parameters()]

    out, grads = step(True)
    assert len(explicit) == 3  # pruning blocks 1, 2, 3
    fused_out, fused_grads = step(False)
    assert len(explicit) == 3
    assert (out - fused_out).abs().max().item() <= 1e-5  # the same tokens and tiles were kept
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads, fused_grads))
    sparse.set_rates(attn_keep=1.0)  # class token and no attention level: the fused kernel and the row only
    step(True)
    assert len(explicit) == 3 + (0 if FAMILIES[family][3] else 3)


def test_default_blocks_scale_with_depth():
    assert default_token_blocks(12) == (3, 6, 9)
    assert default_token_blocks(6) == (1, 3, 4)
    assert default_token_blocks(4) == (1, 2, 3)


def test_keep_schedule_warmup_cosine_constant_and_quantised():
    schedule = KeepSchedule(target=0.7, warmup_steps=10, ramp_steps=100, quantum=0.05)
    assert [schedule(s) for s in (0, 9, 10)] == [1.0, 1.0, 1.0]
    rates = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises
    assert rates[-1] == pytest.approx(0.7) and schedule(10_000) == pytest.approx(0.7)
    assert len({round(r, 6) for r in rates}) <= 7  # 1.0, 0.95, ..., 0.7
    assert all(abs(r / 0.05 - round(r / 0.05)) < 1e-6 for r in rates)


def test_staged_ramp_moves_both_rates_together_in_few_steps():
    ramp = dict(warmup_steps=10, ramp_steps=90, quantum=0.05)
    free = KeepSchedule(0.7, **ramp), KeepSchedule(0.3, **ramp)
    staged = KeepSchedule(0.7, stages=3, **ramp), KeepSchedule(0.3, stages=3, **ramp)
    assert len(rate_pairs(*free)) == 19  # each rate on its own 0.05 steps: 19 pairs, 19 graphs to compile
    pairs = rate_pairs(*staged)
    assert len(pairs) == 4 and pairs[0] == (1.0, 1.0) and pairs[-1] == pytest.approx((0.7, 0.3))
    for k, end in enumerate((40, 70, 100), start=1):  # each stage holds the rate the free ramp reaches at its end
        for schedule, reference in zip(staged, free):
            rates = {schedule(step) for step in range(end - 29, end + 1)}
            assert rates == {reference(end)}, (k, rates)
    assert [s(10) for s in staged] == [1.0, 1.0] and [s(5_000) for s in staged] == pytest.approx([0.7, 0.3])


def test_flops_match_a_hand_computation():
    shape = ViTShape(depth=2, dim=4, mlp_hidden=8, patches=4, patch_pixels=12, prefix_tokens=1, num_classes=3)
    embed, head = 2 * 4 * 12 * 4, 2 * 4 * 3

    def block(n, m):  # attention with n tokens, MLP with m tokens
        return 2 * n * 4 * 12 + 2 * n * n * 4 * 2 + 2 * n * 4 * 4 + 2 * m * 4 * 8 * 2

    assert forward_flops(shape) == embed + head + 2 * block(5, 5)
    # keep 0.5 at block 0: ceil(0.5 * 4) = 2 patches + class token after block 0's attention
    assert forward_flops(shape, 0.5, {0}) == embed + head + block(5, 3) + block(3, 3)
    assert forward_flops(shape, 0.5, {0}, fuse_token=True) == embed + head + block(5, 4) + block(4, 4)
