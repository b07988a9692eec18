"""``onion curate``: the whole example-level method, round after round.

Round 0 keeps a random share (after dropping all but one of each group of copies, with
``dedup``; those stay dropped in every round); every later round scores the kept examples by their training
dynamics in the previous phase, swaps the ``remove_n`` easiest out and as many from the dropped
pool in, and trains on the new selection. Training continues across rounds with the same model,
optimiser and learning-rate schedule; only the selection streamed changes. The survivors are read
from the source shards through the index; ``survivor_shards`` also writes them as compact shards
(``kept/vNNNN``) and trains on those, which pays on object stores when a small share is read for
many epochs.

Every step is idempotent: a selection with the same rows is the same version, materialising an
existing survivor set is a no-op, and training resumes from its last checkpoint. So running the
same command again after an interruption, at any point, finishes the job with the same result.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass

import pyarrow.compute as pc

from pipeline.curation.materialize import kept_url, materialize
from pipeline.curation.scoring import ScoreContext, read_scores, store_scores
from pipeline.curation.scoring.dynamics_scores import MIN_PRESENTATIONS
from pipeline.curation.scoring.stored import read_scores_part, scores_layout
from pipeline.curation.selection import (
    DEDUP_RULES,
    DUPLICATE,
    Made,
    SelectOptions,
    SelectRequest,
    make_selection,
    read_grouping,
)
from pipeline.ingest.job import IngestOptions
from shards import UsageError, location, read_manifest
from shards.selections import selection_parts, version_parameters
from shards.urls import Location
from trainer.config import TrainConfig
from trainer.launch import run_training
from trainer.preflight import check_start
from trainer.run_folder import CURATION, claim, has_checkpoint, release_unstarted

DYNAMICS_SCORERS = ("forgetting", "loss")


@dataclass(frozen=True)
class CurationPlan:
    rounds: int = 5
    round_epochs: int = 30
    keep: float = 0.8
    remove_n: int | None = None  # default: 10% of the kept examples
    scorer: str = "forgetting"
    seed: int = 0
    survivor_shards: bool = False  # write each round's survivors as shards and train on them
    dedup: str | None = None  # a grouping score (scores/<name>): one example per group, dropped for every round
    dedup_rule: str = "lowest-key"


def run_id(run_url: str) -> str:
    return os.path.basename(run_url.rstrip("/")) or "run"


def check_plan(plan: CurationPlan) -> None:
    """Refuse a plan that cannot mean anything, before any output is claimed."""
    if not 0.0 < plan.keep < 1.0:
        raise UsageError(f"--keep must be in (0, 1), not {plan.keep}")
    if plan.remove_n is not None and plan.remove_n < 1:
        raise UsageError(f"--remove-n must be at least 1, not {plan.remove_n}")
    if plan.dedup_rule not in DEDUP_RULES or plan.dedup_rule == "highest-score":
        raise UsageError(f"--dedup-rule must be lowest-key or typical for the rounds (no scores exist before round 0), "
                         f"not {plan.dedup_rule!r}")
    if plan.scorer not in DYNAMICS_SCORERS:
        raise UsageError(f"--scorer must be one of {', '.join(DYNAMICS_SCORERS)}, not {plan.scorer!r}")
    if plan.scorer == "forgetting" and plan.rounds > 1 and plan.round_epochs < MIN_PRESENTATIONS:
        raise UsageError(
            f"forgetting has no signal with --round-epochs {plan.round_epochs}: each example is presented once per "
            f"round, and a forgetting event needs {MIN_PRESENTATIONS} presentations; use --round-epochs "
            f"{MIN_PRESENTATIONS} or more, or --scorer loss")


def check_pool(reasons: Counter, kept: int, plan: CurationPlan) -> None:
    """Later rounds restore from what round 0 dropped at random (never duplicates): refuse, before any
    training, a plan whose pool cannot feed them (``reasons``: round 0's rows by reason)."""
    if plan.rounds < 2:
        return
    pool = reasons["random-initial"]
    wanted = plan.remove_n or max(1, int(0.1 * kept))
    if pool < wanted:
        raise UsageError(f"round 0 leaves {pool} examples to restore from, and each later round swaps {wanted}: "
                         "the duplicates took the share --keep drops; raise the dropped share (lower --keep) or "
                         "lower --remove-n")


def claim_run(run: Location, config: TrainConfig, record: dict) -> bool:
    """Claim the folder as ``onion train`` does (:func:`trainer.run_folder.claim`), then mark it a curation
    (``curation.json``); a folder already marked with the same dataset and plan is resumed. Returns whether
    this call made the claim."""
    if claim(run, config.to_dict()):
        run.write_atomic(CURATION, json.dumps({**record, "selections": []}, indent=2).encode())
        return True
    if not run.exists(CURATION):
        raise UsageError(f"{run.url} already holds a training run; use another --out")
    stored = json.loads(run.read_bytes(CURATION))
    if {"dataset": stored["dataset"], "plan": stored["plan"]} != record:
        raise UsageError(f"{run.url} holds a curation with other settings; use another --out")
    return False


def scores_name(plan: CurationPlan, run_url: str, round_number: int) -> str:
    return f"{plan.scorer}-{run_id(run_url)}-r{round_number}"


def curate(dataset_url: str, config: TrainConfig, plan: CurationPlan, *, progress: bool = True) -> dict:
    """Run (or finish) all rounds; returns the training summary, the rounds' selections and what each did."""
    check_plan(plan)
    if config.example_strategy != "all":
        raise UsageError(f"--example-strategy {config.example_strategy} chooses examples per epoch itself; "
                         "use it with onion train, not with the curation rounds")
    dataset = location(dataset_url)
    read_manifest(dataset)  # a clear error before anything is claimed, not after
    check_start(config)  # the device and the model, before round 0 writes its selection
    if plan.dedup:
        read_grouping(dataset, plan.dedup)  # the groups exist, before the run is claimed
    run = location(config.out)
    record = {"dataset": dataset_url, "plan": asdict(plan)}
    claimed = claim_run(run, config, record)
    try:
        return _curate(dataset_url, config, plan, record, progress)
    except BaseException:
        if claimed:  # failed before its first checkpoint: the folder is left free
            release_unstarted(run)
        raise


def _curate(dataset_url: str, config: TrainConfig, plan: CurationPlan, record: dict, progress: bool) -> dict:
    """Each round's selection is made as ``onion select --round`` makes it (on Ray actors, part by part, for
    a partitioned index: no process holds a row per example), recording the plan."""
    dataset, run = location(dataset_url), location(config.out)
    ingest_options = IngestOptions(seed=plan.seed)
    versions: list[str] = []
    made: Made | None = None
    summary: dict | None = None
    for round_number in range(plan.rounds):
        parameters = {"curation": config.out, "round": round_number, **asdict(plan)}
        if made is None:
            request = SelectRequest(options=SelectOptions(keep=plan.keep, seed=plan.seed, dedup_rule=plan.dedup_rule),
                                    dedup=plan.dedup, round_number=0)
        else:
            context = ScoreContext(dataset_url, config.out, first_epoch=(round_number - 1) * plan.round_epochs,
                                   last_epoch=round_number * plan.round_epochs - 1, seed=plan.seed, progress=progress)
            name = scores_name(plan, config.out, round_number)
            store_scores(plan.scorer, context, stored_as=name)
            remove_n = plan.remove_n or max(1, int(0.1 * made.kept))
            request = SelectRequest(name, SelectOptions(seed=plan.seed), round_number=round_number,
                                    parent=made.version, remove_n=remove_n)
            parameters["scores"] = name
        made = make_selection(dataset, request, parameters=parameters)
        if round_number == 0:
            check_pool(reason_counts(dataset, made.version), made.kept, plan)
        versions.append(made.version)
        if plan.survivor_shards:
            materialize(dataset_url, versions[-1], ingest_options, ["onion", "curate", dataset_url, config.out],
                        progress=progress)
        run.write_atomic(CURATION, json.dumps({**record, "selections": versions}, indent=2).encode())
        data = ((kept_url(dataset_url, versions[-1]), None) if plan.survivor_shards
                else (dataset_url, versions[-1]))
        # the phase trains as onion train does (one process, or --nproc N), from the last checkpoint on
        phase = TrainConfig.from_dict({**config.to_dict(), "dataset": data[0], "selection": data[1] or ""})
        summary = run_training(phase, resume=has_checkpoint(run), until_epoch=(round_number + 1) * plan.round_epochs)
    return {**(summary or {}), "selections": versions, "rounds": round_reports(dataset, versions)}


def reason_counts(dataset: Location, version: str) -> Counter:
    """A version's rows by reason, counted part by part."""
    counts: Counter = Counter()
    for _, rows in selection_parts(dataset, version, ["reason"]):
        counts.update(dict(zip(*(column.to_pylist() for column in pc.value_counts(rows["reason"]).flatten()))))
    return counts


def round_reports(dataset: Location, versions: list[str]) -> list[dict]:
    """What each round did, in numbers a person reads: kept, dropped and restored (with why), each version
    counted part by part."""
    reports = []
    for version in versions:
        reasons = reason_counts(dataset, version)
        parameters = version_parameters(dataset, version)
        number = int(parameters.get("round", 0))
        suffix = f"@r{number}"
        dropped = Counter({reason.split("@")[0]: count for reason, count in reasons.items()
                           if reason.endswith(suffix) and not reason.startswith("restored")})
        kept = sum(int(pc.sum(rows["kept"]).as_py() or 0) for _, rows in selection_parts(dataset, version, ["kept"]))
        report = {"round": number, "version": version, "kept": kept,
                  "dropped": dict(dropped), "restored": reasons[f"restored{suffix}"]}
        if number == 0:
            report["dropped"] = {"random-initial": reasons["random-initial"]}
            duplicates = sum(count for reason, count in reasons.items() if reason.startswith(DUPLICATE))
            if duplicates:
                report["dropped"]["duplicate"] = duplicates
        if parameters.get("scores"):
            report.update(never_learned_report(dataset, version, parameters["scores"]))
        reports.append(report)
    return reports


def never_learned_report(dataset: Location, version: str, scores_of: str) -> dict:
    """How many never-learned examples the round's scores found, and how many of them stayed kept: one index
    part at a time where the scores and the version are both stored by part (their parts are the index's)."""
    layout = scores_layout(dataset, scores_of)
    whole = read_scores(dataset, scores_of) if layout is None else None  # scores stored as one file
    entries = {entry["name"]: entry for entry in layout["parts"]} if layout else {}
    never = kept = 0
    for part_name, rows in selection_parts(dataset, version, ["key", "kept"]):
        if whole is None and part_name is None:  # the version is one file: every part of the scores
            scores = read_scores(dataset, scores_of)
        elif whole is None:
            if part_name not in entries:
                continue  # no scored key in this part
            scores = read_scores_part(dataset, scores_of, layout, entries[part_name])
        else:
            scores = whole
        if "learned" not in scores.column_names:
            return {}
        never_keys = scores.filter(pc.and_(pc.invert(scores["learned"]), pc.greater(scores["presentations"], 0)))["key"]
        never += int(pc.sum(pc.is_in(never_keys, value_set=rows["key"])).as_py() or 0)
        kept += int(pc.sum(pc.and_(pc.is_in(rows["key"], value_set=never_keys), rows["kept"])).as_py() or 0)
    return {"never_learned": never, "never_learned_kept": kept}
