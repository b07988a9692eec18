"""The resolution curriculum (``--curriculum-side``): a lower input side in the first epochs, decided
per epoch in the loader workers and on the device, full side at the end and at evaluation."""
import pytest
import torch

from helpers import assert_same_weights, last_weights, loader_epoch, resumed_from_mid_epoch, saved_config_of
from shards import ShardDataset
from trainer.augment import ImageTransform
from trainer.curriculum import epoch_sides
from trainer.errors import RunError
from trainer.launch import train
from trainer.loop import Trainer


def test_the_side_rises_in_whole_patches_and_the_last_epochs_are_full():
    assert epoch_sides(28, 16, 0.5, 30, 4) == (16,) * 5 + (20,) * 5 + (24,) * 5 + (28,) * 15
    assert epoch_sides(28, 16, 1.0, 4, 4) == (16, 16, 20, 28)  # the last epoch is full whatever --curriculum-until
    assert epoch_sides(224, 160, 0.5, 2, 16) == (160, 224)
    assert epoch_sides(28, None, 0.5, 30, 4) == ()
    for start in (18, 28, 32):
        with pytest.raises(RunError, match=f"--curriculum-side {start} must be a multiple of the patch side 4 "
                                           f"below the input side 28"):
            epoch_sides(28, start, 0.5, 30, 4)


def test_the_loader_workers_decode_each_epoch_at_its_side(photos):
    transform = ImageTransform(32, "basic", seed=3, sides=(16, 24, 32))
    for epoch, side in ((0, 16), (1, 24), (2, 32), (5, 32)):  # past the schedule (an extended run): full
        data = ShardDataset(photos, "train", seed=3, batch_size=4, channels=3, image_transform=transform)
        data.set_epoch(epoch)
        images, _ = loader_epoch(data, workers=2)[0]
        assert images.shape == (4, 3, side, side)


CURRICULUM = dict(patch_size=2, curriculum_side=4, curriculum_until=0.5, epochs=2, token_keep=1.0)


def test_low_side_epochs_run_fewer_tokens_and_evaluation_runs_at_the_full_side(digits, tmp_path):
    trainer = Trainer(saved_config_of(digits, tmp_path / "run", **{**CURRICULUM, "token_keep": 0.5}))
    assert trainer.sides == (4, 8)  # digits are 8 x 8
    trainer.train(until_epoch=1)
    # (batch size, tokens out of the one block): 2 x 2 patches + the class token, half of them kept
    assert {shape[1:] for shape in trainer.step_shapes} == {(1 + 2,)}
    trainer.evaluate()
    assert trainer.model.last_input_tokens == (16, 17)  # 4 x 4 patches: the full side
    trainer.train()
    assert {shape[1:] for shape in trainer.step_shapes} == {(1 + 2,), (1 + 8,)}


def test_a_curriculum_run_is_the_same_twice_and_resumed_mid_epoch_ends_the_same(digits, tmp_path):
    runs = [tmp_path / name for name in ("a", "b")]
    summaries = [train(saved_config_of(digits, run, checkpoint_every=5, **CURRICULUM)) for run in runs]
    assert_same_weights(last_weights(runs[0]), last_weights(runs[1]))
    full = train(saved_config_of(digits, tmp_path / "full", checkpoint_every=5, **{**CURRICULUM,
                                                                                   "curriculum_side": None}))
    assert summaries[0]["train_flops"] < 0.8 * full["train_flops"]  # epoch 0 at a quarter of the patches
    resumed_from_mid_epoch(runs[0], tmp_path / "resumed")
    assert_same_weights(last_weights(tmp_path / "resumed"), last_weights(runs[0]))
    assert not all(torch.equal(a, b) for a, b in zip(last_weights(runs[0]).values(),
                                                     last_weights(tmp_path / "full").values(), strict=True))
