"""EL2N (Paul et al., 2021): ||softmax(f(x)) - onehot(y)||_2, averaged over checkpoints.

A pool of Ray actors, each holding the models, scores whole shards streamed with the reader
(batched; on a GPU when the actor has one). Actors restart and retry their task if a worker
dies, and results are only written by the driver once every shard is in, so a killed worker
changes nothing in the output.
"""
from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import ray
import timm
import torch
from safetensors.torch import load as load_safetensors
from tqdm import tqdm

from pipeline.curation.scoring.shard_tasks import shard_index_rows
from pipeline.fan_out import fan_out_to_actors
from pipeline.ray_runtime import current_node, describe_nodes, ensure_ray
from shards import ShardDataset, UsageError, location
from trainer.augment import ImageTransform
from trainer.checkpoint import CHECKPOINTS, MODEL_FILE, MODEL_JSON
from trainer.config import TrainConfig
from trainer.inputs import Normalization, augment_policy, data_info, prepare, reader_transforms
from trainer.loop import CONFIG_NAME

BATCH = 256


def checkpoint_folders(run_url: str) -> list[str]:
    checkpoints = location(run_url).child(CHECKPOINTS)
    folders = [name for name in checkpoints.list_names() if name.startswith("step-")]
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
    recorded = json.loads(run.read_bytes(CONFIG_NAME)) if run.exists(CONFIG_NAME) else {}
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


def el2n(dataset_url: str, split: str, shards: list[str], run_url: str, actors: int | None = None,
         progress: bool = True) -> pa.Table:
    """EL2N of every example in ``shards``; ``actors`` scorers (default: one per CPU of the Ray cluster)."""
    folders = checkpoint_folders(run_url)
    ensure_ray()
    transform = run_evaluation_transform(run_url, dataset_url)
    keys: list[str] = []
    values: list[np.ndarray] = []
    index_rows = shard_index_rows(dataset_url, shards)
    nodes: Counter = Counter()
    for _, (shard_keys, shard_scores, node) in fan_out_to_actors(
            shards, lambda: EL2NScorer.remote(run_url, folders, transform),
            lambda actor, shard: actor.score_shard.remote(dataset_url, split, shard, index_rows[shard]),
            actors=actors, desc="el2n", progress=progress):
        keys.extend(shard_keys)
        values.append(shard_scores)
        nodes[node] += 1
    if progress:
        tqdm.write(f"el2n: {len(shards)} shards scored on {describe_nodes(nodes)}", file=sys.stderr)
    score = np.concatenate(values) if values else np.zeros(0)
    table = pa.table({"key": pa.array(keys, pa.string()), "score": score, "tiebreak": np.zeros(len(keys)),
                      "checkpoints": np.full(len(keys), len(folders))})
    return table.sort_by("key")
