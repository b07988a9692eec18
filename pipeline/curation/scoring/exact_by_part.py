"""``exact`` duplicate groups of a dataset with a partitioned index, on Ray actors, part by part.

No process holds every key or every digest. Actor ``w`` of ``W`` owns the index parts ``w::W``:

1. it hashes the decoded pixels of its parts' usable train examples (:func:`~pipeline.curation.scoring.
   duplicates.exact_digest`), and sums them up per digest: how many of its examples have it, and the
   lowest such key with that key's index row. Digest ``d`` belongs to bucket ``d mod W``; each bucket's
   rows go to the actor of that number (through Ray's object store: the driver holds references only);
2. as the owner of bucket ``b``, it merges what every actor sent for ``b``: each digest's group size
   (the sum) and representative (the lowest key, with its row), and sends each actor the answers for
   the digests it asked about;
3. it writes its parts' rows of the grouping table, each key with its digest's answer.

The group id is the representative's index row (:func:`~pipeline.curation.scoring.shard_tasks.index_row_ids`),
which every actor knows without asking anyone, so the parts are the bytes
:func:`~pipeline.curation.scoring.stored.write_scores` writes for the table one process computes
(:func:`~pipeline.curation.scoring.duplicates.exact_groups`), for any number of actors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.curation.scoring.by_part import commit_actors_parts, encode_parts, write_parts
from pipeline.curation.scoring.duplicates import exact_digest, grouping_columns
from pipeline.curation.scoring.shard_tasks import train_shards
from pipeline.curation.scoring.stored import scorer_metadata
from pipeline.fan_out import fan_out
from pipeline.ray_runtime import default_workers
from shards import ShardDataset
from shards.index import IndexPart, read_index_part, usable_train
from shards.urls import location

if TYPE_CHECKING:
    from pipeline.curation.scoring import ScoreContext

DIGEST_BUCKET_CHARS = 15  # hex digits of a digest that choose its bucket (60 bits: an exact int64)


def bucket_of(digests: pa.Array, buckets: int) -> np.ndarray:
    """Which of ``buckets`` owns each digest (a uniform hash already: its leading hex digits, modulo)."""
    leading = pc.utf8_slice_codeunits(digests, 0, DIGEST_BUCKET_CHARS).to_pylist()
    return np.array([int(text, 16) % buckets for text in leading], np.int64)


def lowest_per_digest(table: pa.Table) -> pa.Table:
    """One row per digest of ``table`` (digest, key, row, size): its lowest key with that key's row, and
    the sum of ``size`` (rows of several actors), sorted by digest."""
    if not table.num_rows:
        return table
    ordered = table.sort_by([("digest", "ascending"), ("key", "ascending")])
    digests = ordered["digest"].combine_chunks()
    changes = pc.not_equal(digests.slice(1), digests.slice(0, len(digests) - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, changes])
    sizes = np.add.reduceat(ordered["size"].to_numpy(), starts)
    first = ordered.take(starts)
    return first.set_column(first.schema.get_field_index("size"), "size", pa.array(sizes, pa.int64()))


# No CPU reserved (see by_part.PartsScorer): any --actors count starts; SPREAD places them over the nodes.
@ray.remote(num_cpus=0, scheduling_strategy="SPREAD")
class PartsGrouper:
    """The ``exact`` groups of some index parts' train examples, found with the other actors' help."""

    def __init__(self, dataset: str, parts: list[tuple[int, IndexPart, int]], train_shards: set[str]) -> None:
        self.dataset, self.parts = dataset, parts  # (part number, part, its first row in the index)
        self.train_shards = train_shards
        self.keys: list[pa.Array] = []
        self.mine = pa.table({})  # key, digest, row: this actor's examples
        self.sent: list[pa.Table] = []  # per bucket, for its owner
        self.answers: list[pa.Table] = []  # per actor, as this bucket's owner
        self.written: list[tuple[int, dict, bytes]] = []

    def hash(self, buckets: int) -> int:
        """Digest this actor's examples and sum them up per bucket (see :meth:`bucket`); how many it hashed."""
        dataset, keys, digests, rows = location(self.dataset), [], [], []
        for _, part, first_row in self.parts:
            index = read_index_part(dataset, part, ["key", "split", "status"])
            row_of = dict(zip(index["key"].to_pylist(), range(first_row, first_row + index.num_rows)))
            self.keys.append(usable_train(index)["key"].combine_chunks())
            shards = [shard for shard in part.shards if shard in self.train_shards]
            examples = ShardDataset(self.dataset, "train", shuffle=False, shards=shards) if shards else ()
            for image, _, key in examples:
                keys.append(key)
                digests.append(exact_digest(image.permute(1, 2, 0).numpy()))
                rows.append(row_of[key])
        self.mine = pa.table({"key": pa.array(keys, pa.string()), "digest": pa.array(digests, pa.string()),
                              "row": pa.array(rows, pa.int64())})
        summed = lowest_per_digest(self.mine.append_column("size", pa.array(np.ones(len(keys), np.int64))))
        owner = bucket_of(summed["digest"], buckets)
        self.sent = [summed.filter(pa.array(owner == bucket)) for bucket in range(buckets)]
        return len(keys)

    def bucket(self, number: int) -> pa.Table:
        """This actor's digests of bucket ``number`` (digest, key, row, size), for the actor that owns it."""
        return self.sent[number]

    def merge(self, *received: pa.Table) -> None:
        """As the owner of one bucket: each digest's size and representative (see :meth:`answer`)."""
        merged = lowest_per_digest(pa.concat_tables(received))
        self.answers = []
        for sent in received:
            at = pc.index_in(sent["digest"], value_set=merged["digest"])
            self.answers.append(pa.table({"digest": sent["digest"], "representative": merged["key"].take(at),
                                          "group": merged["row"].take(at), "group_size": merged["size"].take(at)}))

    def answer(self, actor: int) -> pa.Table:
        """The answers for the digests of this bucket that ``actor`` sent."""
        return self.answers[actor]

    def encode(self, keep_empty: bool, *answers: pa.Table) -> list[tuple[int, dict]]:
        """Each example's group from the buckets' answers; this actor's parts serialised (see
        :func:`~pipeline.curation.scoring.by_part.encode_parts`); ``(part number, entry)``."""
        answered = pa.concat_tables(answers)
        mine = self.mine.sort_by("key")
        at = pc.index_in(mine["digest"], value_set=answered["digest"])
        table = pa.table(grouping_columns(
            mine["key"], answered["group_size"].take(at).to_numpy(), np.zeros(mine.num_rows, np.int64),
            answered["group"].take(at).to_numpy(), answered["representative"].take(at), mine["digest"]))
        table = table.replace_schema_metadata(scorer_metadata("exact"))
        self.mine = pa.table({})
        self.written = encode_parts(table, self.keys, [(number, part) for number, part, _ in self.parts],
                                    keep_empty)
        return [(number, entry) for number, entry, _ in self.written]

    def write(self, name: str, identity: str) -> None:
        # what other actors fetched from this one (buckets, answers) goes only now that every one has
        self.sent, self.answers = [], []
        write_parts(self.dataset, name, identity, self.written)


def group_exact_parts(name: str, context: ScoreContext, parts: list[IndexPart]) -> tuple[str, int]:
    """``exact`` groups of ``parts``' train examples, stored as ``scores/<name>``; ``(the JSON's URL, rows)``."""
    dataset = context.dataset
    count = context.actors or default_workers(len(parts))
    first_rows = np.r_[0, np.cumsum([part.rows for part in parts])].tolist()
    numbered = [(number, part, first_rows[number]) for number, part in enumerate(parts)]
    train = set(train_shards(dataset))
    pool = [PartsGrouper.remote(dataset, numbered[w::count], train) for w in range(count)]
    hashed = sum(examples for _, examples in fan_out(
        range(count), lambda w: pool[w].hash.remote(count), desc="exact", unit="part", progress=context.progress,
        weight=lambda w: len(numbered[w::count]), label=lambda w: f"index parts {w}::{count}"))
    # actor to actor through the object store: the driver passes references, never digests
    ray.get([pool[b].merge.remote(*[pool[w].bucket.remote(b) for w in range(count)]) for b in range(count)])
    replies = ray.get([pool[w].encode.remote(not hashed, *[pool[b].answer.remote(w) for b in range(count)])
                       for w in range(count)])
    return commit_actors_parts(pool, replies, dataset, name, "exact")
