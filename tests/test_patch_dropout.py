"""Input patch dropout (``--patch-drop``): timm's PatchDropout in the sparse ViT, counted in FLOPs,
drawn from the seeded RNG (so a mid-epoch resume continues bit for bit), never at evaluation."""

import torch

from helpers import assert_same_weights, last_weights, resumed_from_mid_epoch, saved_config_of
from trainer.config import TrainConfig
from trainer.flops import ViTShape, measured_forward_flops
from trainer.launch import train
from trainer.model import build_model

PATCHES = 64  # 32 px images in 4 px patches


def model(patch_drop: float, seed: int = 0, **settings) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = TrainConfig(depth=2, embed_dim=32, num_heads=2, patch_size=4, patch_drop=patch_drop, **settings)
    return build_model(config, 32, 10)


def test_training_forwards_see_the_kept_share_and_evaluation_sees_every_token():
    dropping = model(0.5).train()
    images = torch.randn(3, 3, 32, 32)
    dropping(images)
    assert dropping.last_input_tokens == (PATCHES, 1 + PATCHES // 2)  # the class token is always kept
    assert dropping.last_token_counts == [1 + PATCHES // 2] * 2
    whole = model(0.0)
    whole.load_state_dict(dropping.state_dict())  # PatchDropout has no weights: the same state dict
    dropping.eval()
    whole.eval()
    with torch.no_grad():
        assert torch.equal(dropping(images), whole(images))  # evaluation untouched
    assert dropping.last_input_tokens == (PATCHES, 1 + PATCHES)


def test_the_drawn_patches_follow_the_seed_and_differ_per_image():
    images = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)  # four copies of one image
    net = model(0.75).train()
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(net(images))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    assert not torch.equal(outputs[0][0], outputs[0][1])  # each image of a batch draws its own patches


def test_flops_are_counted_at_the_tokens_the_blocks_saw():
    net = model(0.5, token_keep=0.5, token_blocks=[1]).train()
    net.set_rates(token_keep=0.5)
    net(torch.randn(2, 3, 32, 32))
    assert net.last_input_tokens == (PATCHES, 33) and net.last_token_counts == [33, 17]
    shape = ViTShape.of(net)
    d, mlp = 32, 128
    by_hand = 2 * PATCHES * 48 * d + 2 * d * 10  # every patch is embedded; then the head
    for n, m in ((33, 33), (33, 17)):  # block 1 prunes between its attention and its MLP
        by_hand += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * m * d * mlp
    assert measured_forward_flops(shape, net.last_input_tokens, net.last_token_counts) == by_hand


def test_a_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(digits, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    summary = train(saved_config_of(digits, whole, epochs=2, checkpoint_every=5, patch_drop=0.5))
    dense = train(saved_config_of(digits, tmp_path / "dense", epochs=2, checkpoint_every=5))
    assert summary["train_images"] == dense["train_images"]
    assert summary["train_flops"] < 0.75 * dense["train_flops"]  # half the patches in, counted
    resumed_from_mid_epoch(whole, resumed)
    assert_same_weights(last_weights(resumed), last_weights(whole))
