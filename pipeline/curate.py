"""``onion curate``: the whole example-level method, round after round.

Round 0 keeps a random share; every later round scores the kept examples by their training
dynamics in the previous phase, swaps the ``remove_n`` easiest out and as many from the dropped
pool in, and writes the survivors as shards. Training continues across rounds with the same
model, optimiser and learning-rate schedule; only the streamed dataset changes.

Every step is idempotent: a selection with the same rows is the same version, materialising an
existing survivor set is a no-op, and training resumes from its last checkpoint. So running the
same command again after an interruption, at any point, finishes the job with the same result.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from shards import location

from pipeline.ingest import IngestOptions
from pipeline.materialize import kept_url, materialize
from pipeline.scoring import ScoreContext, compute_scores, write_scores
from pipeline.selection import SourceExamples, initial_round, next_round, read_selection, save_selection
from trainer.config import TrainConfig
from trainer.loop import CONFIG_NAME, Trainer

CURATION_NAME = "curation.json"


@dataclass(frozen=True)
class CurationPlan:
    rounds: int = 5
    round_epochs: int = 30
    keep: float = 0.8
    remove_n: int | None = None  # default: 10% of the kept examples
    scorer: str = "forgetting"
    seed: int = 0


def run_id(run_url: str) -> str:
    return os.path.basename(run_url.rstrip("/")) or "run"


def curate(dataset_url: str, config: TrainConfig, plan: CurationPlan, *, ray_address: str | None = None,
           workers: int | None = None, progress: bool = True) -> dict:
    """Run (or finish) all rounds; returns the training summary plus the rounds' selections."""
    dataset = location(dataset_url)
    run = location(config.out)
    record = {"dataset": dataset_url, "plan": asdict(plan)}
    if not run.exists(CURATION_NAME) and run.exists(CONFIG_NAME):
        raise ValueError(f"{config.out} already holds a training run; use another --out")
    # curation.json, created exclusively, makes this job the run's owner; finding it means resuming
    if not run.create_exclusive(CURATION_NAME, json.dumps({**record, "selections": []}, indent=2).encode()):
        stored = json.loads(run.read_bytes(CURATION_NAME))
        if {"dataset": stored["dataset"], "plan": stored["plan"]} != record:
            raise ValueError(f"{config.out} holds a curation with other settings; use another --out")
    source = SourceExamples.of(dataset)
    ingest_options = IngestOptions(seed=plan.seed)
    versions: list[str] = []
    trainer: Trainer | None = None
    for round_number in range(plan.rounds):
        if round_number == 0:
            table = initial_round(source, plan.keep, plan.seed)
        else:
            context = ScoreContext(dataset_url, config.out, first_epoch=(round_number - 1) * plan.round_epochs,
                                   last_epoch=round_number * plan.round_epochs - 1, seed=plan.seed, progress=progress)
            scores = compute_scores(plan.scorer, context)
            write_scores(dataset, f"{plan.scorer}-{run_id(config.out)}-r{round_number}", scores)
            parent = read_selection(dataset, versions[-1])
            remove_n = plan.remove_n or max(1, int(0.1 * sum(parent["kept"].to_pylist())))
            table = next_round(source, parent, versions[-1], scores, remove_n, round_number, plan.seed,
                               "unforgettable" if plan.scorer == "forgetting" else "easy")
        versions.append(save_selection(dataset, table, {"curation": config.out, "round": round_number, **asdict(plan)}))
        materialize(dataset_url, versions[-1], ingest_options, ["onion", "curate", dataset_url, config.out],
                    ray_address=ray_address, workers=workers, progress=progress)
        run.write_atomic(CURATION_NAME, json.dumps({**record, "selections": versions}, indent=2).encode())
        if trainer is None:
            trainer = Trainer(TrainConfig(**{**config.to_dict(), "dataset": kept_url(dataset_url, versions[0])}))
            trainer.resume()
        trainer.use_dataset(kept_url(dataset_url, versions[-1]))
        summary = trainer.train(until_epoch=(round_number + 1) * plan.round_epochs)
    return {**summary, "selections": versions}
