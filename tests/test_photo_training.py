"""``onion train`` on a folder of real photos of mixed sizes, as a new user runs it: the defaults
decide 224 px, patch 16 and the basic augmentation; a folder without a val split still trains."""
import dataclasses
import json
import math

import pytest

from helpers import onion_ok
from photos import photo_folder


@pytest.mark.slow
def test_defaults_train_photos_of_mixed_sizes_at_224(photos, tmp_path):
    run = tmp_path / "run"
    result = onion_ok("train", photos, "--out", run, "--epochs", "1", "--batch-size", "16", timeout=900)
    assert "Traceback" not in result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_kwargs"]["img_size"] == 224 and summary["model_kwargs"]["patch_size"] == 16
    assert summary["config"]["augment"] == "auto" and summary["token_counts"] == [[197] * 12]
    assert summary["train_images"] == 48 and not math.isnan(summary["val_top1"])


@pytest.mark.slow
def test_a_folder_without_val_trains_and_says_so_once(ray_local, tmp_path):
    photo_folder(tmp_path / "flat", {".": 10}, max_side=120)  # <class>/<image>: no split folders
    onion_ok("ingest", f"imagefolder:{tmp_path / 'flat'}", tmp_path / "data", "--ray-cpus", "1")
    result = onion_ok("train", tmp_path / "data", "--out", tmp_path / "run", "--epochs", "2", "--img-size", "32",
                      "--patch-size", "8", "--depth", "1", "--embed-dim", "32", "--num-heads", "2")
    assert result.stderr.count("has no val split, so this run reports no validation") == 1, result.stderr
    assert "--val-fraction" in result.stderr and "no validation" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isnan(summary["val_top1"]) and summary["epochs"] == 2 and summary["train_images"] == 40


@pytest.mark.slow
def test_every_scorer_runs_on_photos_at_224(photos, tmp_path):
    """A 224 px run on the photos, then each scorer over their train split: a score for every example."""
    from pipeline.curation.scoring import ScoreContext, compute_scores
    from trainer.config import TrainConfig
    from trainer.launch import train

    run = str(tmp_path / "run")
    summary = train(TrainConfig(dataset=photos, out=run, epochs=2, depth=1, embed_dim=32, num_heads=2,
                                batch_size=16, loader_workers=1))
    assert summary["model_kwargs"]["img_size"] == 224
    contexts = {"loss": ScoreContext(photos, run=run), "forgetting": ScoreContext(photos, run=run),
                "el2n": ScoreContext(photos, run=run, actors=1), "random": ScoreContext(photos),
                "exact": ScoreContext(photos), "phash": ScoreContext(photos),
                "embed": ScoreContext(photos, run=run), "embed-pixels": ScoreContext(photos, model="pixels")}
    keys = sorted(ScoreContext(photos).train_keys())
    assert len(keys) == 48
    for name, context in contexts.items():
        table = compute_scores(name.split("-")[0], dataclasses.replace(context, progress=False))
        assert sorted(table["key"].to_pylist()) == keys, name
        assert all(math.isfinite(score) for score in table["score"].to_pylist()), name
