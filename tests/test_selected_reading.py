"""Reading a selection through the index: only the selected examples, exactly once per epoch over
ranks and workers, from the source shards (no survivor shards), resumable mid-epoch."""
import numpy as np
import pyarrow as pa
import pytest
from torch.utils.data import DataLoader

from helpers import write_direct_dataset
from shards import DatasetError, ShardDataset, UsageError, location
from shards.reader import chunk_bounds
from shards.selections import save_selection

UNEVEN = [1, 7, 30, 2, 13]  # 53 examples in shards of very different sizes
RANKS, WORKERS = 2, 2


def keys_per_rank(url: str, selection, epoch: int, batch_size: int | None = None) -> list[list[str]]:
    """Every key each of 2 ranks (2 DataLoader workers each) yields in ``epoch``."""
    per_rank = []
    for rank in range(RANKS):
        dataset = ShardDataset(url, rank=rank, world_size=RANKS, seed=3, buffer_size=5, selection=selection,
                               batch_size=batch_size)
        dataset.set_epoch(epoch)
        items = DataLoader(dataset, batch_size=None, num_workers=WORKERS)
        keys = [key for *_, batch_keys in items for key in batch_keys] if batch_size else [k for *_, k in items]
        assert len(keys) == len(dataset), f"rank {rank} yields what __len__ promises"
        per_rank.append(keys)
    return per_rank


def assert_exactly_once(per_rank: list[list[str]], selected: set[str]) -> None:
    every = [key for keys in per_rank for key in keys]
    assert len(every) == len(set(every)), "a selected example was read twice"
    missing, extra = sorted(selected - set(every)), sorted(set(every) - selected)
    assert not missing and not extra, f"missing {missing[:3]}, extra {extra[:3]}"
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1, "ranks must stay within one example"


@pytest.mark.parametrize("share", [0.01, 0.5, 0.8, 1.0])
def test_selected_examples_read_exactly_once_over_ranks_and_workers(tmp_path, share):
    url = str(tmp_path / "ds")
    keys = sorted(write_direct_dataset(url, UNEVEN))
    selected = set(np.random.default_rng(1).permutation(keys)[:max(1, round(share * len(keys)))].tolist())
    for epoch in (0, 1):
        assert_exactly_once(keys_per_rank(url, selected, epoch), selected)


def test_a_selection_that_empties_whole_shards(tmp_path):
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, UNEVEN)
    # Only the 7-example and 2-example shards keep anything; shards 0, 2 and 4 are emptied.
    selected = {key for key in truth if 1 <= int(key[3:]) < 8 or 38 <= int(key[3:]) < 40}
    assert len(selected) == 9
    dataset = ShardDataset(url, selection=selected)
    assert sorted(dataset.shard_rows) == ["train-000001.tar", "train-000003.tar"]
    assert_exactly_once(keys_per_rank(url, selected, epoch=0), selected)


def test_images_and_labels_of_a_selection_are_the_stored_ones(tmp_path):
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, UNEVEN)
    selected = sorted(truth)[::3]
    seen = {key: (image, label) for image, label, key in ShardDataset(url, shuffle=False, selection=selected)}
    assert sorted(seen) == selected
    full = {key: image for image, _, key in ShardDataset(url, shuffle=False)}
    for key, (image, label) in seen.items():
        assert label == truth[key][0] and image.equal(full[key])


def test_resume_mid_epoch_of_a_selection_continues_at_the_same_batch(tmp_path):
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, UNEVEN)
    selected = sorted(truth)[1::2]
    dataset = ShardDataset(url, seed=4, batch_size=3, buffer_size=7, selection=selected)
    dataset.set_epoch(1)
    whole = [keys for _, _, keys in DataLoader(dataset, batch_size=None, num_workers=WORKERS)]
    assert sorted(k for keys in whole for k in keys) == selected
    for start in (1, 5, len(whole) - 1):
        dataset.set_epoch(1, start_batch=start)
        resumed = [keys for _, _, keys in DataLoader(dataset, batch_size=None, num_workers=WORKERS)]
        assert resumed == whole[start:]


def selection_table(keys: list[str], kept: set[str]) -> pa.Table:
    flags = [key in kept for key in keys]
    return pa.table({"key": keys, "kept": flags, "reason": ["kept" if f else "random" for f in flags],
                     "round": [0] * len(keys), "parent": pa.nulls(len(keys), pa.string())})


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_a_stored_version_and_a_kept_column_select_the_same_examples(tmp_path, scheme):
    url = str(tmp_path / "ds") if scheme == "file" else f"memory://onion-selected-{tmp_path.name}"
    keys = sorted(write_direct_dataset(url, UNEVEN))
    kept = set(keys[::4]) | set(keys[30:40])
    table = selection_table(keys, kept)
    version = save_selection(location(url), table, {"test": True})
    by_version = {key for *_, key in ShardDataset(url, selection=version)}
    by_table = {key for *_, key in ShardDataset(url, selection=table)}
    assert by_version == by_table == kept


def test_a_key_outside_the_split_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, UNEVEN)
    with pytest.raises(DatasetError, match="1 key\\(s\\) that are not usable examples of split 'train'.*'nope'"):
        ShardDataset(url, selection=["ex-00000", "nope"])
    with pytest.raises(UsageError, match="no selection 'v0009' \\(selections: none yet\\)"):
        ShardDataset(url, selection="v0009")


def test_neighbouring_members_are_one_read_and_far_ones_are_not():
    offsets = np.array([0, 10, 20, 1000, 1010, 5000])
    sizes = np.full(6, 5)
    assert list(chunk_bounds(offsets, sizes, 0, 6, limit=10_000, max_gap=100)) == [(0, 3), (3, 5), (5, 6)]
    assert list(chunk_bounds(offsets, sizes, 0, 6, limit=10_000)) == [(0, 6)]
    assert list(chunk_bounds(offsets, sizes, 1, 5, limit=15, max_gap=100)) == [(1, 3), (3, 5)]


def test_restricting_keeps_the_workers_and_reads_what_a_new_selection_would(tmp_path):
    """Per-epoch pruning changes the keys every epoch: ``restrict`` gives the very batches of a dataset
    made with that selection, through the same persistent workers (2 ranks x 2 workers, shards emptied
    by the restriction, back to all with None)."""
    url = str(tmp_path / "ds")
    keys = sorted(write_direct_dataset(url, UNEVEN))
    rng = np.random.default_rng(5)
    choices = [set(rng.permutation(keys)[:20].tolist()), None, set(keys[8:38:3]), {keys[0]}]
    for rank in range(RANKS):
        dataset = ShardDataset(url, rank=rank, world_size=RANKS, seed=3, buffer_size=5, batch_size=4)
        loader = DataLoader(dataset, batch_size=None, num_workers=WORKERS, persistent_workers=True)
        workers = None
        for epoch, chosen in enumerate(choices):
            dataset.restrict(chosen)
            dataset.set_epoch(epoch)
            seen = [list(batch_keys) for *_, batch_keys in loader]
            workers = workers or loader._iterator._workers
            assert loader._iterator._workers is workers, "the workers were re-created"
            fresh = ShardDataset(url, rank=rank, world_size=RANKS, seed=3, buffer_size=5, batch_size=4,
                                 selection=chosen)
            fresh.set_epoch(epoch)
            expected = [list(batch_keys) for *_, batch_keys in DataLoader(fresh, batch_size=None,
                                                                         num_workers=WORKERS)]
            assert seen == expected and sum(map(len, seen)) == len(dataset) == len(fresh)
            assert sorted(dataset.keys()) == keys, "keys() stays every candidate"
        del loader


def test_restricting_allocates_nothing_before_and_workers_never_remove_the_flags(tmp_path, monkeypatch):
    """restrict(keys)'s flags are one file, made when it is called (nothing per example before), read by
    workers that come and go (new ones each epoch without persistent_workers), replaced by the next
    restrict, and removed by restrict(None) and with the reader."""
    import gc

    import shards.restriction

    folder = tmp_path / "shm"
    folder.mkdir()
    monkeypatch.setattr(shards.restriction, "FOLDER", str(folder))
    url = str(tmp_path / "ds")
    keys = sorted(write_direct_dataset(url, UNEVEN))
    dataset = ShardDataset(url, seed=3, batch_size=4)
    assert list(folder.iterdir()) == []
    dataset.restrict(keys[:20])
    first = list(folder.iterdir())
    assert len(first) == 1 and first[0].stat().st_size == -(-len(keys) // 8)  # one bit per example
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen = [key for *_, batch in DataLoader(dataset, batch_size=None, num_workers=2) for key in batch]
        assert sorted(seen) == keys[:20] and list(folder.iterdir()) == first  # the exited workers left it
    dataset.restrict(keys[5:9])
    assert len(list(folder.iterdir())) == 1 and list(folder.iterdir()) != first
    assert sorted(key for *_, batch in dataset for key in batch) == keys[5:9]
    dataset.restrict(None)
    assert list(folder.iterdir()) == [] and len(dataset) == len(keys)
    dataset.restrict(keys[:3])
    del dataset
    gc.collect()
    assert list(folder.iterdir()) == []


def test_restricting_to_a_key_outside_the_dataset_is_named(tmp_path):
    url = str(tmp_path / "ds")
    keys = sorted(write_direct_dataset(url, UNEVEN))
    dataset = ShardDataset(url, selection=keys[:10])
    with pytest.raises(DatasetError, match=f"'{keys[20]}'"):
        dataset.restrict([keys[0], keys[20]])
