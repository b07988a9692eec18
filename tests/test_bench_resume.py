"""``onion bench train`` survives a stop: finished runs are kept by arm, seed and settings, the rest run;
pieces run with their own seeds merge into one table, each arm paired with dense of its own piece."""
import json
import math
from pathlib import Path

import pytest

from helpers import onion
from pipeline.bench import train as bench_module
from pipeline.bench.train import PRESETS, arm_plan, bench_merge, bench_train, fingerprint, read_runs, write_runs
from shards import UsageError


def plan_of(name: str, settings: dict, out: str = "/a", seed: int = 0, compile_mode: str = "off"):
    preset = PRESETS["smoke"]
    config, plan = arm_plan(name, settings, preset, f"{out}/data", Path(out), seed, compile_mode)
    return fingerprint(config, plan, preset)


def test_the_fingerprint_follows_what_decides_a_result_and_not_where_it_is_written():
    token = plan_of("token", {"token_keep": 0.5})
    assert token == plan_of("token", {"token_keep": 0.5}, out="/elsewhere", seed=3)  # place and seed are the key's
    assert token != plan_of("token", {"token_keep": 0.6})
    assert token != plan_of("token", {"token_keep": 0.5}, compile_mode="default")
    assert plan_of("example", {"curate": True}) != plan_of("example", {"curate": True, "keep": 0.7})
    assert plan_of("example", {"curate": True}) != plan_of("dense", {})


def run(arm: str, seed: int, settings: str = "s", preset: str = "smoke", top1: float = 50.0) -> dict:
    return {"arm": arm, "seed": seed, "settings": settings, "preset": preset, "machine": "2 CPUs", "top1": top1,
            "seconds": 10.0, "images": 100, "flops": 1e9, "images_per_second": 10.0, "train_seconds": 9.0}


def test_merge_refuses_pieces_that_cannot_be_paired_or_that_overlap(tmp_path):
    a, b, c, d = (tmp_path / name for name in "abcd")
    for folder, runs in ((a, [run("dense", 0), run("token", 0)]), (b, [run("dense", 0), run("token", 0)]),
                         (c, [run("dense", 1), run("token", 1, settings="other")]), (d, [run("token", 2)])):
        folder.mkdir()
        write_runs(folder, runs)
    with pytest.raises(UsageError, match=r"seed 0 of dense is in both .*a and .*b; run each piece with its own seeds"):
        bench_merge("smoke", [a, b], tmp_path / "out")
    with pytest.raises(UsageError, match=r"token ran with other settings in .*a than in .*c"):
        bench_merge("smoke", [a, c], tmp_path / "out")
    with pytest.raises(UsageError, match=r"d: seed 2 of token has no dense run of the same seed there to pair with"):
        bench_merge("smoke", [a, d], tmp_path / "out")
    with pytest.raises(UsageError, match=r"a: no finished run of preset cpu in its runs.json"):
        bench_merge("cpu", [a], tmp_path / "out")
    (d / "runs.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"d/runs.json: not a bench's run record"):
        read_runs(d)
    assert not (tmp_path / "out").exists()


def test_merge_pairs_each_arm_with_dense_of_its_piece(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, runs in ((a, [run("dense", 0, top1=50.0), run("token", 0, top1=49.0)]),
                         (b, [run("dense", 1, top1=60.0), run("token", 1, top1=62.0),
                              run("dense", 9, preset="cpu")])):  # another preset's run: not this table's
        folder.mkdir()
        write_runs(folder, runs)
    rows = {row["arm"]: row for row in bench_merge("smoke", [a, b], tmp_path / "out")}
    assert rows["token"]["pairs"] == 2 and rows["token"]["paired_delta"] == pytest.approx(0.5)  # (-1 + 2) / 2
    assert not math.isnan(rows["token"]["paired_low"])
    assert [(r["arm"], r["seed"]) for r in json.loads((tmp_path / "out" / "runs.json").read_text())] == [
        ("dense", 0), ("dense", 1), ("token", 0), ("token", 1)]
    assert "2 seed(s) merged from 2 folder(s), 2 CPUs" in (tmp_path / "out" / "results.md").read_text()


def test_a_rerun_keeps_the_recorded_runs_it_has_not_reached_yet_in_runs_json(ray_local, tmp_path, monkeypatch):
    """A stop while dense of seed 0 trains must not lose the record of dense of seed 1, which the rerun
    reaches only later: runs.json is rewritten after each run, and it holds every recorded run each time."""
    out, preset = tmp_path / "bench", PRESETS["smoke"]
    config, plan = arm_plan("dense", {}, preset, str(out / "data" / preset.source), out, seed=1)
    out.mkdir()
    write_runs(out, [run("dense", 1, settings=fingerprint(config, plan, preset), top1=61.0)])
    recorded_at_each_start = []

    def training(name: str, config, plan) -> dict:  # stands in for a training run: the record around it is tested
        recorded_at_each_start.append(sorted((r["arm"], r["seed"]) for r in read_runs(out)))
        return {key: value for key, value in run(name, config.seed, top1=60.0).items() if key in RESULT_KEYS}

    monkeypatch.setattr(bench_module, "run_arm", training)
    bench_train("smoke", out, seeds=2, only=["token"])  # seed 0: dense, token; seed 1: token, dense (kept)
    assert recorded_at_each_start == [[("dense", 1)], [("dense", 0), ("dense", 1)],
                                      [("dense", 0), ("dense", 1), ("token", 0)]]
    assert sorted((r["arm"], r["seed"]) for r in read_runs(out)) == [("dense", 0), ("dense", 1), ("token", 0),
                                                                     ("token", 1)]
    assert next(r for r in read_runs(out) if (r["arm"], r["seed"]) == ("dense", 1))["top1"] == 61.0  # as recorded


RESULT_KEYS = ("arm", "seed", "top1", "seconds", "images", "flops", "images_per_second", "train_seconds")


@pytest.mark.slow  # five smoke-preset trainings (about a minute on 2 cores)
def test_a_stopped_bench_run_again_keeps_its_finished_runs_and_runs_the_rest(ray_local, tmp_path, capfd):
    out = tmp_path / "bench"
    first = {r["arm"]: r for r in bench_train("smoke", out, seeds=1, only=["token"])}
    runs = read_runs(out)
    assert [r["arm"] for r in runs] == ["dense", "token"] and all(r["settings"] for r in runs)
    summary = out / "runs" / "dense-seed0" / "summary.json"
    untouched = summary.stat().st_mtime_ns
    write_runs(out, runs[:1])  # as if stopped while token trained: its folder is half there, unrecorded
    capfd.readouterr()
    again = {r["arm"]: r for r in bench_train("smoke", out, seeds=1, only=["token"])}
    err = capfd.readouterr().err
    assert "seed 0 dense: kept from" in err and "seed 0 token: kept" not in err
    assert summary.stat().st_mtime_ns == untouched  # dense was not trained again
    assert again["dense"]["seconds"] == first["dense"]["seconds"]  # its recorded run, as it was
    assert again["token"]["top1_mean"] == first["token"]["top1_mean"]  # token trained again, the same result
    assert [r["arm"] for r in read_runs(out)] == ["dense", "token"]

    piece = tmp_path / "piece"  # seed 1 elsewhere, from the command line; then one table of both
    result = onion("bench", "train", "--preset", "smoke", "--only", "token", "--first-seed", "1", "--seeds", "1",
                   "--out", piece)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted((r["arm"], r["seed"]) for r in read_runs(piece)) == [("dense", 1), ("token", 1)]
    merged = onion("bench", "train", "--preset", "smoke", "--merge", out, piece, "--out", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    table = json.loads((tmp_path / "merged" / "results.json").read_text())["arms"]
    by_seed = {(r["arm"], r["seed"]): r["top1"] for r in read_runs(out) + read_runs(piece)}
    assert table["token"]["pairs"] == 2 and table["token"]["paired_delta"] == pytest.approx(
        sum(by_seed["token", s] - by_seed["dense", s] for s in (0, 1)) / 2)
    refused = onion("bench", "train", "--preset", "smoke", "--merge", out, "--seeds", "2")
    assert refused.returncode == 2 and "--merge trains nothing: --seeds do not apply to it" in refused.stderr
