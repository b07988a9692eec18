"""``exact`` and ``phash`` duplicate groups of a dataset with a partitioned index, on Ray actors, part by part.

No process holds every key or every hash. Actor ``w`` of ``W`` owns the index parts ``w::W``:

1. it hashes the decoded pixels of its parts' usable train examples (``exact``:
   :func:`~pipeline.curation.scoring.duplicates.exact_digest`; ``phash``:
   :func:`~pipeline.curation.scoring.duplicates.perceptual_hash`) and labels each example with its group:
   ``exact``'s label is the digest itself. ``phash``'s is its connected component among the pairs within
   the radius, found in two steps (below);
2. it sums its examples up per label: how many have it, and the lowest such key with that key's index row
   (and hash). Label ``l`` belongs to bucket ``l mod W`` (a digest's leading hex digits); each bucket's
   rows go to the actor of that number (through Ray's object store: the driver holds references only);
3. as the owner of bucket ``b``, it merges what every actor sent for ``b``: each label's group size (the
   sum) and representative (the lowest key, with its row and hash), and sends each actor the answers for
   the labels it asked about;
4. it writes its parts' rows of the grouping table, each key with its label's answer (``phash``: its
   distance in bits from the representative's hash; an example in no pair is a group of one).

``phash``'s pairs, by the multi-index hashing of :func:`~pipeline.curation.scoring.duplicates.near_pairs`
spread over the actors: the driver combines the actors' bitwise OR and AND of their hashes into the bits
that vary, hence the blocks. For each pair of blocks, every actor sends each distinct hash it holds to
the owner of the bucket of those two blocks' bits; the owner checks the hashes that share them, and
returns the pairs within the radius (hashes identical within one actor are paired there). The driver
holds those pairs alone (16 bytes each: as many as there are near copies, not examples) and their
connected components, and tells each actor the components of its examples that have any.

The group id is the representative's index row (:func:`~pipeline.curation.scoring.shard_tasks.index_row_ids`),
which every actor knows without asking anyone, so the parts are the bytes
:func:`~pipeline.curation.scoring.stored.write_scores` writes for the table one process computes
(:func:`~pipeline.curation.scoring.duplicates.exact_groups`, :func:`~pipeline.curation.scoring.duplicates.
phash_groups`), for any number of actors.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.actor import ActorHandle
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.curation.scoring.by_part import commit_actors_parts, encode_parts, write_parts
from pipeline.curation.scoring.duplicates import (
    HASH_BITS,
    block_combinations,
    blocks_of,
    blocks_words,
    bucket_pairs,
    combined_key,
    exact_digest,
    grouping_columns,
    hamming,
    perceptual_hash,
    varying_bits,
)
from pipeline.curation.scoring.shard_tasks import train_shards
from pipeline.curation.scoring.stored import scorer_metadata
from pipeline.fan_out import fan_out
from pipeline.ray_runtime import default_workers, on_fresh_actors
from shards import ShardDataset
from shards.index import IndexPart, read_index_part, usable_train
from shards.urls import location

if TYPE_CHECKING:
    from pipeline.curation.scoring import ScoreContext

DIGEST_BUCKET_CHARS = 15  # hex digits of a digest that choose its bucket (60 bits: an exact int64)
HASH_BYTES = HASH_BITS // 8
CANDIDATES_PER_ROUND = 1 << 22  # (hash, block pair) rows an actor sends per round (~48 bytes each): bounds its memory
MIX = np.uint64(0x9E3779B97F4A7C15)  # a 64-bit odd constant: spreads block values over the buckets


def bucket_of(labels: pa.Array, buckets: int) -> np.ndarray:
    """Which of ``buckets`` owns each label: a digest's leading hex digits (a uniform hash already), or a
    component number, modulo."""
    if pa.types.is_integer(labels.type):
        return labels.to_numpy() % buckets
    leading = pc.utf8_slice_codeunits(labels, 0, DIGEST_BUCKET_CHARS).to_pylist()
    return np.array([int(text, 16) % buckets for text in leading], np.int64)


def lowest_per_label(table: pa.Table) -> pa.Table:
    """One row per label of ``table`` (label, key, row, size[, hash]): its lowest key with that key's row
    (and hash), and the sum of ``size`` (rows of several actors), sorted by label."""
    if not table.num_rows:
        return table
    ordered = table.sort_by([("label", "ascending"), ("key", "ascending")])
    labels = ordered["label"].combine_chunks()
    changes = pc.not_equal(labels.slice(1), labels.slice(0, len(labels) - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, changes])
    sizes = np.add.reduceat(ordered["size"].to_numpy(), starts)
    first = ordered.take(starts)
    return first.set_column(first.schema.get_field_index("size"), "size", pa.array(sizes, pa.int64()))


def block_pair_bucket(combination: int, key: np.ndarray, buckets: int) -> np.ndarray:
    """Which of ``buckets`` checks the hashes whose bits of block pair ``combination`` are ``key`` (rows)."""
    mixed = np.full(len(key), np.uint64(combination + 1)) * MIX
    for column in key.T:
        mixed = (mixed ^ column.astype(np.uint64)) * MIX
    return ((mixed >> np.uint64(33)) % np.uint64(buckets)).astype(np.int64)


class ExactGroups:
    """The ``exact`` groups of some index parts' train examples, found with the other actors' help."""

    def __init__(self, dataset: str, parts: list[tuple[int, IndexPart, int]], train_shards: set[str]) -> None:
        self.dataset, self.parts = dataset, parts  # (part number, part, its first row in the index)
        self.train_shards = train_shards
        self.keys: list[pa.Array] = []
        self.mine = pa.table({})  # key, label, row[, hash]: this actor's examples
        self.sent: list[pa.Table] = []  # per bucket, for its owner
        self.answers: list[pa.Table] = []  # per actor, as this bucket's owner
        self.written: list[tuple[int, dict, bytes]] = []

    def _examples(self) -> Iterator[tuple[str, np.ndarray, int]]:
        """Each usable train example of this actor's parts: key, HxWxC pixels, index row."""
        dataset = location(self.dataset)
        for _, part, first_row in self.parts:
            index = read_index_part(dataset, part, ["key", "split", "status"])
            row_of = dict(zip(index["key"].to_pylist(), range(first_row, first_row + index.num_rows)))
            self.keys.append(usable_train(index)["key"].combine_chunks())
            shards = [shard for shard in part.shards if shard in self.train_shards]
            for image, _, key in ShardDataset(self.dataset, "train", shuffle=False, shards=shards) if shards else ():
                yield key, image.permute(1, 2, 0).numpy(), row_of[key]

    def _hashed(self, hasher: Callable[[np.ndarray], object]) -> tuple[list[str], list, list[int]]:
        """This actor's examples' keys, hashes (by ``hasher``, of their HxWxC pixels) and index rows."""
        keys, hashes, rows = [], [], []
        for key, pixels, row in self._examples():
            keys.append(key)
            hashes.append(hasher(pixels))
            rows.append(row)
        return keys, hashes, rows

    def hash(self, buckets: int) -> int:
        """Digest this actor's examples and sum them up per bucket (see :meth:`bucket`); how many it hashed."""
        keys, digests, rows = self._hashed(exact_digest)
        self.mine = pa.table({"key": pa.array(keys, pa.string()), "label": pa.array(digests, pa.string()),
                              "row": pa.array(rows, pa.int64())})
        self._send(self.mine, buckets)
        return len(keys)

    def _send(self, labelled: pa.Table, buckets: int) -> None:
        summed = lowest_per_label(labelled.append_column("size", pa.array(np.ones(labelled.num_rows, np.int64))))
        owner = bucket_of(summed["label"].combine_chunks(), buckets)
        self.sent = [summed.filter(pa.array(owner == bucket)) for bucket in range(buckets)]

    def bucket(self, number: int) -> pa.Table:
        """This actor's labels of bucket ``number`` (label, key, row, size[, hash]), for the actor that owns it."""
        return self.sent[number]

    def merge(self, *received: pa.Table) -> None:
        """As the owner of one bucket: each label's size and representative (see :meth:`answer`)."""
        merged = lowest_per_label(pa.concat_tables(received))
        self.answers = []
        for sent in received:
            at = pc.index_in(sent["label"], value_set=merged["label"])
            answer = {"label": sent["label"], "representative": merged["key"].take(at),
                      "group": merged["row"].take(at), "group_size": merged["size"].take(at)}
            if "hash" in merged.column_names:
                answer["representative_hash"] = merged["hash"].take(at)
            self.answers.append(pa.table(answer))

    def answer(self, actor: int) -> pa.Table:
        """The answers for the labels of this bucket that ``actor`` sent."""
        return self.answers[actor]

    def encode(self, keep_empty: bool, *answers: pa.Table) -> list[tuple[int, dict]]:
        """Each example's group from the buckets' answers; this actor's parts serialised (see
        :func:`~pipeline.curation.scoring.by_part.encode_parts`); ``(part number, entry)``."""
        table = self._table(pa.concat_tables(answers), self.mine.sort_by("key"))
        self.mine = pa.table({})
        self.written = encode_parts(table, self.keys, [(number, part) for number, part, _ in self.parts],
                                    keep_empty)
        return [(number, entry) for number, entry, _ in self.written]

    def _table(self, answered: pa.Table, mine: pa.Table) -> pa.Table:
        at = pc.index_in(mine["label"], value_set=answered["label"])
        return pa.table(grouping_columns(
            mine["key"], answered["group_size"].take(at).to_numpy(), np.zeros(mine.num_rows, np.int64),
            answered["group"].take(at).to_numpy(), answered["representative"].take(at), mine["label"]),
        ).replace_schema_metadata(scorer_metadata("exact"))

    def write(self, name: str, identity: str) -> None:
        # what other actors fetched from this one (buckets, answers) goes only now that every one has
        self.sent, self.answers = [], []
        write_parts(self.dataset, name, identity, self.written)


class PhashGroups(ExactGroups):
    """The ``phash`` groups of some index parts' train examples: their pairs within the radius found with
    the other actors, their components from the driver, then the groups as ``exact``'s."""

    def hash(self, buckets: int) -> tuple[int, bytes, bytes]:
        """Hash this actor's examples; how many, and the bitwise OR and AND of their hashes."""
        keys, hashes, rows = self._hashed(perceptual_hash)
        self.mine = pa.table({"key": pa.array(keys, pa.string()), "row": pa.array(rows, pa.int64()),
                              "hash": pa.array(hashes, pa.binary(HASH_BYTES))})
        packed = np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), HASH_BYTES)
        # identical hashes are one node: the first row holding each stands for the others
        self.distinct, first, self.copy_of = np.unique(packed, axis=0, return_index=True, return_inverse=True)
        self.distinct_rows = np.asarray(rows, np.int64)[first]
        self.words: list[np.ndarray] | None = None
        either, both = np.bitwise_or.reduce(packed, axis=0), np.bitwise_and.reduce(packed, axis=0)
        return len(keys), either.tobytes(), both.tobytes()

    def distinct_count(self) -> int:
        return len(self.distinct)

    def identical_pairs(self) -> np.ndarray:
        """Pairs (row, the row that stands for its hash) of this actor's examples with identical hashes."""
        rows = self.mine["row"].to_numpy()
        stands_for = self.distinct_rows[self.copy_of.reshape(-1)]
        copies = rows != stands_for
        return np.sort(np.stack([rows[copies], stands_for[copies]], axis=1), axis=1)

    def prepare(self, blocks: list[np.ndarray], combinations: list[tuple[int, tuple[int, ...]]], buckets: int) -> None:
        """Deal this actor's distinct hashes to the buckets of each block pair of ``combinations`` (numbered)."""
        if self.words is None:
            self.words, self.widths = blocks_words(self.distinct, blocks)
        self.sent_candidates: list[list] = [[] for _ in range(buckets)]
        for number, combination in combinations:
            key = combined_key([self.words[b] for b in combination], [self.widths[b] for b in combination])
            owner = block_pair_bucket(number, key, buckets)
            for bucket in np.unique(owner).tolist():
                chosen = owner == bucket
                self.sent_candidates[bucket].append((number, key[chosen], self.distinct_rows[chosen],
                                                     self.distinct[chosen]))

    def candidates(self, bucket: int) -> list:
        """This actor's ``(block pair, its bits, rows, hashes)`` for the owner of ``bucket``."""
        return self.sent_candidates[bucket]

    def pairs(self, radius: int, *received: list) -> np.ndarray:
        """As the owner of a bucket: the pairs of rows (lower, higher) within ``radius`` among the hashes
        received that agree on a block pair."""
        by_combination: dict[int, list] = {}
        for sent in received:
            for number, key, rows, packed in sent:
                by_combination.setdefault(number, []).append((key, rows, packed))
        found = [np.zeros((0, 2), np.int64)]
        for number in sorted(by_combination):
            chunks = by_combination[number]
            key = np.concatenate([chunk[0] for chunk in chunks])
            rows = np.concatenate([chunk[1] for chunk in chunks])
            packed = np.concatenate([chunk[2] for chunk in chunks])
            codes = bucket_pairs(packed, key, radius)
            first, second = rows[codes // len(rows)], rows[codes % len(rows)]
            found.append(np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1))
        return np.unique(np.concatenate(found), axis=0)

    def label(self, rows: np.ndarray, components: np.ndarray, buckets: int) -> None:
        """Label this actor's examples in ``rows`` with their ``components`` and sum them up per bucket."""
        self.sent_candidates = []
        at = pc.index_in(self.mine["row"], value_set=pa.array(rows, pa.int64()))
        labelled = self.mine.append_column("label", pc.take(pa.array(components, pa.int64()), at))
        self._send(labelled.filter(pc.is_valid(labelled["label"])), buckets)
        self.mine = labelled

    def _table(self, answered: pa.Table, mine: pa.Table) -> pa.Table:
        at = pc.index_in(mine["label"], value_set=answered["label"])  # null: in no pair, a group of one
        grouped = pc.is_valid(at)

        def answer(column: str, own: pa.Array) -> pa.Array:
            return pc.if_else(grouped, answered[column].combine_chunks().take(at), own)

        ones = pa.array(np.ones(mine.num_rows, np.int64))
        hashes = mine["hash"].combine_chunks()
        packed = np.frombuffer(b"".join(hashes.to_pylist()), np.uint8).reshape(-1, HASH_BYTES)
        theirs = answer("representative_hash", hashes).to_pylist()
        both = np.concatenate([packed, np.frombuffer(b"".join(theirs), np.uint8).reshape(-1, HASH_BYTES)])
        everyone = np.arange(len(packed))
        keys = mine["key"].combine_chunks()
        return pa.table(grouping_columns(
            keys, answer("group_size", ones).to_numpy(), hamming(both, everyone, everyone + len(packed)),
            answer("group", mine["row"].combine_chunks()).to_numpy(), answer("representative", keys), hashes),
        ).replace_schema_metadata(scorer_metadata("phash"))


PARTS_ACTOR = {"exact": ExactGroups, "phash": PhashGroups}


def _pool(kind: str, context: ScoreContext, parts: list[IndexPart]) -> tuple[list[ActorHandle], list]:
    count = context.actors or default_workers(len(parts))
    first_rows = np.r_[0, np.cumsum([part.rows for part in parts])].tolist()
    numbered = [(number, part, first_rows[number]) for number, part in enumerate(parts)]
    train = set(train_shards(context.dataset))
    # No CPU reserved (see by_part.PartsScorer): any --actors count starts; SPREAD places them over the nodes.
    actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(PARTS_ACTOR[kind])
    return [actor.remote(context.dataset, numbered[w::count], train) for w in range(count)], numbered


def _hash(kind: str, pool: list[ActorHandle], numbered: list, context: ScoreContext) -> list:
    count = len(pool)
    return [reply for _, reply in fan_out(
        range(count), lambda w: pool[w].hash.remote(count), desc=kind, unit="part", progress=context.progress,
        weight=lambda w: len(numbered[w::count]), label=lambda w: f"index parts {w}::{count}")]


def _groups(pool: list[ActorHandle], keep_empty: bool, name: str, context: ScoreContext, kind: str) -> tuple[str, int]:
    """Steps 2 to 4 (see the module's text), once every actor has labelled its examples."""
    count = len(pool)
    # actor to actor through the object store: the driver passes references, never labels
    ray.get([pool[b].merge.remote(*[pool[w].bucket.remote(b) for w in range(count)]) for b in range(count)])
    replies = ray.get([pool[w].encode.remote(keep_empty, *[pool[b].answer.remote(w) for b in range(count)])
                       for w in range(count)])
    return commit_actors_parts(pool, replies, context.dataset, name, kind)


def group_exact_parts(name: str, context: ScoreContext, parts: list[IndexPart]) -> tuple[str, int]:
    """``exact`` groups of ``parts``' train examples, stored as ``scores/<name>``; ``(the JSON's URL, rows)``."""
    def compute() -> tuple[str, int]:
        pool, numbered = _pool("exact", context, parts)
        hashed = sum(_hash("exact", pool, numbered, context))
        return _groups(pool, not hashed, name, context, "exact")

    return on_fresh_actors("exact", compute)


def near_pairs_on_actors(pool: list[ActorHandle], either: np.ndarray, both: np.ndarray, radius: int) -> np.ndarray:
    """Every pair of rows (lower, higher) whose hashes are at most ``radius`` bits apart: identical ones
    within an actor, the others by block pair on the bucket owners (see the module's text)."""
    count = len(pool)
    blocks = blocks_of(varying_bits(either, both), radius)
    combinations = list(enumerate(block_combinations(blocks)))
    largest = max(ray.get([worker.distinct_count.remote() for worker in pool]))
    per_round = max(1, CANDIDATES_PER_ROUND // max(1, largest))
    found = ray.get([worker.identical_pairs.remote() for worker in pool])
    for start in range(0, len(combinations), per_round):
        ray.get([worker.prepare.remote(blocks, combinations[start:start + per_round], count) for worker in pool])
        found += ray.get([pool[b].pairs.remote(radius, *[pool[w].candidates.remote(b) for w in range(count)])
                          for b in range(count)])
    return np.unique(np.concatenate(found), axis=0)


def components_of(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows in ``pairs`` (sorted) and the number of the connected component each belongs to."""
    rows, ends = np.unique(pairs, return_inverse=True)
    ends = ends.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(ends)), (ends[:, 0], ends[:, 1])), shape=(len(rows), len(rows)))
    return rows, connected_components(graph, directed=False)[1].astype(np.int64)


def group_phash_parts(name: str, context: ScoreContext, parts: list[IndexPart], radius: int) -> tuple[str, int]:
    """``phash`` groups (within ``radius`` bits) of ``parts``' train examples, stored as ``scores/<name>``;
    ``(the JSON's URL, rows)``."""
    def compute() -> tuple[str, int]:
        pool, numbered = _pool("phash", context, parts)
        replies = _hash("phash", pool, numbered, context)
        either = np.bitwise_or.reduce([np.frombuffer(reply[1], np.uint8) for reply in replies], axis=0)
        both = np.bitwise_and.reduce([np.frombuffer(reply[2], np.uint8) for reply in replies], axis=0)
        rows, components = components_of(near_pairs_on_actors(pool, either, both, radius))
        # each actor is told the components of its own rows: the rows of its parts
        part_ends = np.cumsum([part.rows for part in parts])
        actor_of = np.searchsorted(part_ends, rows, side="right") % len(pool)
        ray.get([worker.label.remote(rows[actor_of == w], components[actor_of == w], len(pool))
                 for w, worker in enumerate(pool)])
        return _groups(pool, not sum(reply[0] for reply in replies), name, context, "phash")

    return on_fresh_actors("phash", compute)
