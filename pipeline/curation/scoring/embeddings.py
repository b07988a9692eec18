"""The ``embed`` grouping scorer: semantic duplicates from embeddings, grouped SemDeDup-style.

Features (one vector per train example) come from a pool of Ray actors, one shard per call:

* ``--run RUN``: the class-token features (timm's pre-logits) of the run's newest checkpoint;
* ``--model NAME --weights FILE``: any timm model with local weights (safetensors or a torch file),
  fed at its own input size and normalisation;
* ``--model pixels``: no network at all, the image itself moved so its lowest Fourier component has
  phase zero (undoing a shift, see :func:`duplicates.canonical_translation`), grey, zero-mean.

Grouping follows SemDeDup (Abbas et al., 2023): unit vectors are clustered by k-means, and pairs
with cosine similarity at least ``threshold`` are searched for only inside a point's nearest
``probes`` clusters. Both steps are faiss (``IndexIVFFlat`` over inner products, ``range_search``):
a well-kept library whose k-means and search run multi-threaded in C++ on a CPU, without the
n x n similarity matrix a hand-written search would need. Groups are formed from those pairs, led
by their lowest key (:func:`leaders`); ``distance`` is 1 - cosine to the leader.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import ray
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from scipy.sparse import csr_matrix
from tqdm import tqdm

from pipeline.curation.scoring.duplicates import canonical_translation, grey, grouping_table
from pipeline.curation.scoring.shard_tasks import index_row_ids, shard_index_rows, train_shards
from pipeline.fan_out import fan_out_to_actors
from pipeline.ray_runtime import current_node, describe_nodes, ensure_ray
from shards import ShardDataset, UsageError, location

PIXELS = "pixels"  # the built-in feature "model": shift-normalised pixels
PIXEL_SIDE = 32  # pixel features are taken at 32x32 (1,024 dimensions)
# cosine; measured (docs/benchmarks.md): 98% of planted 32x32 near-copies above it, no unrelated pair
EMBED_THRESHOLD = 0.98
CLUSTER_SIZE = 1000  # k-means clusters of about this many examples
PROBES = 2  # clusters searched per example: a copy that k-means put in the neighbouring cluster is still found
BATCH = 256
COSINE_TOLERANCE = 1e-6  # float32 rounding of cosines of unit vectors


@dataclass(frozen=True)
class FeatureSource:
    """Where the embeddings come from: a run's checkpoint, a timm model with local weights, or pixels."""

    run: str | None = None
    model: str | None = None  # a timm model name, or PIXELS
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.model is None and self.run is None:
            raise UsageError("embed needs features: --run RUN (its class-token features), --model NAME --weights FILE "
                             f"(a timm model with local weights) or --model {PIXELS}")
        if self.model not in (None, PIXELS) and not self.weights:
            raise UsageError(f"--model {self.model}: give its local weights with --weights FILE "
                             "(nothing is downloaded)")
        if self.model is not None and self.run is not None:
            raise UsageError("embed: give either --run or --model, not both")

    def describe(self) -> str:
        if self.model == PIXELS:
            return "shift-normalised pixels"
        return f"{self.model} ({self.weights})" if self.model else f"class token of {self.run}"


def pixel_features(images: list[torch.Tensor]) -> np.ndarray:
    """Shift-normalised grey pixels at PIXEL_SIDE x PIXEL_SIDE, one row per image."""
    rows = []
    for image in images:
        canonical = canonical_translation(grey(image.permute(1, 2, 0).numpy()))
        resized = Image.fromarray(canonical.astype(np.float32), mode="F").resize((PIXEL_SIDE, PIXEL_SIDE), Image.BOX)
        row = np.asarray(resized, dtype=np.float32).ravel()
        rows.append(row - row.mean())  # brightness offsets do not count; the cosine ignores scale
    return np.stack(rows) if rows else np.zeros((0, PIXEL_SIDE * PIXEL_SIDE), np.float32)


def run_model(run_url: str) -> tuple[torch.nn.Module, int, tuple[float, ...], tuple[float, ...]]:
    """The run's newest checkpoint, with every token and attention connection kept (features, not training)."""
    from pipeline.curation.scoring.el2n import run_architecture, run_normalization
    from trainer.checkpoint import load_weights

    name, kwargs = run_architecture(run_url)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(load_weights(location(run_url)))
    if hasattr(model, "set_rates"):
        model.set_rates(token_keep=1.0, attn_keep=1.0)
    normalization = run_normalization(run_url)  # the trainer's inputs
    return model, kwargs["img_size"], normalization.mean, normalization.std


def timm_model(name: str, weights: str) -> tuple[torch.nn.Module, int, tuple[float, ...], tuple[float, ...]]:
    """A timm model with the weights at ``weights`` (a path or any fsspec URL; nothing is fetched from a hub).

    The file is read as ``--pretrained`` reads one (safetensors, or ``torch.load(weights_only=True)``: a
    file whose unpickling would run code is refused), then handed to timm's own pretrained path as
    safetensors, so the model's checkpoint filter still runs and timm never unpickles the user's file
    (the oldest timm onion admits, 1.0.16, loads with ``weights_only=False``)."""
    import tempfile

    from safetensors.torch import save_file

    from trainer.pretrained import read_state_dict

    if not timm.is_model(name):
        raise UsageError(f"--model {name}: timm has no model of that name "
                         "(list them: python -c \"import timm; print(timm.list_models())\")")
    state = read_state_dict(weights, flag="--weights")
    with tempfile.TemporaryDirectory(prefix="onion-weights-") as folder:
        safe = os.path.join(folder, "weights.safetensors")
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, safe)
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": safe})
        except (RuntimeError, OSError, SafetensorError, KeyError, ValueError) as error:  # another model's weights
            raise UsageError(f"--model {name} --weights {weights}: cannot load the file as its weights "
                             f"({type(error).__name__}: {error})") from error
    # Without a classifier timm loads non-strictly and only warns: another model's file would give a
    # randomly initialised network's features. Every tensor of the model must come from the file.
    absent = [key for key in model.state_dict() if key not in state]
    if absent:
        raise UsageError(f"--model {name} --weights {weights}: cannot load the file as its weights ({len(absent)} of "
                         f"the model's {len(model.state_dict())} tensors are not in it, first: {absent[0]})")
    config = timm.data.resolve_model_data_config(model)
    return model, config["input_size"][-1], tuple(config["mean"]), tuple(config["std"])


def feature_function(source: FeatureSource, device: torch.device) -> Callable[[list[torch.Tensor]], np.ndarray]:
    """uint8 CHW images (of any sizes) -> float32 feature rows."""
    if source.model == PIXELS:
        return pixel_features
    model, size, mean, std = timm_model(source.model, source.weights) if source.model else run_model(source.run)
    model = model.eval().to(device)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def model_input(image: torch.Tensor) -> torch.Tensor:
        x = image.to(device).float().div_(255.0).unsqueeze(0)
        if x.shape[-1] != size or x.shape[-2] != size:  # each on its own: a folder's images differ in size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def features(images: list[torch.Tensor]) -> np.ndarray:
        x = (torch.cat([model_input(image) for image in images]) - mean_t) / std_t
        return model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy()

    return features


@ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)
class Embedder:
    def __init__(self, source: FeatureSource) -> None:
        torch.set_num_threads(1)
        self.features = feature_function(source, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def embed_shard(self, dataset_url: str, shard: str,
                    index_rows: pa.Table | None) -> tuple[list[str], np.ndarray, str]:
        keys: list[str] = []
        images: list[torch.Tensor] = []
        rows: list[np.ndarray] = []
        for image, _, key in ShardDataset(dataset_url, "train", shuffle=False, channels=3, shards=[shard],
                                                 index=index_rows):
            keys.append(key)
            images.append(image)
            if len(images) == BATCH:
                rows.append(self.features(images))
                images = []
        if images:
            rows.append(self.features(images))
        return keys, np.concatenate(rows) if rows else np.zeros((0, 0), np.float32), current_node()


def embed_train_split(dataset_url: str, source: FeatureSource, actors: int | None = None,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every usable train example's key (sorted) and feature row, from a pool of Ray actors."""
    shards = train_shards(dataset_url)
    if not shards:
        return np.zeros(0, dtype=object), np.zeros((0, 1), np.float32)
    ensure_ray()
    index_rows = shard_index_rows(dataset_url, shards)
    keys: list[str] = []
    rows: list[np.ndarray] = []
    nodes: Counter = Counter()
    for _, (shard_keys, shard_rows, node) in fan_out_to_actors(
            shards, lambda: Embedder.remote(source),
            lambda actor, shard: actor.embed_shard.remote(dataset_url, shard, index_rows[shard]),
            actors=actors, desc="embed", progress=progress):
        keys.extend(shard_keys)
        if len(shard_keys):
            rows.append(shard_rows)
        nodes[node] += 1
    if progress:
        tqdm.write(f"embed: {len(shards)} shards embedded ({source.describe()}) on {describe_nodes(nodes)}",
                   file=sys.stderr)
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    features = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    return np.array(keys, dtype=object)[order], features[order]


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so inner products are cosines. An all-zero row (a blank image's
    centred pixels) becomes the constant unit vector: blank images are copies of one another, and
    orthogonal to every centred row."""
    rows = np.array(features, dtype=np.float32, order="C")
    if rows.size:
        rows[~rows.any(axis=1)] = 1.0
    faiss.normalize_L2(rows)
    return rows


def similar_pairs(vectors: np.ndarray, threshold: float, cluster_size: int = CLUSTER_SIZE,
                  probes: int = PROBES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row pairs (i < j) with cosine >= ``threshold``, searched inside each row's ``probes`` nearest
    k-means clusters; and the cosine of each pair."""
    count, dimensions = vectors.shape
    clusters = count // max(1, cluster_size)
    if clusters < 2:  # a small set: one exact search over all of it
        index = faiss.IndexFlatIP(dimensions)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimensions), dimensions, clusters, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # deterministic k-means
        index.cp.spherical = True
        index.train(vectors)
        index.nprobe = min(probes, clusters)
    index.add(vectors)
    # float32 products of unit vectors carry rounding of about 1e-7: search a little wider, so that
    # --threshold 1.0 still finds identical rows
    lims, similarity, neighbours = index.range_search(vectors, float(threshold) - COSINE_TOLERANCE)
    rows = np.repeat(np.arange(count), np.diff(lims).astype(np.int64))
    neighbours = neighbours.astype(np.int64)
    distinct = rows != neighbours
    # a pair may be found from one side only (each row searches its own nearest clusters): keep both
    low, high = np.minimum(rows, neighbours)[distinct], np.maximum(rows, neighbours)[distinct]
    codes, first = np.unique(low * count + high, return_index=True)
    return codes // count, codes % count, similarity[distinct][first]


def leaders(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Each row's group leader: rows in key order, each joining the first leader it is similar to,
    or leading a group of its own. Unlike connected components, a chain a~b~c of ever-so-slightly
    different images does not merge a and c: every member is within the threshold of its leader
    (measured on planted 16x16 data at cosine 0.97: components made groups that dropped 11% of the
    unique examples, leaders 6.5%; at the default 0.98 both found no false group)."""
    neighbours = csr_matrix((np.ones(len(first), np.int8), (first, second)), shape=(count, count))
    leader = np.full(count, -1, dtype=np.int64)
    for row in range(count):
        if leader[row] >= 0:
            continue
        leader[row] = row
        members = neighbours.indices[neighbours.indptr[row]:neighbours.indptr[row + 1]]
        free = members[leader[members] < 0]
        leader[free] = row
    return leader


def semantic_groups(keys: np.ndarray, features: np.ndarray, threshold: float = EMBED_THRESHOLD,
                    cluster_size: int = CLUSTER_SIZE, probes: int = PROBES, ids: np.ndarray | None = None) -> pa.Table:
    vectors = unit_rows(features)
    first, second, _ = similar_pairs(vectors, threshold, cluster_size, probes) if len(keys) > 1 else ([], [], [])
    leader = leaders(len(keys), np.asarray(first, np.int64), np.asarray(second, np.int64))  # keys sorted: lowest leads
    distances = 1.0 - np.einsum("ij,ij->i", vectors, vectors[leader]).astype(np.float64)
    distances[leader == np.arange(len(leader))] = 0.0  # a leader is at distance 0 from itself, not 1e-7
    return grouping_table(keys, leader, np.clip(distances, 0.0, 2.0), ids=ids)


def embedding_groups(dataset_url: str, source: FeatureSource, threshold: float = EMBED_THRESHOLD,
                     actors: int | None = None, progress: bool = True) -> pa.Table:
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"--threshold {threshold}: a cosine similarity in (0, 1]")
    if source.model != PIXELS:  # a wrong model, weights file or run: one line here, not a dead Ray actor
        feature_function(source, torch.device("cpu"))
    keys, features = embed_train_split(dataset_url, source, actors, progress)
    return semantic_groups(keys, features, threshold, ids=index_row_ids(dataset_url, keys))
