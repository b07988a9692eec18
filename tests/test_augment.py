"""Photos of any size and shape: per-example transforms seeded from (seed, epoch, key), fixed-size
batches from the reader with exact-once epochs over ranks and workers, and the defaults they decide."""
import io
import random
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from helpers import loader_epoch
from photos import sample_photos
from shards import DatasetError, ShardDataset, location, read_index
from trainer.augment import ImageTransform, centre_box, device_augmentation
from trainer.config import TrainConfig
from trainer.inputs import augment_policy, data_info, input_side, reader_transforms


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def flower() -> bytes:
    return jpeg(sample_photos()["flower"])


@pytest.mark.parametrize("policy", ["basic", "deit"])
def test_training_crops_are_seeded_by_seed_epoch_and_key(flower, policy):
    transform = ImageTransform(48, policy, seed=0)
    first = transform(flower, "a", 0)
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    assert np.array_equal(first, ImageTransform(48, policy, seed=0)(flower, "a", 0))  # a fresh one: the same
    others = transform(flower, "a", 1), transform(flower, "b", 0), ImageTransform(48, policy, seed=1)(flower, "a", 0)
    assert not any(np.array_equal(first, other) for other in others)
    crops = {transform(flower, "a", epoch).tobytes() for epoch in range(8)}
    assert len(crops) == 8  # a new crop every epoch


def test_deit_draws_never_fail_at_the_top_magnitude(flower):
    """m9 with std 0.5 reaches magnitude 10 on ~2% of draws, where timm's posterize asks Pillow for 0 bits."""
    small = jpeg(np.asarray(Image.open(io.BytesIO(flower)).resize((40, 27))))
    transform = ImageTransform(16, "deit", seed=0)
    assert len({transform(small, f"k{n}", 0).tobytes() for n in range(2000)}) > 1900


def test_evaluation_is_the_centre_crop_and_draws_nothing(flower):
    evaluation = ImageTransform(48, "basic", train=False, seed=0)
    shown = evaluation(flower, "a", 0)
    assert np.array_equal(shown, ImageTransform(48, "basic", train=False, seed=7)(flower, "z", 5))
    # resize the short side (427) to 48 / 0.875, keep the centre 48: the same as cutting the centre 373.6 px
    expected = Image.open(io.BytesIO(flower)).resize((48, 48), Image.BILINEAR, box=(133.19, 26.69, 506.81, 400.31))
    assert np.abs(shown.astype(int) - np.asarray(expected).astype(int)).mean() < 3  # JPEG drafted at 1/4: close
    assert centre_box(640, 427) == pytest.approx((26.6875, 133.1875, 373.625, 373.625))
    none = ImageTransform(48, "none", train=True, seed=0)
    assert np.array_equal(none(flower, "a", 3), shown)  # policy none: no randomness even in training


def seed_every_generator(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("policy", ["basic", "deit"])
def test_a_transform_leaves_the_callers_generators_alone(flower, policy):
    seed_every_generator(1)
    expected = random.random(), np.random.random(), torch.rand(1).item()
    seed_every_generator(1)
    ImageTransform(32, policy, seed=0)(flower, "a", 0)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("policy", ["basic", "deit"])
def test_the_draws_do_not_depend_on_the_callers_generators(flower, policy):
    """Each policy seeds every generator it draws from (basic leaves numpy unseeded: it must not draw from it)."""
    drawn = set()
    for caller_seed in range(4):
        seed_every_generator(caller_seed)
        drawn.add(b"".join(ImageTransform(32, policy, seed=0)(flower, f"k{n}", 0).tobytes() for n in range(6)))
    assert len(drawn) == 1


def test_a_large_jpeg_is_decoded_at_the_scale_its_crop_needs(monkeypatch):
    pixels = np.asarray(Image.fromarray(sample_photos()["china"]).resize((2048, 1366)))
    lossless = io.BytesIO()
    Image.fromarray(pixels).save(lossless, format="PNG")
    full = ImageTransform(224, "basic", train=False)(lossless.getvalue(), "a", 0)  # PNG: decoded whole
    sizes = []
    draft = JpegImageFile.draft

    def spy(image, mode, size):
        result = draft(image, mode, size)
        sizes.append(image.size)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    drafted = ImageTransform(224, "basic", train=False)(jpeg(pixels), "a", 0)
    assert sizes == [(512, 342)]  # centre 1,195 px square: at 1/4 it keeps 299 >= 224 px; at 1/8 it would not
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 4  # the same picture
    ImageTransform(224, "basic")(jpeg(pixels), "a", 0)
    assert len(sizes) == 2 and sizes[1][0] in (256, 512, 1024, 2048)


@pytest.mark.parametrize("shape", [(1, 4000), (4000, 1), (3, 3)])
def test_strips_and_tiny_images_become_full_inputs(shape):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*shape, 3), 200, np.uint8)).save(buffer, format="PNG")
    for transform in ImageTransform(64, "basic"), ImageTransform(64, "deit"), ImageTransform(64, "none", train=False):
        assert transform(buffer.getvalue(), "strip", 0).shape == (64, 64, 3)


def test_photo_defaults_are_224_and_basic_equal_size_small_ones_unchanged(photos, digits):
    info = data_info(location(photos))
    assert not info.uniform and info.img_size == 224 and info.stored_side <= 400
    assert augment_policy(TrainConfig(), info) == "basic" and input_side(TrainConfig(), info) == 224
    assert input_side(TrainConfig(img_size=96), info) == 96
    small = data_info(location(digits))
    assert small.uniform and small.img_size == 8
    assert augment_policy(TrainConfig(), small) == "none"
    assert reader_transforms("none", small, 8, 0) == (None, None)  # the stacked fast path
    train, evaluation = reader_transforms("none", info, 224, 0)
    assert train == evaluation and not train.train  # mixed sizes without augmentation: the evaluation resize
    assert device_augmentation("deit", torch.device("cpu")) is not None and device_augmentation("basic", "cpu") is None


def test_unbatched_samples_come_out_as_the_batches_do(photos):
    """batch_size=None yields one CHW tensor per example: the same pixels the batched path stacks
    (mirrored crops are views of the pixels, and the decoded arrays are read-only)."""
    transform = ImageTransform(24, "basic", seed=5)
    single = {key: image for image, _, key in ShardDataset(photos, "train", shuffle=False, channels=3,
                                                        image_transform=transform)}
    batched = {key: image for images, _, keys in ShardDataset(photos, "train", shuffle=False, batch_size=7,
                                                             channels=3, image_transform=transform)
               for image, key in zip(images, keys)}
    assert single.keys() == batched.keys() and len(single) > 20
    assert all(single[key].shape == (3, 24, 24) and torch.equal(single[key], batched[key]) for key in single)


def test_mixed_sizes_stream_in_fixed_size_batches_exactly_once_over_ranks_and_workers(photos):
    index = read_index(location(photos), columns=["key", "split", "status", "width", "height"])
    train = index.filter(pc.and_(pc.equal(index["split"], "train"), pc.equal(index["status"], "ok")))
    assert len(set(zip(train["width"].to_pylist(), train["height"].to_pylist()))) > 20  # truly mixed
    transform = ImageTransform(32, "basic", seed=3)
    for epoch in (0, 1):
        seen: Counter = Counter()
        for rank in (0, 1):
            data = ShardDataset(photos, "train", seed=3, batch_size=5, channels=3, rank=rank, world_size=2,
                                image_transform=transform)
            data.set_epoch(epoch)
            for images, keys in loader_epoch(data, workers=2):
                assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
                seen.update(keys)
        assert sorted(seen) == sorted(train["key"].to_pylist()) and set(seen.values()) == {1}


def test_a_mid_epoch_restart_yields_the_same_augmented_batches(photos):
    transform = ImageTransform(32, "deit", seed=3)

    def epoch(start_batch: int) -> list[tuple[torch.Tensor, list[str]]]:
        data = ShardDataset(photos, "train", seed=3, batch_size=4, channels=3, image_transform=transform)
        data.set_epoch(1, start_batch=start_batch)
        return loader_epoch(data, workers=2)

    whole, resumed = epoch(0), epoch(3)
    assert len(resumed) == len(whole) - 3
    for (images, keys), (again, again_keys) in zip(whole[3:], resumed):
        assert keys == again_keys and torch.equal(images, again)


def test_mixed_sizes_without_a_transform_name_the_problem(photos):
    data = ShardDataset(photos, "train", batch_size=8, channels=3, shuffle=False)
    with pytest.raises(DatasetError, match=r"images of different sizes in one batch .* image_transform"):
        next(iter(data))
