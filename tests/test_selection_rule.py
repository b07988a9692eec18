"""The key-hash rule: random choices depend on the keys, the seed and the purpose alone, never on the
order of the rows or on how they are split across workers; selections chosen by the earlier rule
still read, and say so."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from helpers import write_direct_dataset
from pipeline.curation.selection import (
    Candidates,
    SelectOptions,
    SourceExamples,
    choose,
    initial_round,
    next_round,
    select,
)
from pipeline.inspection.selections import EARLIER_RULE, selection_summary
from shards import location
from shards.index import table_to_parquet_bytes
from shards.key_hash import RULE, key_draws, smallest
from shards.selections import fingerprint, read_selection, save_selection, selection_rule

N = 300
KEYS = np.array([f"k{i:04d}" for i in range(N)], dtype=object)
ORDERS = [np.arange(N), np.arange(N)[::-1].copy(), *(np.random.default_rng(s).permutation(N) for s in (1, 2))]


def tied_candidates(order: np.ndarray) -> Candidates:
    """Scores on a coarse grid (many ties, a few unscored), in the row order ``order``."""
    rng = np.random.default_rng(0)
    score = np.round(rng.random(N), 1)
    score[rng.choice(N, 10, replace=False)] = np.nan
    return Candidates(KEYS[order], (np.arange(N) % 3)[order], score[order], np.zeros(N))


def decisions_of(c: Candidates, kept: np.ndarray, reasons: dict[int, str]) -> dict[str, str]:
    """Key -> ``kept`` or the drop reason: what a choice decided, whatever the row order."""
    return {**{c.keys[p]: r for p, r in reasons.items()}, **{c.keys[p]: "kept" for p in kept}}


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("strategy", ["random", "stratified", "drop-easy"])
def test_a_choice_does_not_depend_on_the_order_of_the_rows(strategy, balanced):
    options = SelectOptions(strategy=strategy, class_balanced=balanced, bins=5, hard_cut=0.1, seed=4)
    seen = []
    for order in ORDERS:
        c = tied_candidates(order)
        kept, reasons = choose(c, 200, options)
        assert len(kept) == 200 and len(reasons) == N - 200
        seen.append(decisions_of(c, kept, reasons))
    assert all(decisions == seen[0] for decisions in seen[1:])


def shuffled_source(order: np.ndarray) -> SourceExamples:
    ok = np.ones(N, dtype=bool)
    ok[[5, 77, 150]] = False
    return SourceExamples(KEYS[order], (np.arange(N) % 3)[order], ok[order])


def by_key(table: pa.Table) -> dict[str, tuple[bool, str]]:
    return {row["key"]: (row["kept"], row["reason"]) for row in table.select(["key", "kept", "reason"]).to_pylist()}


def test_round_zero_and_a_restore_round_do_not_depend_on_the_order_of_the_rows():
    rng = np.random.default_rng(3)
    scores = pa.table({"key": KEYS.tolist(), "score": np.round(rng.random(N), 1), "tiebreak": np.zeros(N)})
    scores = scores.replace_schema_metadata({b"onion": json.dumps({"scorer": "forgetting"}).encode()})
    zeros, restores = [], []
    for number, order in enumerate(ORDERS):
        src = shuffled_source(order)
        position = {key: p for p, key in enumerate(src.keys.tolist())}
        duplicates = {position[f"k{i:04d}"]: "duplicate-of:k0000" for i in (10, 20, 30)}
        first = initial_round(src, 0.6, seed=9, duplicates=duplicates)
        zeros.append(by_key(first))
        shuffled_scores = scores.take(np.random.default_rng(number).permutation(N))  # score rows in any order
        restores.append(by_key(next_round(src, first, "v0001", shuffled_scores, 25, 1, seed=9)))
    assert all(z == zeros[0] for z in zeros[1:]) and all(r == restores[0] for r in restores[1:])
    assert sum(r == "restored@r1" for _, r in restores[0].values()) == 25


def test_the_k_smallest_of_each_parts_k_smallest_are_the_wholes():
    """What the distributed step relies on: choose per part, merge, choose again = choose over the whole."""
    draws = key_draws(KEYS, 0, "random")
    coarse = draws >> np.uint64(60)  # 16 values only: ties everywhere, decided by key
    for values in (draws, coarse):
        for k in (0, 1, 37, 150, N):
            whole = KEYS[smallest(KEYS, values, k)]
            for parts in (1, 2, 3):
                part_of = np.random.default_rng(parts).integers(parts, size=N)
                finalists = np.concatenate([np.flatnonzero(part_of == p)[smallest(KEYS[part_of == p],
                                                                                   values[part_of == p], k)]
                                            for p in range(parts)])
                merged = KEYS[finalists[smallest(KEYS[finalists], values[finalists], k)]]
                assert merged.tolist() == whole.tolist()  # same keys, in the same (draw, key) order
    # and the random strategy keeps exactly the whole's k smallest draws
    kept, _ = choose(tied_candidates(np.arange(N)), 150, SelectOptions(strategy="random", seed=0))
    assert set(KEYS[kept]) == set(KEYS[smallest(KEYS, draws, 150)])


def test_draws_are_a_function_of_seed_purpose_and_key():
    draws = key_draws(KEYS, 7, "random")
    assert draws.dtype == np.uint64
    expected = int.from_bytes(hashlib.blake2b(f"7|random|{KEYS[42]}".encode(), digest_size=8).digest(), "big")
    assert int(draws[42]) == expected  # the documented hash, reproducible by any engine
    assert (key_draws(pa.array(KEYS.tolist()), 7, "random") == draws).all()
    assert (key_draws(KEYS[100:50:-1], 7, "random") == draws[100:50:-1]).all()  # a subset draws the same


def test_different_seeds_give_different_choices():
    c = tied_candidates(np.arange(N))
    for strategy in ("random", "stratified"):
        chosen = [set(choose(c, 150, SelectOptions(strategy=strategy, seed=s))[0]) for s in (0, 1)]
        assert chosen[0] != chosen[1], strategy
    src = shuffled_source(np.arange(N))
    assert not initial_round(src, 0.6, seed=0).equals(initial_round(src, 0.6, seed=1))


def test_different_purposes_draw_independently():
    keys = np.array([f"x{i:05d}" for i in range(10_000)], dtype=object)
    a, b = key_draws(keys, 0, "random"), key_draws(keys, 0, "random-initial")
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    assert abs(np.corrcoef(ranks_a, ranks_b)[0, 1]) < 0.05  # sd of the correlation of independent ranks: 0.01
    overlap = len(set(smallest(keys, a, 1000)) & set(smallest(keys, b, 1000)))
    assert 60 < overlap < 140  # 1000 * 1000 / 10000 = 100 expected by chance


def test_an_earlier_rule_selection_still_reads_and_says_so(tmp_path, capsys):
    from pipeline.cli import main

    url = str(tmp_path / "data")
    write_direct_dataset(url, [12, 12])
    dataset = location(url)
    new = initial_round(SourceExamples.of(dataset), 0.5, seed=1)
    assert selection_rule(new) == RULE
    old = new.replace_schema_metadata(None)  # the same rows, as the earlier code stored them: no rule
    metadata = {b"fingerprint": fingerprint(old).encode(), b"parameters": json.dumps({"round": 0}).encode()}
    (tmp_path / "data" / "selections").mkdir()
    (tmp_path / "data" / "selections" / "v0001.parquet").write_bytes(
        table_to_parquet_bytes(old.replace_schema_metadata(metadata)))

    stored = read_selection(dataset, "v0001")
    assert stored.num_rows == 24 and stored["kept"].to_pylist() == new["kept"].to_pylist()
    assert selection_rule(stored) is None
    assert selection_summary(url, "v0001")["rule"] == EARLIER_RULE
    assert main(["inspect", url, "--selection", "v0001", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == EARLIER_RULE
    assert main(["inspect", url, "--selection", "v0001"]) == 0
    assert "earlier" in capsys.readouterr().out  # one short word: a narrow table may wrap the sentence

    # equal rows chosen by the new rule are not the old version: that one says it used the earlier rule
    assert save_selection(dataset, new, {"round": 0}) == "v0002"
    assert save_selection(dataset, new, {"round": 0}) == "v0002"
    assert selection_rule(read_selection(dataset, "v0002")) == RULE
    assert selection_summary(url, "v0002")["rule"] == RULE
    assert save_selection(dataset, old, {"round": 0}) == "v0001"  # rule-less rows still find their version


def test_one_shot_selections_record_the_rule(tmp_path):
    src = shuffled_source(np.arange(N))
    table = select(src, None, SelectOptions(strategy="random", keep=0.5))
    dataset = location(str(tmp_path))
    assert selection_rule(read_selection(dataset, save_selection(dataset, table, {}))) == RULE
