"""``onion curate``: rounds of train -> score -> select, training on each round's survivors (read through the
index, or from survivor shards when asked), and its resumption."""
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file

from helpers import ONION, onion_ok
from pipeline.curation.materialize import kept_url
from pipeline.curation.rounds import CurationPlan, curate
from pipeline.curation.scoring import ScoreContext, compute_scores, read_scores, write_scores
from pipeline.curation.selection import SourceExamples
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from shards import UsageError, location, read_manifest
from shards.selections import read_selection
from trainer.config import TrainConfig
from trainer.dynamics import read_dynamics

TINY = dict(batch_size=32, depth=2, embed_dim=64, num_heads=2, patch_size=4, lr=2e-3, warmup_epochs=0.3,
            loader_workers=1)


def test_three_rounds_train_on_their_survivors(digits, tmp_path):
    run = str(tmp_path / "run")
    plan = CurationPlan(rounds=3, round_epochs=2, keep=0.8, remove_n=60, scorer="forgetting")
    result = curate(digits, TrainConfig(dataset=digits, out=run, epochs=6, **TINY), plan, progress=False)
    versions = result["selections"]
    assert len(versions) == 3 and result["epochs"] == 6
    assert [r["restored"] for r in result["rounds"]] == [0, 60, 60]
    assert [r["dropped"] for r in result["rounds"][1:]] == [{"unforgettable": 60}, {"unforgettable": 60}]
    dataset = location(digits)
    kept_sets = []
    for number, version in enumerate(versions):
        table = read_selection(dataset, version)
        kept_sets.append(set(table.filter(table["kept"])["key"].to_pylist()))
        assert len(kept_sets[-1]) == len(kept_sets[0])  # constant size
        assert not location(kept_url(digits, version)).exists("manifest.json"), "no survivor shards unless asked"
        if number:
            assert set(table["reason"].to_pylist()) >= {f"unforgettable@r{number}", f"restored@r{number}"}
            assert len(kept_sets[-2] - kept_sets[-1]) == 60
    dynamics = read_dynamics(location(run))
    for epoch in range(6):  # each phase trained exactly on its round's survivors
        seen = dynamics.filter(pc.equal(dynamics["epoch"], epoch))["key"].to_pylist()
        assert sorted(seen) == sorted(kept_sets[epoch // 2])
    assert json.loads((tmp_path / "run" / "curation.json").read_text())["selections"] == versions
    for number in (1, 2):  # never-learned examples rank hardest: none is dropped as unforgettable
        scores = read_scores(dataset, f"forgetting-run-r{number}").to_pylist()
        never = {r["key"] for r in scores if r["presentations"] and not r["learned"]}
        table = read_selection(dataset, versions[number])
        dropped_now = {k for k, reason in zip(table["key"].to_pylist(), table["reason"].to_pylist(), strict=True)
                       if reason == f"unforgettable@r{number}"}
        assert not never & dropped_now
        assert len({r["score"] for r in scores if r["presentations"]}) >= 2


def test_survivor_shards_when_asked_are_what_the_round_trains_on(digits, tmp_path):
    run = str(tmp_path / "run")
    plan = CurationPlan(rounds=1, round_epochs=1, keep=0.5, scorer="loss", survivor_shards=True)
    result = curate(digits, TrainConfig(dataset=digits, out=run, epochs=1, **TINY), plan, progress=False)
    (version,) = result["selections"]
    table = read_selection(location(digits), version)
    kept = set(table.filter(table["kept"])["key"].to_pylist())
    assert read_manifest(location(kept_url(digits, version)))["selection"]["kept"] == len(kept)
    # the trainer read the survivor shards (config.json keeps the configuration curate was started with)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["dataset"] == kept_url(digits, version)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == digits
    assert sorted(read_dynamics(location(run))["key"].to_pylist()) == sorted(kept)


def test_rounds_drop_duplicates_first_and_never_restore_them(ray_local, tmp_path):
    dataset = str(tmp_path / "syn")
    ingest(open_source("synthetic", SourceOptions(count=600, image_size=16, dup_rate=0.15, near_dup_rate=0.0,
                                                  flip_rate=0.0)), dataset, IngestOptions(shard_size=200),
           command=["test"], progress=False)
    groups = compute_scores("exact", ScoreContext(dataset, progress=False))
    write_scores(location(dataset), "exact", groups)
    copies = sum(size - 1 for size in Counter(groups["group"].to_pylist()).values())
    assert copies >= 40  # the planted exact copies whose original is in train
    run = str(tmp_path / "run")
    plan = CurationPlan(rounds=2, round_epochs=1, keep=0.8, remove_n=20, scorer="loss", dedup="exact")
    result = curate(dataset, TrainConfig(dataset=dataset, out=run, epochs=2, **TINY), plan, progress=False)
    assert result["rounds"][0]["dropped"]["duplicate"] == copies
    source_size = len(SourceExamples.of(location(dataset)).keys)
    kept_sets = []
    for version in result["selections"]:
        table = read_selection(location(dataset), version)
        reasons = table["reason"].to_pylist()
        kept = table["kept"].to_pylist()
        duplicates = [i for i, reason in enumerate(reasons) if reason.startswith("duplicate-of:")]
        assert len(duplicates) == copies and not any(kept[i] for i in duplicates)  # never restored
        assert sum(kept) == round(0.8 * source_size) and table.num_rows == source_size
        kept_sets.append(set(table.filter(table["kept"])["key"].to_pylist()))
    dynamics = read_dynamics(location(run))
    for epoch, kept_set in enumerate(kept_sets):  # each round trained on its survivors, no copy among them
        assert set(dynamics.filter(pc.equal(dynamics["epoch"], epoch))["key"].to_pylist()) == kept_set
    # a plan whose round 0 leaves too few to restore from (the copies took the dropped share) is refused
    # before any training, counted from round 0's selection part by part, and leaves the run folder free
    tight = CurationPlan(rounds=2, round_epochs=1, keep=0.9, remove_n=20, scorer="loss", dedup="exact")
    pool = max(0, source_size - copies - round(0.9 * source_size))
    assert pool < 20
    with pytest.raises(UsageError, match=f"round 0 leaves {pool} examples to restore from, and each later round "
                                         "swaps 20"):
        curate(dataset, TrainConfig(dataset=dataset, out=str(tmp_path / "tight"), epochs=2, **TINY), tight,
               progress=False)
    assert not (tmp_path / "tight" / "curation.json").exists()


def test_a_signal_free_plan_is_refused_before_anything_is_written(digits, tmp_path):
    plan = CurationPlan(rounds=2, round_epochs=1, keep=0.8, remove_n=60, scorer="forgetting")
    with pytest.raises(UsageError, match="forgetting has no signal with --round-epochs 1.*--round-epochs 2 or more"):
        curate(digits, TrainConfig(dataset=digits, out=str(tmp_path / "run"), epochs=2, **TINY), plan, progress=False)
    assert not (tmp_path / "run").exists()


def curate_args(dataset, run):
    return ["curate", dataset, "--out", str(run), "--rounds", "3", "--round-epochs", "2",
            "--remove-n", "60", "--checkpoint-every", "5", "--batch-size", "32", "--depth", "2", "--embed-dim", "64",
            "--num-heads", "2", "--patch-size", "4", "--ray-cpus", "1"]


@pytest.mark.slow
def test_killed_curation_resumes_to_the_same_result(ray_local, tmp_path):
    copy, other = str(tmp_path / "digits"), str(tmp_path / "digits2")  # selections go into the dataset: one each
    for out in (copy, other):
        ingest(open_source("digits"), out, IngestOptions(shard_size=300), command=["test"], progress=False)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    onion_ok(*curate_args(copy, reference))
    process = subprocess.Popen([*ONION, *curate_args(other, killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    latest = killed / "checkpoints" / "latest.json"
    while time.time() < deadline and not (latest.exists() and json.loads(latest.read_text())["epoch"] >= 3):
        assert process.poll() is None, "curation finished before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    onion_ok(*curate_args(other, killed))
    final = [load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
             for run in (reference, killed)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
    versions = [json.loads((run / "curation.json").read_text())["selections"] for run in (reference, killed)]
    assert versions[0] == versions[1] == ["v0001", "v0002", "v0003"]
    for version in versions[0]:
        assert read_selection(location(copy), version).equals(read_selection(location(other), version))
    summaries = [json.loads((run / "summary.json").read_text()) for run in (reference, killed)]
    assert summaries[0]["val_top1"] == summaries[1]["val_top1"] and np.isfinite(summaries[0]["val_top1"])


def kept_keys(dataset: str, version: str) -> set[str]:
    table = read_selection(location(dataset), version, columns=["key", "kept"])
    return set(table.filter(table["kept"])["key"].to_pylist())


@pytest.mark.slow  # ~60 s: two curations, one on 2 processes
def test_curate_on_two_processes_presents_each_rounds_survivors_once_and_differs_within_its_swaps(digits, tmp_path):
    """``curate --nproc 2`` trains each round as ``onion train --nproc 2`` does. Round 0 is chosen before any
    training, so it is the one-process round 0; later rounds score dynamics that averaging gradients over 2
    ranks (and twice the examples per step) changes, so they may differ, but only within the swaps: each round
    moves ``remove_n`` examples out and as many in."""
    plan = CurationPlan(rounds=3, round_epochs=2, keep=0.8, remove_n=40, scorer="forgetting", seed=3)
    kept = {}
    for nproc in (1, 2):
        data = str(tmp_path / f"data-{nproc}")
        shutil.copytree(digits, data)  # the same dataset, with no selections of the other curation
        run = str(tmp_path / f"run-{nproc}")
        result = curate(data, TrainConfig(dataset=data, out=run, epochs=6, nproc=nproc,
                                          **{**TINY, "loader_workers": 0}), plan, progress=False)
        kept[nproc] = [kept_keys(data, version) for version in result["selections"]]
        assert json.loads((tmp_path / f"run-{nproc}" / "summary.json").read_text())["world_size"] == nproc
    dynamics = read_dynamics(location(str(tmp_path / "run-2")), ["key", "epoch"])
    assert {name.split("-s")[0] for name in os.listdir(tmp_path / "run-2" / "dynamics")} == {"part-r0", "part-r1"}
    for epoch in range(6):  # exactly once over the 2 ranks: the round's survivors, each once per epoch
        presented = pc.filter(dynamics["key"], pc.equal(dynamics["epoch"], epoch)).to_pylist()
        assert sorted(presented) == sorted(kept[2][epoch // plan.round_epochs])
    assert kept[1][0] == kept[2][0]
    for number in (1, 2):
        assert len(kept[1][number]) == len(kept[2][number])
        assert len(kept[1][number] - kept[2][number]) <= plan.remove_n * number
