"""EL2N (Paul et al., 2021): ||softmax(f(x)) - onehot(y)||_2, averaged over checkpoints.

A pool of Ray actors, each holding the models, scores whole shards streamed with the reader
(batched; on a GPU when the actor has one). Actors restart and retry their task if a worker
dies, and results are only written by the driver once every shard is in, so a killed worker
changes nothing in the output. On a partitioned dataset the driver sets each index part's scores
aside (serialised, in a local temporary folder) as soon as its shards are scored, so it never holds
the whole table (:func:`el2n_parts`).
"""
from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
import timm
import torch
from safetensors.torch import load as load_safetensors
from tqdm import tqdm

from pipeline.curation.scoring.shard_tasks import shard_index_rows, train_shards
from pipeline.curation.scoring.stored import (
    METADATA,
    commit_scores,
    score_part_entry,
    scorer_metadata,
    scores_identity,
    write_score_part,
)
from pipeline.fan_out import fan_out_to_actors
from pipeline.ray_runtime import current_node, describe_nodes, ensure_ray
from shards import ShardDataset, UsageError, location
from shards.index import IndexPart, table_to_parquet_bytes
from trainer.augment import ImageTransform
from trainer.config import TrainConfig
from trainer.inputs import Normalization, augment_policy, data_info, prepare, reader_transforms
from trainer.run_folder import CHECKPOINTS, CONFIG, MODEL_FILE, MODEL_JSON, STEP_PREFIX, run_config

if TYPE_CHECKING:
    from pipeline.curation.scoring import ScoreContext

BATCH = 256


def checkpoint_folders(run_url: str) -> list[str]:
    checkpoints = location(run_url).child(CHECKPOINTS)
    folders = [name for name in checkpoints.list_names() if name.startswith(STEP_PREFIX)]
    if not folders:
        raise UsageError(f"{run_url}: no checkpoints to score with (train it first, or give another --run)")
    return folders


def run_architecture(run_url: str) -> tuple[str, dict]:
    """The timm model name and keyword arguments a run was trained with (its model.json)."""
    built = json.loads(location(run_url).read_bytes(MODEL_JSON))
    return built["model"], built["kwargs"]


def run_normalization(run_url: str) -> Normalization:
    """The input normalisation a run was trained with (its model.json)."""
    return Normalization.recorded(json.loads(location(run_url).read_bytes(MODEL_JSON)))


def run_evaluation_transform(run_url: str, dataset_url: str) -> ImageTransform | None:
    """How the run's evaluation sees this dataset's images (photos of mixed sizes: the centre crop at the
    model's side; equal-size small images: as stored, resized on the device)."""
    run = location(run_url)
    recorded = run_config(run) if run.exists(CONFIG) else {}
    config = TrainConfig.from_dict(recorded)
    info = data_info(location(dataset_url))
    _, kwargs = run_architecture(run_url)
    return reader_transforms(augment_policy(config, info), info, kwargs["img_size"], config.seed)[1]


@ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)
class EL2NScorer:
    def __init__(self, run_url: str, folders: list[str], transform: ImageTransform | None) -> None:
        torch.set_num_threads(1)
        run = location(run_url)
        name, kwargs = run_architecture(run_url)
        self.img_size = kwargs["img_size"]
        self.normalization = run_normalization(run_url)
        self.transform = transform
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = []
        for folder in folders:
            model = timm.create_model(name, pretrained=False, **kwargs)
            model.load_state_dict(load_safetensors(run.child(CHECKPOINTS, folder).read_bytes(MODEL_FILE)))
            self.models.append(model.eval().to(self.device))

    @torch.no_grad()
    def score_shard(self, dataset_url: str, split: str, shard: str,
                    rows: pa.Table | None) -> tuple[list[str], np.ndarray, str]:
        keys: list[str] = []
        scores: list[np.ndarray] = []
        data = ShardDataset(dataset_url, split, shuffle=False, batch_size=BATCH, channels=3, shards=[shard],
                            index=rows, image_transform=self.transform)
        for images, labels, batch_keys in data:
            x = prepare(images, self.img_size, self.device, self.normalization)
            onehot = torch.nn.functional.one_hot(labels.to(self.device), self.models[0].num_classes).float()
            errors = [(model(x).float().softmax(dim=1) - onehot).norm(dim=1) for model in self.models]
            scores.append(torch.stack(errors).mean(dim=0).cpu().numpy())
            keys.extend(batch_keys)
        return keys, np.concatenate(scores) if scores else np.zeros(0), current_node()


def el2n_table(keys: list[str], scores: np.ndarray, checkpoints: int) -> pa.Table:
    """The stored columns for ``keys`` (any order; the table comes sorted by key)."""
    table = pa.table({"key": pa.array(keys, pa.string()), "score": scores, "tiebreak": np.zeros(len(keys)),
                      "checkpoints": np.full(len(keys), checkpoints)})
    return table.sort_by("key")


def scored_shards(dataset_url: str, split: str, shards: list[str], run_url: str, actors: int | None,
                  progress: bool) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """``(shard, keys, scores)`` as each shard is scored, by a pool of ``actors`` scorers (default: one per
    CPU of the Ray cluster); then a line naming the nodes that scored."""
    folders = checkpoint_folders(run_url)
    ensure_ray()
    transform = run_evaluation_transform(run_url, dataset_url)
    index_rows = shard_index_rows(dataset_url, shards)
    nodes: Counter = Counter()
    for shard, (shard_keys, shard_scores, node) in fan_out_to_actors(
            shards, lambda: EL2NScorer.remote(run_url, folders, transform),
            lambda actor, shard: actor.score_shard.remote(dataset_url, split, shard, index_rows[shard]),
            actors=actors, desc="el2n", progress=progress):
        nodes[node] += 1
        yield shard, shard_keys, shard_scores
    if progress:
        tqdm.write(f"el2n: {len(shards)} shards scored on {describe_nodes(nodes)}", file=sys.stderr)


def el2n(dataset_url: str, split: str, shards: list[str], run_url: str, actors: int | None = None,
         progress: bool = True) -> pa.Table:
    """EL2N of every example in ``shards``; ``actors`` scorers (default: one per CPU of the Ray cluster)."""
    keys: list[str] = []
    values: list[np.ndarray] = []
    for _, shard_keys, shard_scores in scored_shards(dataset_url, split, shards, run_url, actors, progress):
        keys.extend(shard_keys)
        values.append(shard_scores)
    return el2n_table(keys, np.concatenate(values) if values else np.zeros(0), len(checkpoint_folders(run_url)))


def el2n_parts(name: str, context: ScoreContext, parts: list[IndexPart]) -> tuple[str, int]:
    """EL2N of a partitioned dataset's train examples, stored as ``scores/<name>`` one index part at a time:
    once every shard of a part is scored, the part is serialised and set aside in a local temporary folder
    (its folder's name, the checksum of every part's checksum, is known only at the end), so the driver
    holds one part's scores, never the whole table. The same bytes as :func:`el2n` then
    :func:`~pipeline.curation.scoring.stored.write_scores`; ``(the JSON's URL, rows)``."""
    dataset = location(context.dataset)
    checkpoints = len(checkpoint_folders(context.run))
    train = train_shards(context.dataset)
    part_of = {shard: number for number, part in enumerate(parts) for shard in part.shards}
    waiting = Counter(part_of[shard] for shard in train)
    scored: dict[int, list[tuple[list[str], np.ndarray]]] = {}
    entries: dict[int, dict] = {}
    metadata = scorer_metadata("el2n")
    with tempfile.TemporaryDirectory(prefix="onion-el2n-") as aside:
        def set_aside(number: int, table: pa.Table) -> None:
            data = table_to_parquet_bytes(table.replace_schema_metadata(metadata))
            (Path(aside) / parts[number].name).write_bytes(data)
            entries[number] = score_part_entry(parts[number].name, data)

        for shard, keys, scores in scored_shards(context.dataset, "train", train, context.run, context.actors,
                                                 context.progress):
            number = part_of[shard]
            scored.setdefault(number, []).append((keys, scores))
            waiting[number] -= 1
            if not waiting[number]:
                done = scored.pop(number)
                set_aside(number, el2n_table([key for keys, _ in done for key in keys],
                                             np.concatenate([values for _, values in done]), checkpoints))
        if not entries and parts:  # nothing scored: the first part, empty, keeps the columns
            set_aside(0, el2n_table([], np.zeros(0), checkpoints))
        listed = [entries[number] for number in sorted(entries)]
        identity = scores_identity(listed)
        for number in sorted(entries):
            data = (Path(aside) / parts[number].name).read_bytes()
            write_score_part(dataset, name, identity, parts[number].name, data)
    url = commit_scores(dataset, name, identity, listed, metadata[METADATA])
    return url, sum(entry["rows"] for entry in listed)
