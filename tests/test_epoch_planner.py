"""Per-epoch pruning planned part by part over ranks: exactly the decisions ``plan_epoch`` makes in one
process, for 1, 2 and 3 ranks (each a thread running the planner, exchanging through a real barrier),
with ties, never-presented and quarantined examples, with and without a base selection."""
from __future__ import annotations

import threading
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import open_source
from shards import location, read_index
from shards.index import parquet_bytes_to_table, table_to_parquet_bytes
from shards.key_hash import smallest
from shards.selections import SourceExamples, read_selection, save_selection, selection_table
from trainer.dynamics import latest_losses
from trainer.epoch_planner import Collective, kth_smallest, loss_weights, plan_epoch_in_parts, plans_in_parts
from trainer.example_pruning import EpochPlan, exact_mean, exact_sum, plan_epoch, record_plan
from trainer.run_folder import DYNAMICS, dynamics_part

DECISIONS = ["key", "label", "kept", "score", "reason", "round", "parent", "strategy"]
EPOCH, EPOCHS, RATIO, SEED = 2, 8, 0.4, 7


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory) -> str:
    """120 digits in 3 class folders and 3 files that are not images (quarantined), in shards of 16."""
    folder = tmp_path_factory.mktemp("photos") / "digits"
    digits = load_digits()
    for i in range(120):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(folder / f"c{i % 3}" / f"img{i:03d}.png")
    for i in range(3):
        (folder / "c1" / f"broken{i}.png").write_bytes(b"not an image " + bytes([i]))
    out = tmp_path_factory.mktemp("data") / "ds"
    ingest(open_source(f"imagefolder:{folder}"), str(out), IngestOptions(shard_size=16),
           command=["test"], progress=False)
    assert plans_in_parts(location(str(out)))
    return str(out)


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory) -> str:
    """Dynamics as two ranks write them: epoch 0 presents every usable example, epoch 1 most of them,
    some twice over the run; losses rounded to a tenth (ties everywhere), a few keys never presented."""
    folder = tmp_path_factory.mktemp("run")
    keys = SourceExamples.of(location(dataset))
    usable = keys.keys[keys.ok]
    rng = np.random.default_rng(3)
    never = set(usable[:: 17].tolist())
    rows = []
    for epoch, share in ((0, 1.0), (1, 0.7)):
        for position, key in enumerate(usable.tolist()):
            if key not in never and rng.random() < share:
                rows.append((key, epoch, epoch * 1000 + position, round(float(rng.gamma(2.0, 0.5)), 1)))
    rng.shuffle(rows)
    dynamics = location(str(folder)).child(DYNAMICS)
    for rank in range(2):
        for piece, chunk in enumerate(np.array_split(np.arange(rank, len(rows), 2), 3)):
            part = [rows[i] for i in chunk]
            table = pa.table({"key": [r[0] for r in part], "epoch": pa.array([r[1] for r in part], pa.int32()),
                              "step": pa.array([r[2] for r in part], pa.int64()),
                              "loss": pa.array([r[3] for r in part], pa.float32())})
            dynamics.write_atomic(dynamics_part(rank, piece), table_to_parquet_bytes(table))
    return str(folder)


def threaded(world_size: int, work) -> list:
    """``work(collective)`` on ``world_size`` threads, one per rank; each rank's result in rank order."""
    barrier, board, results = threading.Barrier(world_size, timeout=120), {}, [None] * world_size

    def gather(rank):
        def exchange(value):
            board[rank] = value
            barrier.wait()
            gathered = [board[r] for r in range(world_size)]
            barrier.wait()  # everyone has read before anyone writes the next exchange
            return gathered
        return exchange

    def body(rank):
        results[rank] = work(Collective(rank, world_size, gather(rank)))

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(result is not None for result in results)
    return results


def one_process(dataset: str, run: str, base: str | None) -> tuple[str, EpochPlan]:
    """The plan plan_epoch makes for the same epoch and the version record_plan stores: the reference."""
    data = location(dataset)
    source = SourceExamples.of(data)
    keys = source.keys[source.ok]
    if base is not None:
        chosen = read_selection(data, base, ["key", "kept"])
        keys = np.array(sorted(chosen.filter(chosen["kept"])["key"].to_pylist()), dtype=object)
    plan = plan_epoch(keys, latest_losses(location(run), keys, EPOCH), EPOCH, EPOCHS, RATIO, 0.0, SEED)
    assert 0 < (~plan.kept).sum() < len(keys) and np.isnan(plan.scores).any()
    return record_plan(data, plan, base, {"reference": True}), plan


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("with_base", [False, True], ids=["whole-split", "on-a-base-selection"])
def test_ranks_plan_exactly_what_one_process_plans(dataset, run, world_size, with_base):
    data = location(dataset)
    base = None
    if with_base:  # a selection stored as one file, as a curation round writes it: every third example out
        source = SourceExamples.of(data)
        kept = source.ok & (np.arange(len(source.keys)) % 3 != 0)
        reasons = np.where(kept, "kept", np.where(source.ok, "test:out", "quarantined")).astype(object)
        base = save_selection(data, selection_table(source, kept, reasons, np.full(len(kept), np.nan), 0, None,
                                                    "test"), {"test": "base"})
    reference, plan = one_process(dataset, run, base)
    expected = read_selection(data, reference, DECISIONS)
    planned = threaded(world_size, lambda c: plan_epoch_in_parts(data, location(run), base, EPOCH, RATIO, SEED, c,
                                                                  {"test": True}))
    assert len({p.version for p in planned}) == 1  # every rank gets the same version
    version = planned[0].version
    assert data.exists("selections", f"{version}.json")  # stored in parts, not as one file
    got = read_selection(data, version, DECISIONS)
    assert got.equals(expected), [(a, b) for a, b in zip(got.to_pylist(), expected.to_pylist()) if a != b][:3]
    assert planned[0].left_out == pc.sum(pc.starts_with(got["reason"], "well-learned")).as_py() > 0
    # the weights the ranks train with: 1 / (1 - ratio) for the kept well-learned, as plan_epoch gives them
    shards = set(read_index(data, ["shard"])["shard"].drop_null().to_pylist())
    assert loss_weights(data, planned[0], shards, RATIO) == plan.weight_of() != {}


def test_the_stored_version_does_not_depend_on_the_number_of_ranks(dataset, run):
    data = location(dataset)
    versions = {world: threaded(world, lambda c: plan_epoch_in_parts(data, location(run), None, EPOCH + 1, RATIO,
                                                                      SEED, c, {"test": True}))[0].version
                for world in (1, 3)}
    assert versions[1] == versions[3]  # the same parts, so the same fingerprint: found, not written again


def test_runs_that_decide_alike_from_other_losses_each_get_their_own_version(dataset, run, tmp_path):
    """Two arms of one seed whose first epoch is the same model make the same decisions from losses that
    differ in their last bits. Each planned epoch must store, and weigh by, its own run's scores: the
    second must not rewrite the first's committed parts (whose sha256 would then no longer match)."""
    data, doubled = location(dataset), location(str(tmp_path / "doubled"))
    for name in location(run).child(DYNAMICS).list_names():  # the same dynamics, every loss doubled (exactly)
        table = parquet_bytes_to_table(location(run).child(DYNAMICS).read_bytes(name))
        table = table.set_column(table.column_names.index("loss"), "loss", pc.multiply(table["loss"], 2))
        doubled.child(DYNAMICS).write_atomic(name, table_to_parquet_bytes(table))
    first, second = (plan_epoch_in_parts(data, folder, None, EPOCH + 2, RATIO, SEED, Collective(), {"test": True})
                     for folder in (location(run), doubled))
    assert first.version != second.version
    decisions = [read_selection(data, p.version, ["key", "kept", "reason"]) for p in (first, second)]
    assert decisions[0].equals(decisions[1])  # the same decisions (the same examples below a doubled mean) ...
    scores = [read_selection(data, p.version, ["score"])["score"] for p in (first, second)]
    assert scores[1].equals(pc.multiply(scores[0], 2))  # ... each version with its own run's scores
    assert second.threshold == 2 * first.threshold
    shards = set(read_index(data, ["shard"])["shard"].drop_null().to_pylist())
    assert loss_weights(data, first, shards, RATIO) == loss_weights(data, second, shards, RATIO) != {}


def test_kth_smallest_matches_the_key_hash_rule_with_collisions():
    rng = np.random.default_rng(1)
    draws = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    draws[10:20] = draws[5]  # 64-bit collisions, broken by key
    draws[30] = draws[40] = np.uint64(2**64 - 1)
    keys = np.array([f"k{i:04d}" for i in rng.permutation(300)], dtype=object)
    for k in (1, 7, 15, 150, 300):
        chosen = set(keys[smallest(keys, draws, k)].tolist())
        for world_size in (1, 2, 4):
            pieces = [np.arange(rank, 300, world_size) for rank in range(world_size)]
            bounds = threaded(world_size, lambda c, pieces=pieces, k=k: kth_smallest(
                draws[pieces[c.rank]], pa.array(keys[pieces[c.rank]].tolist()), k, c))
            draw, key = bounds[0]
            assert set(keys[(draws < draw) | ((draws == draw) & (keys <= key))].tolist()) == chosen
    assert kth_smallest(draws, pa.array(keys.tolist()), 0, Collective()) is None


def test_the_exact_mean_does_not_depend_on_how_the_values_are_split():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.gamma(2.0, 0.5, 1000), [1e-30, 1e30, 0.0, 5e-324]])
    whole = exact_mean([(exact_sum(values), len(values))])
    assert Fraction(whole) == Fraction(float(sum(Fraction(v) for v in values.tolist()) / len(values)))
    for pieces in (2, 3, 7):
        split = np.array_split(rng.permutation(values), pieces)
        assert exact_mean([(exact_sum(p), len(p)) for p in split]) == whole
    assert exact_mean([(exact_sum(np.array([1.0, np.inf])), 2), (exact_sum(values), len(values))]) == np.inf
    assert np.isnan(exact_mean([(exact_sum(np.array([])), 0)]))
    with pytest.raises(ValueError, match="NaN"):
        exact_sum(np.array([1.0, np.nan]))
