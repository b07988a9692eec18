"""Scores and selections on hand-made inputs with known answers."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipeline.curation.scoring.dynamics_scores import forgetting, mean_loss, require_signal
from pipeline.curation.selection import (
    Candidates,
    SelectOptions,
    SourceExamples,
    choose,
    initial_round,
    largest_remainder,
    next_round,
    select,
)
from shards import UsageError, location
from shards.selections import save_selection


def presentations(rows):
    """rows: (key, step, correct, loss, variance); given out of order on purpose."""
    rows = list(reversed(rows))
    return pa.table({"key": [r[0] for r in rows], "epoch": [r[1] // 10 for r in rows], "step": [r[1] for r in rows],
                     "correct": [r[2] for r in rows], "loss": [r[3] for r in rows], "margin": [0.0] * len(rows),
                     "cls_attention_variance": [r[4] for r in rows]})


DYNAMICS = presentations([
    ("a", 0, True, 0.1, 0.2), ("a", 10, False, 2.0, 0.2), ("a", 20, True, 0.2, 0.2), ("a", 30, False, 1.5, 0.2),
    ("b", 1, False, 3.0, 0.3), ("b", 11, False, 3.0, 0.3), ("b", 21, False, 3.0, 0.3),
    ("c", 2, True, 0.1, 0.5), ("c", 12, True, 0.1, 0.5), ("c", 22, True, 0.1, 0.5),
    ("d", 3, False, 1.0, 0.1), ("d", 13, True, 0.3, 0.1), ("d", 23, True, 0.2, 0.1),
    ("zz-not-in-dataset", 4, True, 0.0, 0.0),
])


def test_forgetting_counts_never_learned_and_ties():
    table = forgetting(["a", "b", "c", "d", "e"], DYNAMICS)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["a"]["forgetting_events"] == 2 and rows["a"]["score"] == 2  # 2 events in 3 transitions, P = 4
    assert rows["b"]["learned"] is False and rows["b"]["score"] == 4  # never learned: P, above every learned one
    assert rows["c"]["score"] == 0 and rows["d"]["score"] == 0  # learned once, never forgotten
    assert rows["c"]["tiebreak"] < rows["d"]["tiebreak"]  # more concentrated attention: easier
    assert np.isnan(rows["e"]["score"]) and rows["e"]["presentations"] == 0
    assert table.num_rows == 5  # the unknown key is ignored
    candidates = Candidates(np.array(table["key"].to_pylist(), dtype=object), np.zeros(5),
                            table["score"].to_numpy(zero_copy_only=False), table["tiebreak"].to_numpy())
    assert [candidates.keys[i] for i in candidates.easiest_first()] == ["c", "d", "a", "b", "e"]


def test_one_presentation_each_never_learned_ranks_above_learned():
    """The demo's old defect: with one presentation per example no event is possible, and never-learned
    examples tied with the learned ones at 0, so the tie-break dropped the hardest as 'unforgettable'."""
    once = presentations([("x", 0, True, 0.1, 0.9), ("y", 1, False, 3.0, 0.0), ("z", 2, True, 0.2, 0.8),
                          ("w", 3, False, 2.5, 0.0)])
    rows = {r["key"]: r for r in forgetting(["w", "x", "y", "z"], once).to_pylist()}
    learned = [rows[k]["score"] for k in ("x", "z")]
    never = [rows[k]["score"] for k in ("w", "y")]
    assert min(never) > max(learned), rows
    assert [rows[k]["learned"] for k in "wxyz"] == [False, True, False, True]
    assert [rows[k]["presentations"] for k in "wxyz"] == [1, 1, 1, 1]


def test_fewer_presentations_are_scored_as_a_rate_below_never_learned():
    """A restored example seen twice (P = 4 for the others): events per transition, scaled to P - 1."""
    restored = presentations([("a", 0, True, 0.1, 0.2), ("a", 10, False, 2.0, 0.2), ("a", 20, True, 0.2, 0.2),
                              ("a", 30, True, 0.2, 0.2),
                              ("r", 25, True, 0.1, 0.1), ("r", 35, False, 1.0, 0.1),
                              ("s", 26, True, 0.1, 0.1), ("s", 36, True, 0.1, 0.1),
                              ("n", 27, False, 2.0, 0.1), ("n", 37, False, 2.0, 0.1)])
    rows = {r["key"]: r for r in forgetting(["a", "n", "r", "s"], restored).to_pylist()}
    assert rows["a"]["forgetting_events"] == 1 and rows["a"]["score"] == pytest.approx(1 * 3 / 3)
    assert rows["r"]["forgetting_events"] == 1 and rows["r"]["score"] == pytest.approx(1 * 3 / 1)
    assert rows["s"]["score"] == 0
    assert rows["n"]["score"] == 4 > rows["r"]["score"]


def test_a_signal_free_window_is_refused_in_one_line():
    once = presentations([("x", 0, True, 0.1, 0.9), ("y", 1, False, 3.0, 0.0)])
    with pytest.raises(UsageError, match=r"no signal in run-x.*1 presentation\(s\) per example.*--round-epochs 2"):
        require_signal(forgetting(["x", "y"], once), "run-x")
    require_signal(forgetting(["a", "b", "c", "d"], DYNAMICS), "run-y")  # 3-4 presentations each: fine


def test_mean_loss():
    rows = {r["key"]: r for r in mean_loss(["a", "b"], DYNAMICS).to_pylist()}
    assert rows["a"]["score"] == pytest.approx((0.1 + 2.0 + 0.2 + 1.5) / 4) and rows["b"]["score"] == pytest.approx(3.0)


def source(n=100, quarantined=(3, 50)):
    keys = np.array([f"k{i:03d}" for i in range(n)], dtype=object)
    ok = np.ones(n, dtype=bool)
    ok[list(quarantined)] = False
    return SourceExamples(keys, np.arange(n) % 4, ok)


def scores_for(src, seed=0):
    rng = np.random.default_rng(seed)
    return pa.table({"key": src.keys.tolist(), "score": rng.random(len(src.keys)), "tiebreak": np.zeros(len(src.keys))})


def test_rounds_keep_sizes_restore_only_from_the_pool_and_are_seeded():
    src = source()
    first = initial_round(src, keep=0.8, seed=1)
    kept0 = np.array(first["kept"].to_pylist())
    assert kept0.sum() == round(0.8 * 98)
    assert set(first["reason"].to_pylist()) == {"kept", "random-initial", "quarantined"}
    parent, version = first, "v0001"
    for round_number in (1, 2, 3):
        scores = scored_by("forgetting", scores_for(src, round_number))
        table = next_round(src, parent, version, scores, remove_n=7, round_number=round_number, seed=5)
        before, after = np.array(parent["kept"].to_pylist()), np.array(table["kept"].to_pylist())
        assert after.sum() == before.sum()  # size constant
        dropped, restored = before & ~after, ~before & after
        assert dropped.sum() == 7 and restored.sum() == 7
        pool = ~before & src.ok
        assert not (restored & ~pool).any()  # restored come only from the earlier pool
        assert not (restored & dropped).any()  # just-dropped do not come straight back
        assert not after[~src.ok].any()  # quarantined never kept
        easiest = [k for k in np.array(scores["key"])[np.argsort(scores["score"].to_numpy())] if before[int(k[1:])]][:7]
        assert sorted(src.keys[dropped]) == sorted(easiest)
        reasons = np.array(table["reason"].to_pylist())
        assert set(reasons[dropped]) == {f"unforgettable@r{round_number}"}
        assert set(reasons[restored]) == {f"restored@r{round_number}"}
        again = next_round(src, parent, version, scores, remove_n=7, round_number=round_number, seed=5)
        assert again.equals(table)
        other = next_round(src, parent, version, scores, remove_n=7, round_number=round_number, seed=6)
        assert not other.equals(table)
        parent, version = table, f"v{round_number + 1:04d}"
    # the drop's name follows the scorer recorded in the file, not the file's name
    by_loss = next_round(src, parent, version, scored_by("loss", scores_for(src, 9)), remove_n=3, round_number=4,
                         seed=5)
    assert "easy@r4" in by_loss["reason"].to_pylist() and "unforgettable@r4" not in by_loss["reason"].to_pylist()


def scored_by(scorer, table):
    return table.replace_schema_metadata({b"onion": json.dumps({"scorer": scorer}).encode()})


@pytest.mark.parametrize("strategy", ["drop-easy", "drop-hard", "random", "stratified"])
@pytest.mark.parametrize("balanced", [False, True])
def test_strategies_keep_the_asked_share_and_account_for_everything(strategy, balanced):
    src = source()
    table = select(src, scores_for(src), SelectOptions(keep=0.7, strategy=strategy, class_balanced=balanced, seed=2))
    kept = np.array(table["kept"].to_pylist())
    reasons = table["reason"].to_pylist()
    assert kept.sum() == round(0.7 * 98)
    assert sum(r == "quarantined" for r in reasons) == 2 and sum(r == "kept" for r in reasons) == kept.sum()
    assert table.num_rows == 100  # kept + dropped + quarantined == source
    if balanced:
        per_class = [kept[np.arange(100) % 4 == c].sum() for c in range(4)]
        assert max(per_class) - min(per_class) <= 1
    score = table["score"].to_numpy(zero_copy_only=False)
    if strategy == "drop-easy" and not balanced:
        assert score[kept].min() >= np.nanmax(score[~kept & src.ok])
    if strategy == "drop-hard" and not balanced:
        assert score[kept].max() <= np.nanmin(score[~kept & src.ok])


def test_stratified_cuts_the_hardest_and_spreads_over_bins():
    c = Candidates(np.array([f"k{i:03d}" for i in range(200)], dtype=object), np.zeros(200),
                   np.linspace(0, 1, 200), np.zeros(200))
    kept, reasons = choose(c, 100, SelectOptions(strategy="stratified", hard_cut=0.1, bins=10))
    assert len(kept) == 100 and kept.max() < 180  # the hardest 10% are cut
    assert sum(r == "hard-cut" for r in reasons.values()) == 20
    per_bin = np.bincount((c.score[kept] * 9.999 / 0.9).astype(int).clip(0, 9), minlength=10)
    assert per_bin.max() - per_bin.min() <= 2


def test_versions_are_immutable_and_reused(tmp_path):
    src = source()
    dataset = location(str(tmp_path))
    first = save_selection(dataset, initial_round(src, 0.8, 1), {"round": 0})
    assert first == "v0001"
    assert save_selection(dataset, initial_round(src, 0.8, 1), {"round": 0}) == "v0001"
    assert save_selection(dataset, initial_round(src, 0.8, 2), {"round": 0}) == "v0002"
    # the same decisions from other scores are a version of their own: a version keeps the scores it was made by
    rescored = initial_round(src, 0.8, 1)
    rescored = rescored.set_column(rescored.column_names.index("score"), "score",
                                   pa.array([0.5] * rescored.num_rows, pa.float64()))
    assert save_selection(dataset, rescored, {"round": 0}) == "v0003"


def test_saving_reads_no_stored_version_once_their_fingerprints_are_marked(tmp_path):
    """Per-epoch pruning saves a version per epoch: finding an identical version must not read every
    stored one. Versions saved before the markers existed are read once and marked."""
    src, dataset = source(), location(str(tmp_path))
    assert [save_selection(dataset, initial_round(src, 0.8, seed), {}) for seed in (1, 2)] == ["v0001", "v0002"]
    shutil.rmtree(tmp_path / "selections" / "fingerprints")  # as a dataset from before the markers
    assert save_selection(dataset, initial_round(src, 0.8, 2), {}) == "v0002"
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "selections" / "fingerprints").iterdir()) == [
        "v0001", "v0002"]
    (tmp_path / "selections" / "v0001.parquet").write_bytes(b"not parquet")  # would fail if it were read
    assert save_selection(dataset, initial_round(src, 0.8, 1), {}) == "v0001"
    assert save_selection(dataset, initial_round(src, 0.8, 3), {}) == "v0003"


def test_largest_remainder_adds_up():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(largest_remainder(77, [13, 40, 9, 38])) == 77
