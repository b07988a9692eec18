"""A timm model named with ``--model`` is built as published (its input side, patch size and the input
normalisation of its pretrained config); onion's own model keeps its data-sized shape and 0.5 normalisation."""
import json

import numpy as np
import pytest
import torch

from helpers import onion
from pipeline.curation.scoring.el2n import run_normalization
from trainer.inputs import HALF, Normalization, prepare
from trainer.model import published_settings, with_published_settings

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
TINY = ("--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--epochs", "1", "--batch-size", "64",
        "--loader-workers", "0")


@pytest.mark.parametrize("name, side, patch, normalization", [
    ("deit_small_patch16_224", 224, 16, IMAGENET),
    ("deit_base_patch16_384", 384, 16, IMAGENET),
    ("vit_small_patch8_224", 224, 8, IMAGENET),
    ("vit_small_patch16_224", 224, 16, ([0.5] * 3, [0.5] * 3)),  # augreg weights expect 0.5
])
def test_a_named_model_is_built_as_published(name, side, patch, normalization):
    assert published_settings(name) == {"img_size": side, "patch_size": patch, "mean": normalization[0],
                                        "std": normalization[1]}


def test_given_settings_win_and_an_unnamed_model_gets_none():
    given = with_published_settings({"model": "deit_small_patch16_224", "img_size": 32, "std": [1.0] * 3})
    assert given == {"model": "deit_small_patch16_224", "img_size": 32, "patch_size": 16, "mean": IMAGENET[0],
                     "std": [1.0] * 3}
    assert with_published_settings({"epochs": 3}) == {"epochs": 3}


def test_normalisation_is_the_models_arithmetic():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8))
    imagenet = prepare(images, 4, torch.device("cpu"), Normalization(tuple(IMAGENET[0]), tuple(IMAGENET[1])))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    assert torch.allclose(imagenet, (images.float() / 255 - mean) / std, atol=1e-5)
    half = prepare(images, 4, torch.device("cpu"))
    assert Normalization().mean == HALF and torch.equal(half, images.float() / 127.5 - 1.0)  # bit for bit as before


def test_a_named_model_trains_with_its_normalisation_and_the_scorers_use_it(digits, tmp_path):
    named, own = tmp_path / "named", tmp_path / "own"
    result = onion("train", digits, "--out", named, "--model", "deit_tiny_patch16_224", "--img-size", "16",
                   "--patch-size", "4", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((named / "config.json").read_text())
    assert (config["img_size"], config["patch_size"], config["mean"], config["std"]) == (16, 4, *IMAGENET)
    assert run_normalization(str(named)) == Normalization(tuple(IMAGENET[0]), tuple(IMAGENET[1]))
    result = onion("train", digits, "--out", own, "--patch-size", "4", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((own / "config.json").read_text())
    assert (config["img_size"], config["mean"], config["std"]) == (None, None, None)  # the data's side, 0.5
    assert json.loads((own / "model.json").read_text())["kwargs"]["img_size"] == 8
    assert run_normalization(str(own)) == Normalization()


@pytest.mark.parametrize("flags, message", [
    (["--mean", "0.5,0.5"], "--mean must be 3 finite numbers (red, green, blue), not [0.5, 0.5]"),
    (["--std", "0.2,0,0.2"], "--std must be 3 finite numbers (red, green, blue), each > 0"),
    (["--mean", "a,b,c"], "expected three numbers like 0.485,0.456,0.406, not 'a,b,c'"),
])
def test_bad_normalisation_is_one_line(digits, tmp_path, flags, message):
    result = onion("train", digits, "--out", tmp_path / "run", *TINY, *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


@pytest.mark.slow
def test_published_deit_weights_fine_tune_at_the_models_own_shape(photos, tmp_path):
    """DeiT's own checkpoint layout (the weights under "model", a 1,000-class head) into a named DeiT at 224 px
    on photos of two classes: everything but the head loads, the inputs get ImageNet's statistics, it trains."""
    import timm

    torch.manual_seed(0)
    published = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    torch.save({"model": published, "epoch": 299}, tmp_path / "deit_tiny.pth")
    run = tmp_path / "run"
    result = onion("train", photos, "--out", run, "--model", "deit_tiny_patch16_224", "--pretrained",
                   tmp_path / "deit_tiny.pth", "--epochs", "1", "--batch-size", "16", "--lr", "1e-4",
                   "--warmup-epochs", "0", "--token-keep", "0.7", "--attn-keep", "0.3", "--keep-ramp-epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "classifier head left out: 1000 classes in the file, 2 here" in result.stderr
    built = json.loads((run / "model.json").read_text())
    assert (built["kwargs"]["img_size"], built["kwargs"]["patch_size"], built["mean"]) == (224, 16, IMAGENET[0])
    from safetensors.torch import load_file

    trained = load_file(str(next((run / "checkpoints").glob("step-*")) / "model.safetensors"))
    assert trained["head.weight"].shape == (2, 192)
    assert f"{len(published) - 2} tensors loaded" in result.stderr
    # a few steps at lr 1e-4 move each weight by about 1e-4 a step: the published weights are where it started
    for name in ("patch_embed.proj.weight", "pos_embed", "blocks.11.mlp.fc2.weight"):
        moved = (trained[name] - published[name]).abs().max()
        assert 0 < moved < 5e-3, (name, moved)
