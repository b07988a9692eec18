from collections import Counter

import pytest

from shards.partition import epoch_segments, even_cuts


def covered(counts, **kw):
    seen = Counter()
    per_rank = Counter()
    world, workers = kw.pop("world_size"), kw.pop("num_workers")
    for rank in range(world):
        for worker in range(workers):
            for seg in epoch_segments(counts, rank=rank, world_size=world, worker=worker, num_workers=workers, **kw):
                for row in range(seg.start, seg.stop):
                    seen[(seg.shard, row)] += 1
                per_rank[rank] += len(seg)
    return seen, per_rank


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
@pytest.mark.parametrize("counts", [{"a": 1, "b": 7, "c": 30, "d": 2}, {"a": 5}, {"a": 2, "b": 0, "c": 1}])
def test_every_example_exactly_once_and_ranks_balanced(world_size, num_workers, counts):
    seen, per_rank = covered(counts, seed=3, epoch=1, shuffle=True, world_size=world_size, num_workers=num_workers)
    expected = {(name, row) for name, n in counts.items() for row in range(n)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}
    sizes = [per_rank[r] for r in range(world_size)]
    assert max(sizes) - min(sizes) <= 1


def test_shard_order_depends_on_epoch_and_seed():
    counts = {f"s{i}": 3 for i in range(20)}

    def order(seed, epoch):
        segments = epoch_segments(counts, seed=seed, epoch=epoch, shuffle=True, rank=0, world_size=1, worker=0,
                                  num_workers=1)
        return [s.shard for s in segments]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    unshuffled = epoch_segments(counts, seed=0, epoch=5, shuffle=False, rank=0, world_size=1, worker=0, num_workers=1)
    assert [s.shard for s in unshuffled] == sorted(counts)


def test_even_cuts():
    assert even_cuts(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert even_cuts(1, 3) == [(0, 1), (1, 1), (1, 1)]
