"""Token merging (ToMe) as the sparse ViT's alternative token level: bipartite soft matching,
size-weighted merges, proportional attention, and the model unchanged when nothing merges."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from trainer import sparsify
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.token_merging import bipartite_matching, merge_tokens, proportional_bias

TINY = dict(img_size=32, patch_size=4, depth=3, embed_dim=32, num_heads=2, num_classes=10)


def vit(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, **{**TINY, **overrides}).eval()


@pytest.mark.parametrize("overrides", [{}, dict(reg_tokens=2, no_embed_class=True), dict(class_token=False,
                                                                                         global_pool="avg")])
def test_with_r_0_the_model_is_timms(overrides):
    model = vit(**overrides)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        merged = sparsify(model, token_merge=0)(images)
        torch.testing.assert_close(merged, reference, atol=1e-6, rtol=0)
        assert not torch.allclose(sparsify(model, token_merge=8)(images), reference, atol=1e-3)


def test_each_block_merges_r_patch_tokens_and_the_prefix_stays():
    model = sparsify(vit(reg_tokens=2, no_embed_class=True), token_merge=8)  # 3 prefix tokens, 64 patches
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.last_token_counts == [67 - 8, 67 - 16, 67 - 24]


def test_sizes_sum_to_the_input_count_and_prefix_tokens_never_merge():
    generator = torch.Generator().manual_seed(0)
    batch, prefix, tokens, width = 3, 2, 27, 8
    x = torch.randn(batch, tokens, width, generator=generator)
    size = None
    for r in (5, 5, 5, 5, 5):  # 25 patches: 20, 15, 10, 5 left, then at most 2 of the last 5 merge
        merge = bipartite_matching(torch.randn(batch, x.shape[1], 4, generator=generator), r, prefix)
        before = x.shape[1]
        x, size = merge_tokens(merge, x, size)
        assert x.shape[1] == before - min(r, (before - prefix) // 2)
        torch.testing.assert_close(size.sum(dim=1).squeeze(-1), torch.full((batch,), float(tokens)))
        assert torch.equal(size[:, :prefix], torch.ones(batch, prefix, 1))
    assert x.shape[1] == prefix + 3
    assert bipartite_matching(torch.randn(batch, 3, 4), 5, 2) is None  # one patch: nothing to merge


def test_a_merge_is_the_size_weighted_mean_of_the_best_matched_pair():
    # class token, then patches p0..p3: A = (p0, p2), B = (p1, p3). p2's key points as p1's does, p0's
    # is far from both, so with r = 1 p2 merges into p1.
    keys = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, -0.1]]])
    values = torch.tensor([[[100.0], [1.0], [2.0], [4.0], [8.0]]])
    merge = bipartite_matching(keys, 1, prefix=1)
    assert merge.sources.tolist() == [[1]] and merge.destinations.tolist() == [[0]] and merge.kept.tolist() == [[0]]
    x, size = merge_tokens(merge, values, torch.tensor([[[1.0], [1.0], [1.0], [3.0], [1.0]]]))
    # prefix, A's kept p0, then B: p1 joined by p2 (sizes 1 and 3), p3
    assert x.squeeze(-1).tolist() == [[100.0, 1.0, (2.0 * 1 + 4.0 * 3) / 4, 8.0]]
    assert size.squeeze(-1).tolist() == [[1.0, 1.0, 4.0, 1.0]]


def test_proportional_attention_equals_a_hand_computation_on_5_tokens():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    sizes = [1.0, 2.0, 1.0, 3.0, 1.0]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=proportional_bias(
        torch.tensor(sizes, dtype=torch.float64).view(1, 5, 1), torch.float64))
    scale = 1 / math.sqrt(3)
    for i in range(5):
        weights = [sizes[j] * math.exp(scale * float(q[0, 0, i] @ k[0, 0, j])) for j in range(5)]
        expected = sum(w * v[0, 0, j] for j, w in enumerate(weights)) / sum(weights)
        torch.testing.assert_close(out[0, 0, i], expected)


def test_a_merged_token_attends_as_the_copies_it_stands_for():
    """Proportional attention's point: one token of size 3 weighs in attention as 3 identical tokens do."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    copies = [0, 1, 1, 1, 2, 3]  # token 1 three times
    plain = F.scaled_dot_product_attention(q, k[:, :, copies], v[:, :, copies])
    sized = F.scaled_dot_product_attention(q, k, v, attn_mask=proportional_bias(
        torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=torch.float64).view(1, 4, 1), torch.float64))
    torch.testing.assert_close(sized, plain)


def test_merging_copies_of_one_token_changes_nothing_in_the_model():
    """A uniform image with the position embedding zeroed: every patch token is the same, so merging
    them (size-weighted means of equal tokens, weighed by size in the next blocks' attention) must give
    the output of the model that merges nothing; without proportional attention it would not."""
    model = vit()
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.0
        images = torch.full((2, 3, 32, 32), 0.3)
        reference = model(images)
        merging = sparsify(model, token_merge=20)
        merged = merging(images)
    assert merging.last_token_counts == [45, 25, 13]  # 64 patches, then 44 - 20, then 24 - 12 (at most half)
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter_and_the_same_input_merges_the_same():
    model = sparsify(vit(), token_merge=6).train()
    images = torch.randn(4, 3, 32, 32)
    model(images).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))


def test_merging_is_the_token_level_so_pruning_rates_are_refused():
    with pytest.raises(RunError, match=r"--token-merge 4 is the token level in place of pruning: give it with "
                                       r"--token-keep 1 and --attn-keep 1 \(not 0.7 and 1.0\)"):
        TrainConfig(dataset="d", token_merge=4, token_keep=0.7).check()
    with pytest.raises(RunError, match=r"--token-merge must be a whole number >= 0, not -1"):
        TrainConfig(dataset="d", token_merge=-1).check()
    model = sparsify(vit(), token_merge=4)
    with pytest.raises(ValueError, match="token merging is the token level here: attn_keep must stay 1.0"):
        model.set_rates(attn_keep=0.5)
