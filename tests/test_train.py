"""The trainer on real data (scikit-learn digits), real processes, real checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import replace

import pyarrow.compute as pc
import pytest
import timm
import torch
from safetensors.torch import load_file

from helpers import ONION, onion, onion_ok
from shards import location, read_index
from trainer.checkpoint import load_weights
from trainer.config import TrainConfig
from trainer.dynamics import read_dynamics
from trainer.launch import train
from trainer.model import build_model

# A small ViT that learns digits in two epochs: 8x8 images, 4x4 patches, 3 blocks.
SMALL = dict(epochs=2, batch_size=16, depth=3, embed_dim=96, num_heads=4, patch_size=4, lr=1e-3,
             warmup_epochs=0.2, label_smoothing=0.0, weight_decay=0.01, loader_workers=1, token_blocks=[1])


def train_keys(dataset):
    index = read_index(location(dataset), columns=["key", "split", "status"])
    return sorted(index.filter(pc.equal(index["split"], "train"))["key"].to_pylist())


@pytest.mark.parametrize("sparsity", [dict(), dict(token_keep=0.5, attn_keep=0.5, fuse_token=True)])
def test_two_epochs_on_digits_learn_and_record_every_presentation(digits, tmp_path, sparsity):
    summary = train(TrainConfig(dataset=digits, out=str(tmp_path / "run"), **SMALL, **sparsity))
    assert summary["val_top1"] > 50.0, summary["val_top1"]  # chance is 10%
    assert summary["epochs"] == 2 and summary["train_seconds"] > 0 and summary["images_per_second"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_top1"] == summary["val_top1"]
    dynamics = read_dynamics(location(str(tmp_path / "run"))).to_pylist()
    keys = train_keys(digits)
    assert len(dynamics) == 2 * len(keys)  # one row per presentation
    for epoch in (0, 1):
        assert sorted(r["key"] for r in dynamics if r["epoch"] == epoch) == keys
    assert {"correct", "loss", "margin", "cls_attention_variance", "step"} <= set(dynamics[0])
    assert all(r["loss"] >= 0 and r["cls_attention_variance"] >= 0 for r in dynamics)
    assert all((r["margin"] > 0) == r["correct"] for r in dynamics if r["margin"] != 0)
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 3 and metrics[0].startswith("epoch,step,train_loss")
    assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_checkpoint_loads_into_plain_timm_and_gives_the_same_outputs(digits, tmp_path):
    config = TrainConfig(dataset=digits, out=str(tmp_path / "run"), **{**SMALL, "epochs": 1}, token_keep=0.5)
    train(config)
    built = json.loads((tmp_path / "run" / "model.json").read_text())
    dense = timm.create_model(built["model"], pretrained=False, **built["kwargs"])
    dense.load_state_dict(load_weights(location(str(tmp_path / "run"))))  # strict: same keys, same shapes
    # timm's own pretrained path, as a user loads a file: the model's checkpoint filter, the head kept
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("step-*")) / "model.safetensors"
    overlay = {"file": str(checkpoint), "num_classes": built["kwargs"]["num_classes"]}  # else timm drops the head
    plain = timm.create_model(built["model"], pretrained=True, pretrained_cfg_overlay=overlay,
                              **built["kwargs"]).eval()
    onion_model = build_model(replace(config, pretrained=str(checkpoint)), 8, 10, say=lambda _: None).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = onion_model(x)  # every token and connection kept (build_model's rates are 1.0)
        assert expected.shape == (4, 10) and expected.abs().sum() > 0
        assert torch.allclose(plain(x), expected, atol=1e-5) and torch.allclose(dense.eval()(x), expected, atol=1e-5)


def train_args(dataset, out, *extra):
    flags = ["--epochs", "3", "--batch-size", "32", "--depth", "2", "--embed-dim", "64", "--num-heads", "2",
             "--patch-size", "4", "--token-keep", "0.5", "--attn-keep", "0.5", "--token-blocks", "1",
             "--checkpoint-every", "7", "--loader-workers", "2", "--mixup", "0.2", "--drop-path", "0.1", *extra]
    return ["train", dataset, "--out", str(out), *flags]


# Photos of mixed sizes and modes, with DeiT's augmentation (crops, RandAugment in the loader workers,
# random erasing on the device) at 16 px, batches of 4: 12 steps an epoch.
PHOTO_ARGS = ("--img-size", "16", "--augment", "deit", "--batch-size", "4")


@pytest.mark.slow
@pytest.mark.parametrize("examples", ["all", "infobatch", "photos"])
def test_killed_training_resumes_to_identical_weights(request, tmp_path, examples):
    dataset = request.getfixturevalue("photos" if examples == "photos" else "digits")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    strategy = PHOTO_ARGS if examples == "photos" else ("--example-strategy", examples)
    kill_after = 15 if examples == "photos" else 50  # a step past a mid-epoch checkpoint (every 7 steps)
    onion_ok(*train_args(dataset, reference, *strategy))
    process = subprocess.Popen([*ONION, *train_args(dataset, killed, *strategy)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["step"] >= kill_after):
        assert process.poll() is None, "training finished before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    position = json.loads(latest.read_text())
    assert 0 < position["batch"] or position["epoch"] < 3  # killed mid-run
    # Resumed from a copy of the folder, with other options that apply on resume: the copy is the run, and
    # they do not change what it learns.
    copied = tmp_path / "copied"
    shutil.copytree(killed, copied)
    shutil.rmtree(killed)
    killed = copied
    resumed = onion("train", "--resume", killed, "--checkpoint-every", "5", "--eval-every", "2", "--log-every", "3",
                    "--progress-seconds", "0")
    assert resumed.returncode == 0, resumed.stderr
    final = [load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
             for run in (reference, killed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
    rows = [read_dynamics(location(str(run))) for run in (reference, killed)]
    assert rows[0].sort_by([("step", "ascending"), ("key", "ascending")]).equals(
        rows[1].sort_by([("step", "ascending"), ("key", "ascending")]))
    if examples == "infobatch":  # the killed epoch (1, pruned) chose the same examples when resumed
        chosen = [json.loads((run / "example_selections.json").read_text()) for run in (reference, killed)]
        assert chosen[0] == chosen[1] and sorted(chosen[0]) == ["1", "2"]
        assert Counter(rows[0]["epoch"].to_pylist())[1] == chosen[0]["1"]["kept"] < len(train_keys(dataset))


@pytest.mark.slow
@pytest.mark.parametrize("examples", ["all", "infobatch", "photos"])
def test_two_process_ddp_sees_every_example_once_per_epoch(request, tmp_path, examples):
    """2 ranks x 1 loader worker each (SMALL), and on photos 2 x 2 workers with augmentation."""
    from shards.selections import read_selection

    digits = request.getfixturevalue("photos" if examples == "photos" else "digits")
    photos = dict(img_size=16, augment="deit", loader_workers=2) if examples == "photos" else {}
    summary = train(TrainConfig(dataset=digits, out=str(tmp_path / "ddp"), nproc=2, **{**SMALL, **photos},
                                example_strategy="all" if examples == "photos" else examples))
    assert summary["world_size"] == 2
    dynamics = read_dynamics(location(str(tmp_path / "ddp")))
    keys = train_keys(digits)
    chosen = (json.loads((tmp_path / "ddp" / "example_selections.json").read_text())
              if examples == "infobatch" else {})
    assert sorted(chosen) == (["1"] if examples == "infobatch" else [])
    for epoch in (0, 1):
        if str(epoch) in chosen:  # both ranks trained on exactly the recorded selection, between them
            table = read_selection(location(digits), chosen[str(epoch)]["version"])
            keys = sorted(table.filter(table["kept"])["key"].to_pylist())
            assert 0 < len(keys) < len(train_keys(digits))
        seen = Counter(dynamics.filter(pc.equal(dynamics["epoch"], epoch))["key"].to_pylist())
        assert sorted(seen) == keys and set(seen.values()) == {1}
    parts = {p.name.split("-s")[0] for p in (tmp_path / "ddp" / "dynamics").iterdir()}
    assert parts == {"part-r0", "part-r1"}  # both ranks wrote into the same run


def test_config_file_and_cli_errors(digits, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 1\nbatch_size: 64\ndepth: 1\nembed_dim: 32\nnum_heads: 2\npatch_size: 4\nworkers: 0\n")
    run = tmp_path / "run"
    done = onion("train", digits, "--out", run, "--config", config, "--token-keep", "0.5")
    assert done.returncode == 0, done.stderr
    saved = json.loads((run / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["depth"] == 1 and saved["token_keep"] == 0.5 and saved["attn_keep"] == 1.0
    again = onion("train", digits, "--out", run, timeout=120)
    assert again.returncode == 2 and "already holds a run; continue it with --resume" in again.stderr
    config.write_text("epochz: 3\n")
    bad = onion("train", digits, "--out", tmp_path / "x", "--config", config, timeout=120)
    assert bad.returncode == 2 and "unknown settings ['epochz']" in bad.stderr


def test_eval_every_skips_validation_but_always_evaluates_the_last_epoch(digits, tmp_path, monkeypatch):
    from trainer.loop import Trainer

    calls = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self: calls.append(self.position.epoch) or evaluate(self))
    settings = {**SMALL, "epochs": 3, "eval_every": 2, "record_dynamics": False}
    summary = train(TrainConfig(dataset=digits, out=str(tmp_path / "run"), **settings))
    assert calls == [1, 2]  # after epochs 2 and 3 (0-based position before the epoch is counted)
    rows = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    val = [row[rows[0].index("val_top1")] for row in rows[1:]]
    assert val[0] == "nan" and float(val[1]) > 0 and float(val[2]) == summary["val_top1"] > 50.0, val


def test_training_on_a_selection_reads_only_its_kept_examples(digits, tmp_path):
    from pipeline.curation.selection import SourceExamples, initial_round
    from shards.selections import read_selection, save_selection

    dataset = location(digits)
    version = save_selection(dataset, initial_round(SourceExamples.of(dataset), 0.3, seed=2), {"test": True})
    table = read_selection(dataset, version)
    kept = sorted(table.filter(table["kept"])["key"].to_pylist())
    run = tmp_path / "run"
    flags = ["--epochs", "2", "--batch-size", "32", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
             "--patch-size", "4", "--loader-workers", "2"]
    onion_ok("train", digits, "--selection", version, "--out", run, *flags)
    dynamics = read_dynamics(location(str(run)))
    for epoch in (0, 1):
        assert sorted(dynamics.filter(pc.equal(dynamics["epoch"], epoch))["key"].to_pylist()) == kept
    assert json.loads((run / "config.json").read_text())["selection"] == version
    missing = onion("train", digits, "--selection", "v0999", "--out", tmp_path / "other", *flags, timeout=120)
    assert missing.returncode == 2 and "no selection 'v0999'" in missing.stderr, missing.stderr
    assert not (tmp_path / "other" / "config.json").exists(), "a refused run must not claim its folder"


def test_per_epoch_pruning_is_recorded_and_explained_by_inspect(digits, tmp_path):
    from pipeline.inspection.selections import key_lineage
    from shards.selections import read_selection

    run = tmp_path / "run"
    summary = train(TrainConfig(dataset=digits, out=str(run), **{**SMALL, "epochs": 3}, example_strategy="infobatch",
                                prune_ratio=0.5, prune_anneal=0.34))  # round(1.02) = 1: epoch 2 uses everything
    chosen = json.loads((run / "example_selections.json").read_text())
    assert sorted(chosen) == ["1"]
    table = read_selection(location(digits), chosen["1"]["version"])
    left_out = table.filter(pc.equal(table["reason"], "well-learned@e1"))["key"].to_pylist()
    assert len(left_out) == chosen["1"]["left_out"] > 0
    assert summary["train_images"] == 3 * len(train_keys(digits)) - len(left_out)
    lineage = key_lineage(location(digits), left_out[0])
    decisions = [(row["version"], row["kept"], row["reason"]) for row in lineage]
    assert (chosen["1"]["version"], False, "well-learned@e1") in decisions


def test_persistent_loader_workers_end_with_the_training_call(digits, tmp_path):
    import psutil

    def loader_workers():
        return {child.pid for child in psutil.Process().children(recursive=True)
                if "ray" not in " ".join(child.cmdline()).lower()}

    before = loader_workers()
    train(TrainConfig(dataset=digits, out=str(tmp_path / "run"), **{**SMALL, "loader_workers": 2, "epochs": 2},
                      example_strategy="infobatch", record_dynamics=True))
    assert loader_workers() - before == set(), "DataLoader workers outlived train()"
