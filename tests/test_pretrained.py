"""``--pretrained``: weights from a file or URL fitted to the model (head, position and patch
embeddings), an onion run's weights as a start, and every bad file refused in one line."""
import pickle

import fsspec
import pytest
import timm
import torch
from safetensors.torch import save, save_file

from helpers import RunsCode, onion
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.launch import train
from trainer.model import build_model
from trainer.pretrained import load_pretrained

TINY = dict(depth=1, embed_dim=32, num_heads=2)


def vit(seed: int, img_size: int = 16, patch_size: int = 4, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=patch_size,
                             num_classes=num_classes, **TINY)


@pytest.fixture
def weights(tmp_path):
    source = vit(seed=1)
    path = tmp_path / "source.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in source.state_dict().items()}, str(path))
    return source.state_dict(), str(path)


def load(model: torch.nn.Module, url: str) -> list[str]:
    said: list[str] = []
    load_pretrained(model, url, said.append)
    return said


def test_the_same_model_loads_every_tensor_head_included(weights):
    source, path = weights
    model = vit(seed=2)
    said = load(model, path)
    assert all(torch.equal(model.state_dict()[name], source[name]) for name in source)
    assert said == [f"--pretrained {path}: {len(source)} tensors loaded"]


def test_another_class_count_keeps_a_fresh_head_and_loads_the_rest(weights):
    source, path = weights
    model = vit(seed=2, num_classes=3)
    fresh_head = model.head.weight.clone()
    said = load(model, path)
    assert torch.equal(model.head.weight, fresh_head)
    assert all(torch.equal(model.state_dict()[name], source[name]) for name in source if not name.startswith("head."))
    assert "classifier head left out: 10 classes in the file, 3 here" in said[0]


def test_another_image_size_resamples_the_position_embedding(weights):
    _, path = weights
    model = vit(seed=2, img_size=32)
    said = load(model, path)
    assert "pos_embed resampled from [1, 17, 32] to [1, 65, 32]" in said[0]
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_another_patch_size_resamples_the_patch_embedding(weights):
    _, path = weights
    model = vit(seed=2, img_size=32, patch_size=8)
    said = load(model, path)
    assert "patch_embed.proj.weight resampled from [32, 3, 4, 4] to [32, 3, 8, 8]" in said[0]
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_a_torch_file_a_nested_checkpoint_and_a_url_load_too(weights, tmp_path):
    source, _ = weights
    torch.save({"model": source}, tmp_path / "checkpoint.pth")
    fsspec.filesystem("memory").pipe_file("/weights/source.safetensors", save(
        {name: tensor.contiguous() for name, tensor in source.items()}))
    for url in (str(tmp_path / "checkpoint.pth"), "memory://weights/source.safetensors"):
        model = vit(seed=3)
        load(model, url)
        assert all(torch.equal(model.state_dict()[name], source[name]) for name in source)


def bad_files(tmp_path, weights_path: str) -> dict[str, tuple[str, str]]:
    """name -> (path, what the one-line error must say)."""
    data = open(weights_path, "rb").read()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save({"epochs": 3, "name": "run"}, tmp_path / "numbers.pth")
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict(), tmp_path / "resnet.pth")
    torch.save({"weights": RunsCode(str(tmp_path / "ran"))}, tmp_path / "code.pth")  # as a malicious .pth is made
    (tmp_path / "code.pkl").write_bytes(pickle.dumps(RunsCode(str(tmp_path / "ran"))))
    return {
        "missing": (str(tmp_path / "nope.safetensors"), "no such file"),
        "folder": (str(tmp_path), "a folder, not a weights file"),
        "truncated": (str(tmp_path / "truncated.safetensors"), "not a readable safetensors file"),
        "text": (str(tmp_path / "notes.txt"), "torch.load(weights_only=True) refuses it"),
        "numbers": (str(tmp_path / "numbers.pth"), "holds no state dict of tensors"),
        "resnet": (str(tmp_path / "resnet.pth"), "not weights of"),
        "code": (str(tmp_path / "code.pth"), "GLOBAL posix.system whose module posix is blocked"),
        "pickle": (str(tmp_path / "code.pkl"), "torch.load(weights_only=True) refuses it"),
    }


def test_bad_files_are_one_error_naming_the_file_and_code_never_runs(weights, tmp_path):
    _, path = weights
    for name, (bad, message) in bad_files(tmp_path, path).items():
        with pytest.raises(RunError) as caught:
            load(vit(seed=2), bad)
        assert str(caught.value).startswith(f"--pretrained {bad}: ") and message in str(caught.value), (name, caught)
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran


def test_an_onion_run_starts_another_with_a_fresh_head(digits, tmp_path):
    first = TrainConfig(dataset=digits, out=str(tmp_path / "first"), epochs=1, batch_size=64, patch_size=4,
                        loader_workers=0, **TINY)
    train(first)
    checkpoint = next((tmp_path / "first" / "checkpoints").glob("step-*")) / "model.safetensors"
    said: list[str] = []
    model = build_model(TrainConfig(pretrained=str(checkpoint), patch_size=4, **TINY), 8, 10, say=said.append)
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint))
    assert all(torch.equal(model.state_dict()[name], saved[name]) for name in saved)
    assert said == [f"--pretrained {checkpoint}: {len(saved)} tensors loaded"]


def test_the_cli_refuses_a_missing_file_in_one_line(digits, tmp_path):
    result = onion("train", digits, "--out", tmp_path / "run", "--pretrained", tmp_path / "nope.pth", "--epochs", "1",
                   "--depth", "1", "--embed-dim", "32", "--num-heads", "2")
    lines = result.stderr.strip().splitlines()
    missing = tmp_path / "nope.pth"
    assert result.returncode == 2 and lines == [f"onion train: error: --pretrained {missing}: no such file"]
    assert not (tmp_path / "run" / "config.json").exists()  # the failed start released its folder
