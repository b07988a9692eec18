"""Scorers that group copies: ``exact`` (identical decoded pixels) and ``phash`` (perceptual hash
within a Hamming radius).

Hashes are computed by Ray tasks, one per train shard, reading the shard through the index (a
re-encoded file with the same pixels hashes the same: ``exact`` hashes the decoded array;
``phash`` first undoes any shift of the image, so a moved copy hashes like its original). The
driver groups the hashes: ``exact`` by equality; ``phash`` by multi-index hashing, so no pair of
examples is compared unless it can be within the radius: the bits are cut into ``radius + 2``
blocks, and two hashes at most ``radius`` bits apart agree exactly on at least two blocks
(pigeonhole), so only examples sharing the values of two blocks are candidates, and each candidate
pair is then checked (:func:`near_pairs`). Groups are the connected components of the
within-radius pairs.

The table (``scores/<name>.parquet``) has, per train example: ``group`` (an id, singletons
included), ``group_size``, ``representative`` (the group's lowest key), ``distance`` (bits from
the representative's hash; 0 for exact copies), ``hash``, and the registry's ``score`` (the group
size: how many examples share this content) and ``tiebreak`` (the distance).
"""
from __future__ import annotations

import hashlib
import itertools
import sys
from collections import Counter

import imagehash
import numpy as np
import pyarrow as pa
import ray
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from pipeline.curation.scoring.shard_tasks import index_row_ids, shard_index_rows, train_shards
from pipeline.fan_out import fan_out
from pipeline.ray_runtime import cluster_cpus, current_node, describe_nodes, ensure_ray
from shards import ShardDataset, UsageError

HASH_SIDE = 16  # pHash of 16x16 DCT coefficients: 256 bits (64 bits cannot tell small, similar images apart)
HASH_BITS = HASH_SIDE * HASH_SIDE
PHASH_RADIUS = 16  # bits; measured (docs/benchmarks.md): copies re-encoded, resized or re-lit stay within it
BYTE_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
WEAK_HARMONIC = 0.05  # below this share of a typical Fourier component, a shift is not estimated
AGREE = 2  # multi-index hashing: candidates agree exactly on this many blocks (see near_pairs)
BLOCK_SEED = 5  # the fixed shuffle of bit positions into blocks


def exact_digest(pixels: np.ndarray) -> str:
    """Identity of decoded pixels (shape and values), whatever the file encoding."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def grey(pixels: np.ndarray) -> np.ndarray:
    """An HxWxC uint8 image as HxW float64 brightness (the mean of its channels)."""
    return pixels.astype(np.float64).mean(axis=-1)


def canonical_translation(image: np.ndarray) -> np.ndarray:
    """``image`` moved (circularly, by a fraction of a pixel where needed) so that its lowest
    horizontal and vertical Fourier components have phase zero.

    A copy shifted by (dy, dx) has those phases turned by 2 pi dy / H and 2 pi dx / W (the Fourier
    shift theorem), so both land on the same canonical image: a shift is undone before hashing.
    Exact for circular shifts; for a shift that moves content off the border (padding), nearly, as
    long as little content leaves the picture. A DCT hash alone is not shift-invariant: measured on
    32x32 images, a 2-pixel shift moved pHash by 110 of 256 bits, as far as unrelated images.
    """
    centred = image - image.mean()
    spectrum = np.fft.fft2(centred)
    height, width = centred.shape
    typical = np.sqrt((np.abs(spectrum) ** 2).sum() / max(1, spectrum.size - 1))  # rms of a component
    vertical, horizontal = spectrum[1 % height, 0], spectrum[0, 1 % width]
    # A component far weaker than typical (content that repeats, e.g. top = bottom) has a phase that
    # noise decides: a re-encoded copy would move elsewhere. Such an axis is left as it is (measured:
    # 0 of 2,000 MNIST digits and 1 in 1,000 noisy synthetic 16x16 images fall below 0.05).
    dy = np.angle(vertical) * height / (2 * np.pi) if abs(vertical) >= WEAK_HARMONIC * typical else 0.0
    dx = np.angle(horizontal) * width / (2 * np.pi) if abs(horizontal) >= WEAK_HARMONIC * typical else 0.0
    ramp = np.exp(-2j * np.pi * (np.fft.fftfreq(height)[:, None] * dy + np.fft.fftfreq(width)[None, :] * dx))
    return np.fft.ifft2(spectrum * ramp).real + image.mean()


def perceptual_hash(pixels: np.ndarray) -> bytes:
    """256-bit DCT perceptual hash (imagehash's pHash, hash_size 16) of an HxWxC uint8 image, taken
    after its shift is undone (:func:`canonical_translation`)."""
    canonical = canonical_translation(grey(pixels))
    low, high = canonical.min(), canonical.max()
    scaled = np.clip((canonical - low) * (255.0 / max(high - low, 1e-9)), 0, 255).astype(np.uint8)
    return np.packbits(imagehash.phash(Image.fromarray(scaled), hash_size=HASH_SIDE).hash.flatten()).tobytes()


@ray.remote(num_cpus=1, max_retries=2)
def hash_shard(dataset_url: str, shard: str, rows: pa.Table | None, kind: str) -> tuple[list[str], list, str]:
    keys, hashes = [], []
    hasher = exact_digest if kind == "exact" else perceptual_hash
    for image, _, key in ShardDataset(dataset_url, "train", shuffle=False, shards=[shard], index=rows):
        keys.append(key)
        hashes.append(hasher(image.permute(1, 2, 0).numpy()))
    return keys, hashes, current_node()


def hash_train_split(dataset_url: str, kind: str, progress: bool = True) -> tuple[np.ndarray, list]:
    """Every usable train example's key and hash, one Ray task per train shard."""
    shards = train_shards(dataset_url)
    ensure_ray()
    rows = shard_index_rows(dataset_url, shards)
    keys: list[str] = []
    hashes: list = []
    nodes: Counter = Counter()
    for _, (shard_keys, shard_hashes, node) in fan_out(
            shards, lambda shard: hash_shard.remote(dataset_url, shard, rows[shard], kind), desc=kind,
            progress=progress):
        keys.extend(shard_keys)
        hashes.extend(shard_hashes)
        nodes[node] += 1
    if progress:
        tqdm.write(f"{kind}: {len(shards)} shards hashed on {describe_nodes(nodes)}", file=sys.stderr)
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    return np.array(keys, dtype=object)[order], [hashes[i] for i in order]


def hamming(packed: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Bits that differ between rows ``first`` and ``second`` of packed hashes (n x bytes)."""
    return BYTE_POPCOUNT[packed[first] ^ packed[second]].sum(axis=1, dtype=np.int64)


def bit_blocks(packed: np.ndarray, radius: int) -> list[np.ndarray]:
    """The bit positions that vary among the hashes, cut into ``radius + AGREE`` blocks.

    A bit no hash changes never counts in a distance, so it is left out. The rest are dealt to the
    blocks in a fixed shuffled order: neighbouring DCT coefficients are correlated, and blocks of
    neighbours make a few huge buckets (measured on 950k hashes: 800M candidate pairs with 17
    contiguous blocks, 405M shuffled, 2.3M with two blocks agreeing, below)."""
    return blocks_of(varying_bits(np.bitwise_or.reduce(packed, axis=0), np.bitwise_and.reduce(packed, axis=0)),
                     radius)


def varying_bits(either: np.ndarray, both: np.ndarray) -> np.ndarray:
    """The bit positions that differ among some hashes, from their bitwise OR and AND (packed bytes)."""
    return np.flatnonzero(np.unpackbits(either ^ both))


def blocks_of(varying: np.ndarray, radius: int) -> list[np.ndarray]:
    """The bit positions ``varying`` dealt to ``radius + AGREE`` blocks in a fixed shuffled order (see
    :func:`bit_blocks`); with fewer varying bits than ``radius``, every pair is within it, and as many
    blocks as varying bits are enough."""
    radius = min(radius, len(varying))
    columns = varying[np.random.default_rng(BLOCK_SEED).permutation(len(varying))]
    count = radius + AGREE
    return [np.sort(columns[block::count]) for block in range(count)]


def block_words(packed: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The bits ``columns`` of every packed hash as integers, 62 bits per column of the result."""
    words = []
    for lo in range(0, max(1, len(columns)), 62):
        word = np.zeros(len(packed), dtype=np.int64)
        for column in columns[lo:lo + 62].tolist():
            word = (word << 1) | ((packed[:, column >> 3] >> (7 - (column & 7))) & 1)
        words.append(word)
    return np.stack(words, axis=1)


def bucket_pairs(packed: np.ndarray, key: np.ndarray, radius: int, chunk: int = 1 << 18) -> np.ndarray:
    """Row pairs (i < j, as ``i * n + j``) with equal ``key`` rows and at most ``radius`` bits apart.
    Rows sharing a key are compared in steps of ``d`` (each row with the row ``d`` places later in
    its bucket), so the work is the number of candidate pairs, with no Python loop over buckets."""
    count = len(packed)
    order = np.lexsort(key.T[::-1])
    ordered = key[order]
    starts = np.flatnonzero(np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)])
    sizes = np.diff(np.r_[starts, count])
    bucket_size = np.repeat(sizes, sizes)
    rank = np.arange(count) - np.repeat(starts, sizes)
    active = np.flatnonzero(bucket_size > 1)
    found = []
    step = 1
    while len(active):
        active = active[rank[active] + step < bucket_size[active]]
        for lo in range(0, len(active), chunk):  # bounded memory: candidate pairs checked in chunks
            rows = active[lo:lo + chunk]
            a, b = order[rows], order[rows + step]
            close = hamming(packed, a, b) <= radius
            low, high = np.minimum(a[close], b[close]), np.maximum(a[close], b[close])
            found.append(low.astype(np.int64) * count + high)
        step += 1
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def blocks_words(packed: np.ndarray, blocks: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Each block's bits of every packed hash (:func:`block_words`), and each block's width in bits."""
    return [block_words(packed, columns) for columns in blocks], [max(1, len(columns)) for columns in blocks]


def block_combinations(blocks: list[np.ndarray]) -> list[tuple[int, ...]]:
    """The sets of ``AGREE`` blocks on which candidate pairs agree (see :func:`near_pairs`)."""
    return list(itertools.combinations(range(len(blocks)), AGREE))


def combined_key(words: list[np.ndarray], widths: list[int]) -> np.ndarray:
    """One key per row from blocks' words: a single integer when the bits fit in 62, else the words side by side."""
    if sum(widths) <= 62:
        key = np.zeros(len(words[0]), dtype=np.int64)
        for word, width in zip(words, widths):
            key = (key << width) | word[:, 0]
        return key[:, None]
    return np.hstack(words)


def agreeing_pairs(packed: np.ndarray, words: list[np.ndarray], widths: list[int],
                   combinations: list[tuple[int, ...]], radius: int) -> np.ndarray:
    """Pairs within ``radius`` among the rows that agree exactly on every block of one of ``combinations``
    (``words[b]``: block ``b``'s bits of every row, ``widths[b]`` of them)."""
    parts = [bucket_pairs(packed, combined_key([words[b] for b in combo], [widths[b] for b in combo]), radius)
             for combo in combinations]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


@ray.remote(num_cpus=1, max_retries=2)
def agreeing_pairs_task(packed: np.ndarray, words: list[np.ndarray], widths: list[int],
                        combinations: list[tuple[int, ...]], radius: int) -> np.ndarray:
    return agreeing_pairs(packed, words, widths, combinations, radius)


def near_pairs(packed: np.ndarray, radius: int, parallel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (i < j) of distinct hashes at most ``radius`` bits apart, by multi-index hashing.

    The varying bits are cut into ``radius + AGREE`` blocks; two hashes at most ``radius`` bits
    apart differ in at most ``radius`` blocks, so they agree exactly on ``AGREE`` blocks or more
    (pigeonhole). Only rows sharing the values of some ``AGREE`` blocks are compared: keys of about
    2 x 254 / (radius + 2) bits make small buckets where single blocks (radius + 1 of them) made
    huge ones. With ``parallel`` the block combinations are split over Ray tasks (the hashes go to
    the object store once)."""
    blocks = bit_blocks(packed, radius)
    words, widths = blocks_words(packed, blocks)
    combinations = block_combinations(blocks)
    if parallel:
        shared_packed, shared_words = ray.put(packed), ray.put(words)
        tasks = max(1, min(len(combinations), 4 * cluster_cpus()))
        parts = ray.get([agreeing_pairs_task.remote(shared_packed, shared_words, widths, combinations[i::tasks], radius)
                         for i in range(tasks)])
    else:
        parts = [agreeing_pairs(packed, words, widths, combinations, radius)]
    codes = np.unique(np.concatenate(parts))
    return codes // len(packed), codes % len(packed)


def grouping_columns(keys: pa.Array, sizes: np.ndarray, distances: np.ndarray, group: np.ndarray,
                     representatives: pa.Array, hash_column: pa.Array | None = None) -> dict:
    """A grouping table's columns, in their stored order and types, for keys (sorted) and their groups'
    sizes, ids and representatives. ``distances`` keeps its type: bits (integers) for hashes, 1 - cosine
    for embeddings."""
    columns = {
        "key": keys, "score": sizes.astype(np.float64), "tiebreak": distances.astype(np.float64),
        "group": group.astype(np.int64), "group_size": sizes.astype(np.int64), "representative": representatives,
        "distance": distances,
    }
    return columns if hash_column is None else {**columns, "hash": hash_column}


def grouping_table(keys: np.ndarray, labels_of_groups: np.ndarray, distances: np.ndarray,
                   hash_column: pa.Array | None = None, ids: np.ndarray | None = None) -> pa.Table:
    """The scores table from each key's component label (keys sorted). A group's representative is its
    lowest key; its id is the representative's ``ids`` entry: its index row (see
    :func:`~pipeline.curation.scoring.shard_tasks.index_row_ids`), which a part-by-part computation knows
    too; without ``ids``, its position among ``keys``."""
    _, first_member, inverse = np.unique(labels_of_groups, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = np.bincount(inverse, minlength=len(first_member))[inverse]
    representative = first_member[inverse]
    group = representative if ids is None else np.asarray(ids, np.int64)[representative]
    return pa.table(grouping_columns(pa.array(keys.tolist(), pa.string()), sizes, distances, group,
                                     pa.array(keys[representative].tolist(), pa.string()), hash_column))


def exact_groups(keys: np.ndarray, digests: list[str], ids: np.ndarray | None = None) -> pa.Table:
    _, component = np.unique(np.array(digests, dtype=object), return_inverse=True)
    return grouping_table(keys, component, np.zeros(len(keys), np.int64), pa.array(digests, pa.string()), ids)


def phash_groups(keys: np.ndarray, values: list[bytes], radius: int, ids: np.ndarray | None = None) -> pa.Table:
    packed = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), HASH_BITS // 8)
    unique, inverse = np.unique(packed, axis=0, return_inverse=True)  # identical hashes: one node
    first, second = near_pairs(unique, radius, parallel=ray.is_initialized())
    graph = coo_matrix((np.ones(len(first)), (first, second)), shape=(len(unique), len(unique)))
    _, component = connected_components(graph, directed=False)
    per_key = component[inverse.reshape(-1)]
    _, first_member = np.unique(per_key, return_index=True)  # keys are sorted: the lowest key of each group
    distances = hamming(packed, np.arange(len(keys)), first_member[per_key]).astype(np.int64)
    return grouping_table(keys, per_key, distances, pa.array(values, pa.binary(HASH_BITS // 8)), ids)


def duplicate_groups(dataset_url: str, kind: str, radius: int = PHASH_RADIUS, progress: bool = True) -> pa.Table:
    if kind not in ("exact", "phash"):
        raise UsageError(f"unknown grouping scorer {kind!r}")
    keys, hashes = hash_train_split(dataset_url, kind, progress)
    ids = index_row_ids(dataset_url, keys)
    return exact_groups(keys, hashes, ids) if kind == "exact" else phash_groups(keys, hashes, radius, ids)
