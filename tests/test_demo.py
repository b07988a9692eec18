"""The README's main job, ``./run.sh demo``, end to end at a reduced size (digits, a 2-block ViT):
it must show the method working, not a table of ties."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.curation.scoring import read_scores
from shards import location
from shards.selections import read_selection, selection_parameters, selection_versions

ROOT = Path(__file__).resolve().parent.parent
SMALL = "--rounds 3 --round-epochs 2 --remove-n 100 --depth 2 --embed-dim 32 --num-heads 2 --patch-size 4 " \
        "--batch-size 64 --loader-workers 0"


@pytest.mark.slow
def test_the_demo_shows_scores_apart_and_never_drops_the_never_learned_as_unforgettable(tmp_path):
    data, run = tmp_path / "digits", tmp_path / "run"
    env = {**os.environ, "ONION_DEMO_SOURCE": "digits", "ONION_DEMO_SETTINGS": SMALL}
    result = subprocess.run(["./run.sh", "demo", str(data), str(run)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    dataset = location(str(data))
    versions = selection_versions(dataset)
    assert len(versions) == 3
    last = read_selection(dataset, versions[-1])
    scores = last["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    assert len(np.unique(scores[~np.isnan(scores)])) >= 2  # the histogram has something to show
    for number, version in enumerate(versions[1:], start=1):
        table = read_selection(dataset, version)
        details = read_scores(dataset, selection_parameters(table)["scores"]).to_pylist()
        never = {r["key"] for r in details if r["presentations"] and not r["learned"]}
        dropped = {k for k, why in zip(table["key"].to_pylist(), table["reason"].to_pylist())
                   if why == f"unforgettable@r{number}"}
        assert len(dropped) == 100 and not dropped & never
    for picture in ("scores.png", "extremes.png"):
        with Image.open(run / picture) as image:
            image.verify()
    for round_number in (1, 2):  # the closing summary, in words
        assert f"round {round_number} (v000{round_number + 1}): kept" in result.stdout
    assert "never-learned in its window" in result.stdout and "img/s" in result.stdout
    assert f"pictures: {run}/scores.png" in result.stdout
