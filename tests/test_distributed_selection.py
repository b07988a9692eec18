"""The distributed selection (Ray actors each holding some parts of the rows) decides exactly what the
single-process ``select``, ``initial_round`` and ``next_round`` decide, for 1, 2 and 3 actors, on rows full
of ties (coarse scores, equal tiebreaks, unscored and quarantined rows, duplicate groups spanning parts),
and the driver never receives row-sized replies."""
import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.curation.distributed_selection import SelectionWorkers, distributed_select, return_table
from pipeline.curation.selection import SelectOptions, SourceExamples, initial_round, next_round, select
from shards import UsageError

COLUMNS = ["key", "kept", "reason", "score"]
PART_SHARES = [0.45, 0.05, 0.3, 0.2, 0.0]  # uneven; part 1 has no usable row, part 4 no row at all


def tied_rows(n: int, seed: int) -> pa.Table:
    """Rows in no particular order: scores on a 0.1 grid (a tenth unscored), tiebreaks 0 or 1, 5 classes
    with the unlabelled (-1), some quarantined; keys of several lengths, a few beyond ASCII."""
    rng = np.random.default_rng(seed)
    keys = [f"k{i:06d}" for i in range(n - 40)] + [f"k{i}" for i in range(20)] + [f"é{i}" for i in range(20)]
    score = np.round(rng.random(n), 1)
    score[rng.random(n) < 0.1] = np.nan
    rows = pa.table({"key": keys, "label": rng.integers(-1, 4, n), "ok": rng.random(n) > 0.05, "score": score,
                     "tiebreak": np.where(rng.random(n) < 0.8, 0.0, 1.0)})
    return rows.take(rng.permutation(n))


def split(rows: pa.Table, seed: int) -> list[pa.Table]:
    """Rows to parts at random, so keys, ties and duplicate groups interleave across parts."""
    rng = np.random.default_rng(seed)
    part = rng.choice(len(PART_SHARES), size=rows.num_rows, p=PART_SHARES)
    ok = rows["ok"].to_numpy(zero_copy_only=False) & (part != 1)
    rows = rows.set_column(rows.column_names.index("ok"), "ok", pa.array(ok))
    return [rows.filter(pa.array(part == p)) for p in range(len(PART_SHARES))]


def duplicate_groups(rows: pa.Table, seed: int, members: int = 600) -> pa.Table:
    """Groups of 2 to 5 random keys (quarantined ones too), singletons listed as a grouping table lists
    them, and 32-bit hashes a few bits apart, so ``typical`` sees ties in its distance sums."""
    rng = np.random.default_rng(seed)
    keys = np.array(rows["key"].to_pylist(), dtype=object)[rng.permutation(rows.num_rows)]
    sizes = rng.integers(2, 6, members // 2)
    sizes = sizes[np.cumsum(sizes) <= members]
    group = np.repeat(np.arange(len(sizes)), sizes)
    singles = np.arange(len(sizes), len(sizes) + 100)
    group = np.concatenate([group, singles])
    base = rng.integers(0, 2**32, len(group) + 1, dtype=np.uint64)[group]
    flips = np.uint64(1) << rng.integers(0, 2, len(group)).astype(np.uint64)
    hashes = np.where(rng.random(len(group)) < 0.5, base, base ^ flips).astype(">u4")
    return pa.table({"key": keys[:len(group)].tolist(), "group": group,
                     "hash": pa.array([h.tobytes() for h in hashes], pa.binary(4))})


def single_process_inputs(parts: list[pa.Table]) -> tuple[SourceExamples, pa.Table]:
    """The same rows as ``make_selection`` sees them: the source sorted by key, and a scores table that
    lacks some unscored keys (their tiebreak counts as 0, as in the parts)."""
    rows = pa.concat_tables([p.select(["key", "label", "ok", "score", "tiebreak"]) for p in parts]).sort_by("key")
    source = SourceExamples(np.array(rows["key"].to_pylist(), dtype=object), rows["label"].to_numpy(),
                            rows["ok"].to_numpy(zero_copy_only=False))
    score, tiebreak = rows["score"].to_numpy(), rows["tiebreak"].to_numpy()
    listed = ~(np.isnan(score) & (tiebreak == 0) & (np.arange(len(score)) % 2 == 0))
    return source, rows.filter(pa.array(listed)).select(["key", "score", "tiebreak"])


def decided(tables: list[pa.Table]) -> list[dict]:
    return pa.concat_tables(tables).select(COLUMNS).sort_by("key").to_pylist()


@pytest.fixture(scope="module")
def data() -> dict:
    rows = tied_rows(3000, seed=1)
    parts = split(rows, seed=2)
    for p in parts:
        assert p["key"].to_pylist() != sorted(p["key"].to_pylist()) or p.num_rows < 2  # the actors sort them
    source, scores = single_process_inputs(parts)
    groups = duplicate_groups(rows, seed=3)
    # a round-0 parent for next_round, carried by the parts as the real system would read it per part
    position = {k: i for i, k in enumerate(source.keys.tolist())}
    ok = source.ok.copy()
    duplicates = {position[k]: "duplicate-of:k000000" for k in groups["key"].to_pylist()[:30] if ok[position[k]]}
    parent = initial_round(source, 0.6, seed=5, duplicates=duplicates)
    kept, reason = parent["kept"].to_pylist(), parent["reason"].to_pylist()
    parts = [p.append_column("parent_kept", pa.array([kept[position[k]] for k in p["key"].to_pylist()], pa.bool_()))
             .append_column("parent_reason", pa.array([reason[position[k]] for k in p["key"].to_pylist()],
                                                      pa.string())) for p in parts]
    return {"parts": parts, "source": source, "scores": scores, "groups": groups, "parent": parent}


@pytest.fixture(scope="module")
def pools(ray_local, data):
    """1, 2 and 3 actors holding the parts (part i on actor i % workers), for every test of this module."""
    made = {}
    for workers in (1, 2, 3):
        made[workers] = SelectionWorkers(workers)
        made[workers].load(data["parts"])
    yield made
    for pool in made.values():
        pool.close()


CASES = {
    "random": SelectOptions(strategy="random", keep=0.6, seed=3),
    "drop-easy": SelectOptions(strategy="drop-easy", keep=0.7),
    "drop-hard": SelectOptions(strategy="drop-hard", keep=0.45),
    "stratified": SelectOptions(strategy="stratified", keep=0.8, seed=1),
    "stratified-few-bins": SelectOptions(strategy="stratified", keep=0.35, bins=3, hard_cut=0.3, seed=4),
    "stratified-unscored-in-pool": SelectOptions(strategy="stratified", keep=0.6, bins=4, hard_cut=0.0, seed=5),
    "balanced-random": SelectOptions(strategy="random", keep=0.5, class_balanced=True, seed=2),
    "balanced-drop-easy": SelectOptions(strategy="drop-easy", keep=0.55, class_balanced=True),
    "balanced-drop-hard": SelectOptions(strategy="drop-hard", keep=0.9, class_balanced=True),
    "balanced-stratified": SelectOptions(strategy="stratified", keep=0.5, class_balanced=True, bins=7, hard_cut=0.05,
                                         seed=2),
}


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_a_strategy_decides_as_one_process_does(data, pools, case, workers):
    options = CASES[case]
    expected = select(data["source"], data["scores"], options).select(COLUMNS).to_pylist()
    result = pools[workers].select(options, return_table)
    assert decided(result.written) == expected
    assert [t.num_rows for t in result.written] == [p.num_rows for p in data["parts"]]
    assert all(t["key"].to_pylist() == sorted(t["key"].to_pylist()) for t in result.written)
    kept = sum(row["kept"] for row in expected)
    assert (result.kept, result.quarantined) == (kept, int((~data["source"].ok).sum()))
    assert result.kept + result.dropped + result.quarantined == len(expected)


def test_bins_of_equal_size_take_their_shares_in_stratified_order(ray_local):
    """Four bins of 50 rows and 130 places: shares 32, 32, 33, 33, the larger to the later bins (``stratified``
    takes equal bins by number); rows given in any order, over three parts."""
    rows = pa.table({"key": [f"e{i:03d}" for i in range(200)], "label": np.zeros(200, np.int64),
                     "ok": np.ones(200, bool), "score": np.repeat([0.0, 1.0, 2.0, 3.0], 50),
                     "tiebreak": np.zeros(200)}).take(np.random.default_rng(0).permutation(200))
    parts = [rows.slice(0, 70), rows.slice(70, 60), rows.slice(130, 70)]
    options = SelectOptions(strategy="stratified", keep=0.65, bins=4, hard_cut=0.0)
    expected = select(*single_process_inputs(parts), options).select(COLUMNS).to_pylist()
    kept = [sum(r["kept"] for r in expected if r["score"] == s) for s in (0.0, 1.0, 2.0, 3.0)]
    assert kept == [32, 32, 33, 33]
    assert decided(distributed_select(parts, options, return_table, workers=3).written) == expected


DEDUP_CASES = {
    "lowest-key+drop-easy": (SelectOptions(strategy="drop-easy", keep=0.7, dedup_rule="lowest-key"), True),
    "highest-score+stratified": (SelectOptions(strategy="stratified", keep=0.75, dedup_rule="highest-score"), True),
    "typical+random": (SelectOptions(strategy="random", keep=0.6, dedup_rule="typical", seed=7), True),
    "typical-only": (SelectOptions(keep=0.6, dedup_rule="typical"), False),
    "highest-score+balanced-drop-hard": (SelectOptions(strategy="drop-hard", keep=0.8, class_balanced=True,
                                                       dedup_rule="highest-score"), True),
    "lowest-key+keep-more-than-unique": (SelectOptions(strategy="drop-easy", keep=0.99), True),
}


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("case", list(DEDUP_CASES))
def test_dedup_then_a_strategy_decides_as_one_process_does(data, pools, case, workers):
    options, then_strategy = DEDUP_CASES[case]
    expected = select(data["source"], data["scores"], options, data["groups"], then_strategy)
    expected = expected.select(COLUMNS).to_pylist()
    assert sum(row["reason"].startswith("duplicate-of:") for row in expected) > 200
    assert decided(pools[workers].select(options, return_table, data["groups"], then_strategy).written) == expected


def test_typical_without_hashes_keeps_the_lowest_key(data, pools):
    options = SelectOptions(strategy="drop-easy", keep=0.7, dedup_rule="typical")
    groups = data["groups"].drop_columns(["hash"])
    expected = select(data["source"], data["scores"], options, groups).select(COLUMNS).to_pylist()
    assert decided(pools[2].select(options, return_table, groups).written) == expected


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_the_rounds_decide_as_one_process_does(data, pools, workers):
    source, groups = data["source"], data["groups"]
    from pipeline.curation.selection import duplicate_drops

    for rule in ("lowest-key", "typical"):
        expected = initial_round(source, 0.6, seed=9, duplicates=duplicate_drops(source, groups, rule))
        got = pools[workers].initial_round(0.6, 9, return_table, groups, rule)
        assert decided(got.written) == expected.select(COLUMNS).to_pylist(), rule
    expected = initial_round(source, 0.7, seed=9)
    assert decided(pools[workers].initial_round(0.7, 9, return_table).written) == expected.select(COLUMNS).to_pylist()

    expected = next_round(source, data["parent"], "v0001", data["scores"], 150, 1, seed=4)
    got = pools[workers].next_round(150, 1, 4, "easy", return_table)
    assert decided(got.written) == expected.select(COLUMNS).to_pylist()
    assert sum(row["reason"] == "restored@r1" for row in expected.to_pylist()) == 150
    with pytest.raises(UsageError, match="remove-n"):
        pools[workers].next_round(10_000, 1, 4, "easy", return_table)
    with pytest.raises(UsageError, match="highest-score needs scores"):
        pools[workers].initial_round(0.6, 9, return_table, groups, "highest-score")


def test_the_driver_receives_no_row_sized_reply(ray_local, tmp_path):
    """Each actor's reply is bounded by the groups and the samples, not the rows: ten times the rows,
    about the same largest reply, and far below what the rows' keys alone would take."""
    def written(part_number: int, table: pa.Table) -> str:
        path = tmp_path / f"part-{part_number:05d}.parquet"
        pq.write_table(table, path)
        return str(path)

    largest = {}
    with SelectionWorkers(2) as pool:
        for n in (4_000, 40_000):
            rows = tied_rows(n, seed=n)
            parts = split(rows, seed=1)
            pool.load(parts)
            groups = duplicate_groups(rows, seed=2)
            largest[n] = 0
            for strategy in ("random", "drop-easy"):
                options = SelectOptions(strategy=strategy, keep=0.6)
                result = pool.select(options, written, groups)
                largest[n] = max(largest[n], result.largest_reply)
                expected = select(*single_process_inputs(parts), options, groups).select(COLUMNS).to_pylist()
                assert decided([pq.read_table(path) for path in result.written]) == expected
    keys = len(pickle.dumps(rows["key"].to_pylist()))
    assert largest[40_000] < 1.5 * largest[4_000], largest
    assert largest[40_000] < keys / 10, (largest, keys)


def test_two_hundred_thousand_rows_decide_as_one_process_does(ray_local):
    """Under 10 s on 2 cores, the one-process selections included."""
    rows = tied_rows(200_000, seed=11)
    parts = split(rows, seed=12)
    source, scores = single_process_inputs(parts)
    groups = duplicate_groups(rows, seed=13, members=20_000)
    with SelectionWorkers(2) as pool:
        pool.load(parts)
        for options, dedup in ((SelectOptions(strategy="drop-easy", keep=0.7), None),
                               (SelectOptions(strategy="stratified", keep=0.8, class_balanced=True, seed=3), groups)):
            started = time.perf_counter()
            expected = select(source, scores, options, dedup).select(COLUMNS).to_pylist()
            single = time.perf_counter() - started
            started = time.perf_counter()
            got = pool.select(options, return_table, dedup)
            print(f"{options.strategy}: one process {single:.1f} s, 2 actors {time.perf_counter() - started:.1f} s "
                  f"({got.calls} calls, largest reply {got.largest_reply} bytes)")
            assert decided(got.written) == expected
