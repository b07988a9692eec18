"""``onion bench train``: every level of the method alone and together, side by side, in one run.

Arms: ``dense`` (all examples, no sparsity), ``example`` (the paper's curation rounds only),
``example-dynamic`` (per-epoch soft pruning, InfoBatch), ``token``, ``attention``, ``token+attention``,
``tri-level`` and ``tri-level-dynamic`` (all three levels, with rounds or with per-epoch pruning),
plus any from a YAML file. All use the same data, epochs, seeds and hyper-parameters; the arm order
rotates with the seed so machine drift favours none. Time is each arm's whole wall clock (curation's
scoring included); FLOPs are counted from the token counts the steps really ran with.

A bench survives a stop: every finished run is recorded in ``runs.json`` under its arm, seed and a
fingerprint of everything that decides its result (the whole training configuration, the curation
plan, the data), and the same command run again keeps those and runs the rest. Pieces run
elsewhere (``--first-seed`` to give each its own seeds, dense in every piece) are put together by
``--merge``, which pairs each arm with dense of the same seed from the same piece.

Accuracy is judged by paired differences: each arm's top-1 minus dense's top-1 of the same seed
(same initial weights and data order), with a 95% t-interval over seeds. An arm is at *parity* only
when the interval's lower bound is above minus the preset's margin.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from scipy import stats

from pipeline.bench.pareto import pareto_front, plot
from pipeline.curation.rounds import CurationPlan, curate
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from shards import UsageError
from trainer.config import TrainConfig
from trainer.launch import train

CURATE = "curate"  # arm setting: run the example level (curation rounds)
TIMINGS = ("seconds", "images_per_second", "fixed_seconds")
KEEP = "keep"  # arm setting: share of the examples each curation round keeps (default: the preset's)
DYNAMIC = {"example_strategy": "infobatch"}  # per-epoch soft pruning (InfoBatch) with its defaults


# Block-sparse attention (tiles of queries keep their top tiles of keys; the rest are skipped:
# FlexAttention on CUDA, gathered tiles on CPU) next to the paper's exact per-query top-k. It pays
# on long sequences, so the GPU preset has it; cpu-tiles measures its accuracy where tiles are not degenerate.
BLOCK_ARMS = {"attention-block": {"attn_keep": 0.3, "attn_mode": "block"},
              "token+attention-block": {"token_keep": 0.7, "attn_keep": 0.3, "attn_mode": "block"}}


@dataclass(frozen=True)
class Preset:
    source: str
    source_options: SourceOptions
    train: dict
    epochs: int
    rounds: int  # curation rounds for the example arms (epochs must divide evenly)
    keep: float = 0.8
    token_keep: float = 0.7
    attn_keep: float = 0.3
    seeds: int = 3
    arms: dict = field(default_factory=dict)
    parity_margin: float = 0.5  # top-1 points: parity when the paired interval's lower bound is above -margin
    later: bool = False  # the arms of methods that came after the paper (later_arms)
    merge_r: int = 4  # token merging's r: patch tokens merged away per block
    curriculum_side: int = 20  # the resolution curriculum's first side

    def later_arms(self) -> dict[str, dict]:
        """Methods that came after the paper, alone and with per-epoch example pruning: token merging
        (ToMe, ``merge_r`` per block), input patch dropout (PatchDropout / FLIP, half the patches) and a
        resolution curriculum (EfficientTrain++, from ``curriculum_side`` to full over half the epochs),
        the curriculum also under the whole method."""
        if not self.later:
            return {}
        merge, drop = {"token_merge": self.merge_r}, {"patch_drop": 0.5}
        low = {"curriculum_side": self.curriculum_side}
        sparse, attention = {"token_keep": self.token_keep}, {"attn_keep": self.attn_keep}
        return {"token-merge": merge, "patch-dropout": drop, "curriculum": low,
                "example-dynamic+token-merge": {**DYNAMIC, **merge},
                "example-dynamic+patch-dropout": {**DYNAMIC, **drop},
                "example-dynamic+curriculum": {**DYNAMIC, **low},
                "tri-level-dynamic+curriculum": {**DYNAMIC, **sparse, **attention, **low}}

    def arm_settings(self) -> dict[str, dict]:
        sparse = {"token_keep": self.token_keep}
        attention = {"attn_keep": self.attn_keep}
        return {"dense": {}, "example": {CURATE: True}, "example-dynamic": DYNAMIC, "token": sparse,
                "attention": attention, "token+attention": {**sparse, **attention},
                "tri-level": {CURATE: True, **sparse, **attention},
                "tri-level-dynamic": {**DYNAMIC, **sparse, **attention}, **self.later_arms(), **self.arms}


# The cpu preset's ViT and schedule: 6 blocks, width 96, 3 heads, patch 7 (16 tokens + class token).
CPU_TRAIN = dict(embed_dim=96, num_heads=3, depth=6, patch_size=7, batch_size=64, loader_workers=2, lr=1e-3,
                 warmup_epochs=1, keep_warmup_epochs=1, keep_ramp_epochs=2, eval_every=30)

PRESETS = {
    # Correctness only (CI): every arm end to end in well under 3 minutes on 2 CPU cores. Pruning at
    # block 1 of 4: the class token's output feels dropped tokens and masked keys only through the
    # blocks after the one whose mask it is, so pruning late in a shallow model would change nothing.
    "smoke": Preset("digits", SourceOptions(), dict(depth=4, embed_dim=64, num_heads=2, img_size=16, patch_size=4,
                                                    batch_size=64, loader_workers=1, lr=2e-3, warmup_epochs=0.3,
                                                    token_blocks=[1]),
                    epochs=4, rounds=2, token_keep=0.5, attn_keep=0.5, seeds=1),
    # MNIST 5k (3,986 train / 1,014 val) with a small ViT (6 blocks, width 96, 3 heads, patch 7: 16 tokens +
    # class token) trained to convergence: train top-1 passes 99.9% by epoch 24 and val top-1 is flat
    # (92-93%, no augmentation) from about epoch 19 of 30; about 90 s per dense run on 2 cores.
    # Parity is only meaningful at convergence: cutting presentations from a run that is still
    # learning costs accuracy by construction (see cpu-deit-tiny). Validated once, after the last epoch.
    # Later methods: ToMe's r = 2 takes the 16 patches to 4 over the 6 blocks; the curriculum starts at
    # 21 px (9 patches of 7 px, the full 28 px has 16), as EfficientTrain++ starts DeiT at 160 of 224.
    "cpu": Preset("mnist5k", SourceOptions(), CPU_TRAIN, epochs=30, rounds=5, seeds=5, later=True, merge_r=2,
                  curriculum_side=21),
    # Block-sparse attention's accuracy against the exact mode where tiles mean something: the cpu preset
    # at patch 4 (49 tokens + class token: four 16-token tiles; at attn_keep 0.3 each query tile keeps
    # its top two key tiles and the class token's; the cpu preset's 17 tokens make one or two tiles).
    # Dense converges as in the cpu preset (train top-1 99% by epoch 30, val flat at 89% from epoch 24),
    # about 3.5 minutes a run.
    "cpu-tiles": Preset("mnist5k", SourceOptions(), {**CPU_TRAIN, "patch_size": 4}, epochs=30, rounds=5, seeds=5,
                        arms={**BLOCK_ARMS}, later=True, merge_r=4, curriculum_side=20),  # ToMe: 49 patches to 25;
    # the curriculum: 25 patches of 4 px at 20 px, rising to 49
    # The earlier CPU preset, kept so its figures reproduce: a DeiT-Tiny-shaped ViT (12 blocks, width 192,
    # 3 heads) for 28x28 at patch 7, 8 epochs, about 2.5 minutes per dense run. It does NOT converge in
    # 8 epochs (train loss still falling steeply, val top-1 near 88% and rising); the sparse levels'
    # speed figures come from it. Patch 4 (49 tokens) trains 2.5x slower per image.
    "cpu-deit-tiny": Preset("mnist5k", SourceOptions(),
                            dict(embed_dim=192, num_heads=3, depth=12, patch_size=7, batch_size=32, loader_workers=2,
                                 lr=5e-4, warmup_epochs=1, keep_warmup_epochs=1, keep_ramp_epochs=1, eval_every=8),
                            epochs=8, rounds=4),
    # One CUDA card in <= 6 minutes for every arm: DeiT-Tiny at 224x224 / patch 16 (196 tokens + class
    # token) in bf16, on 20k synthetic 32x32 images stored small and upscaled on the GPU (the loader
    # decodes 32x32 PNGs, so it keeps up). Block-sparse attention arms next to the exact ones.
    "gpu": Preset("synthetic", SourceOptions(count=20_000, image_size=32),
                  dict(img_size=224, patch_size=16, batch_size=256, loader_workers=8, lr=2e-3, warmup_epochs=1,
                       device="cuda", keep_warmup_epochs=1, keep_ramp_epochs=2),
                  epochs=10, rounds=5, seeds=1, arms={**BLOCK_ARMS}),
}


def describe_machine(preset: Preset) -> str:
    """The card for CUDA presets (refused without one), else the CPU count."""
    if preset.train.get("device", "cpu").startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("this preset trains on CUDA and this machine has no CUDA device; use --preset cpu")
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPUs"


def run_folder_of(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{re.sub(r'[^A-Za-z0-9.]+', '-', name)}-seed{seed}"


def arm_plan(name: str, settings: dict, preset: Preset, dataset: str, out: Path, seed: int,
             compile_mode: str = "off") -> tuple[TrainConfig, CurationPlan | None]:
    """The training configuration of one arm and seed, and its curation plan if it runs rounds."""
    settings = {"compile": compile_mode, **settings}
    curated = settings.pop(CURATE, False)
    keep = settings.pop(KEEP, preset.keep)
    config = TrainConfig(**{**preset.train, **settings, "dataset": dataset, "out": str(run_folder_of(out, name, seed)),
                            "epochs": preset.epochs, "seed": seed})
    plan = CurationPlan(rounds=preset.rounds, round_epochs=preset.epochs // preset.rounds, keep=keep,
                        seed=seed) if curated else None
    return config, plan


def fingerprint(config: TrainConfig, plan: CurationPlan | None, preset: Preset) -> str:
    """What decides a run's result besides its seed: every training setting (defaults included, so a
    changed default is a new run), the curation plan and the data; not where the run is written."""
    decided = {name: value for name, value in config.to_dict().items() if name not in ("dataset", "out", "seed")}
    decided["curation"] = None if plan is None else {k: v for k, v in dataclasses.asdict(plan).items() if k != "seed"}
    decided["data"] = {"source": preset.source, "options": dataclasses.asdict(preset.source_options)}
    return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_arm(name: str, config: TrainConfig, plan: CurationPlan | None) -> dict:
    shutil.rmtree(config.out, ignore_errors=True)  # a run that a stop cut short starts again: its clock must be whole
    started = time.perf_counter()
    summary = curate(config.dataset, config, plan, progress=False) if plan else train(config)
    return {"arm": name, "seed": config.seed, "seconds": time.perf_counter() - started, "top1": summary["val_top1"],
            "images": summary["train_images"], "flops": summary["train_flops"],
            "images_per_second": summary["images_per_second"], "train_seconds": summary["train_seconds"]}


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided t-interval (NaN bounds with fewer than 2 pairs)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(
        len(differences))
    return mean, mean - half, mean + half


def verdict(low: float, margin: float) -> str:
    if math.isnan(low):
        return "n/a (1 seed)"
    return "parity" if low > -margin else "not shown"


def aggregate(runs: list[dict], margin: float = 0.5) -> list[dict]:
    """Per arm: median time and speed over seeds (robust to a disturbed run), mean work and top-1, and
    the paired top-1 difference to dense (same seed) with its 95% interval and verdict."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    # Fixed costs: all of an arm's wall clock that is not training epochs (start-up, data checks,
    # validation, scoring and selecting between rounds, writing the summary).
    runs = [{**r, "fixed_seconds": r["seconds"] - r.get("train_seconds", math.nan)} for r in runs]
    mean = {arm: {k: (statistics.median if k in TIMINGS else statistics.fmean)([r[k] for r in runs if r["arm"] == arm])
                  for k in ("seconds", "images", "flops", "images_per_second", "fixed_seconds")}
            for arm in arms}
    dense = mean["dense"]
    rows = []
    for arm in arms:
        top1 = [r["top1"] for r in runs if r["arm"] == arm]
        m = mean[arm]
        rows.append({
            "arm": arm, "seconds": m["seconds"], "relative_time": m["seconds"] / dense["seconds"],
            "images_per_second": m["images_per_second"], "relative_flops": m["flops"] / dense["flops"],
            "relative_flops_per_image": (m["flops"] / m["images"]) / (dense["flops"] / dense["images"]),
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "fixed_seconds": m["fixed_seconds"], "fixed_share_of_dense": m["fixed_seconds"] / dense["seconds"],
        })
    dense_top1 = {r["seed"]: r["top1"] for r in runs if r["arm"] == "dense"}
    for row in rows:
        row["delta_top1"] = row["top1_mean"] - rows[0]["top1_mean"]
        row["relative_images"] = mean[row["arm"]]["images"] / dense["images"]
        pairs = [r["top1"] - dense_top1[r["seed"]] for r in runs if r["arm"] == row["arm"] and r["seed"] in dense_top1]
        row["paired_delta"], row["paired_low"], row["paired_high"] = paired_interval(pairs)
        row["pairs"] = len(pairs)
        row["verdict"] = "baseline" if row["arm"] == "dense" else verdict(row["paired_low"], margin)
        # measured speed-up over the one the FLOPs predict: 1.0 when time falls exactly as work does
        row["speedup_vs_predicted"] = row["relative_flops"] / row["relative_time"]
    return rows


def block_vs_exact(runs: list[dict]) -> list[dict]:
    """Each block-mode arm's top-1 minus its exact-mode twin's (the same name without ``-block``), paired
    by seed: the accuracy block-sparse attention costs (or gains) against the paper's per-query top-k."""
    top1 = {(r["arm"], r["seed"]): r["top1"] for r in runs}
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    rows = []
    for arm in arms:
        twin = arm.removesuffix("-block")
        pairs = [top1[arm, seed] - top1[twin, seed] for name, seed in top1 if name == arm and (twin, seed) in top1]
        if twin != arm and pairs:
            mean, low, high = paired_interval(pairs)
            rows.append({"arm": arm, "exact_arm": twin, "pairs": len(pairs), "paired_delta": mean, "paired_low": low,
                         "paired_high": high})
    return rows


def markdown(rows: list[dict], title: str, margin: float = 0.5, block_rows: list[dict] | None = None) -> str:
    lines = [title, "", "Time and images/s: medians over seeds; top-1: mean +- std; paired delta: top-1 minus "
             f"dense's of the same seed, mean [95% t-interval]; parity: interval above -{margin} points.", "",
             "| arm | seeds | time (s) | time vs dense | fixed costs (s, share of dense) | images/s "
             "| presentations vs dense | FLOPs vs dense | FLOPs/image vs dense | speed-up / FLOPs-predicted "
             "| top-1 (%) | paired delta (points) | parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['pairs']} | {r['seconds']:.1f} | {r['relative_time']:.2f}x | "
              f"{r['fixed_seconds']:.1f} ({100 * r['fixed_share_of_dense']:.1f}%) | {r['images_per_second']:.0f} | "
              f"{r['relative_images']:.2f}x | {r['relative_flops']:.2f}x | {r['relative_flops_per_image']:.2f}x | "
              f"{r['speedup_vs_predicted']:.2f} | {r['top1_mean']:.2f} +- {r['top1_std']:.2f} | "
              f"{interval_text(r)} | {r['verdict']} |" for r in rows]
    if rows:
        lines += ["", f"Pareto front (no other arm both faster and higher in paired delta), fastest first: "
                  f"{', '.join(pareto_front(rows))}."]
    if block_rows:
        lines += ["", "Block-sparse attention against the exact mode (top-1 of the block arm minus its exact twin's, "
                  "same seed; mean [95% t-interval]):", "", "| block arm | exact arm | seeds | paired delta (points) |",
                  "|---|---|---|---|"]
        lines += [f"| {r['arm']} | {r['exact_arm']} | {r['pairs']} | {interval_text(r)} |" for r in block_rows]
    return "\n".join(lines) + "\n"


def interval_text(row: dict) -> str:
    if math.isnan(row["paired_low"]):
        return f"{row['paired_delta']:+.2f}"
    return f"{row['paired_delta']:+.2f} [{row['paired_low']:+.2f}, {row['paired_high']:+.2f}]"


def preset_named(preset_name: str, arms_file: str | None = None) -> Preset:
    preset = PRESETS[preset_name]
    if arms_file:
        with open(arms_file, encoding="utf-8") as handle:
            preset = Preset(**{**preset.__dict__, "arms": {**preset.arms, **(yaml.safe_load(handle) or {})}})
    if preset.epochs % preset.rounds:
        raise UsageError(f"preset {preset_name}: {preset.epochs} epochs do not split into {preset.rounds} rounds")
    return preset


def bench_train(preset_name: str, out: Path, seeds: int | None = None, arms_file: str | None = None,
                only: list[str] | None = None, compile_mode: str = "off", first_seed: int = 0) -> list[dict]:
    """Run the arms (all, or dense plus ``only``) over seeds ``first_seed`` ..; write and return the table rows.

    Runs that ``out/runs.json`` records as finished with the same settings are kept, not run again.
    ``compile_mode`` applies to every arm; compile time is inside each arm's wall clock.
    """
    preset = preset_named(preset_name, arms_file)
    arms = list(preset.arm_settings().items())
    if only:
        unknown = sorted(set(only) - {name for name, _ in arms})
        if unknown:
            raise UsageError(f"unknown arms {unknown}; known: {[name for name, _ in arms]}")
        arms = [(name, settings) for name, settings in arms if name == "dense" or name in only]  # dense: the baseline
    machine = describe_machine(preset)
    print(f"onion bench train --preset {preset_name}: on {machine}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    dataset = str(out / "data" / preset.source)
    ingest(open_source(preset.source, preset.source_options), dataset, IngestOptions(), ["onion", "bench"],
           progress=False)
    seeds = range(first_seed, first_seed + (seeds or preset.seeds))
    planned = []  # (arm, config, plan, fingerprint), the arm order rotating with the seed
    for seed in seeds:
        for name, settings in arms[seed % len(arms):] + arms[: seed % len(arms)]:
            config, plan = arm_plan(name, settings, preset, dataset, out, seed, compile_mode)
            planned.append((name, config, plan, fingerprint(config, plan, preset)))
    finished = {run_key(r): r for r in read_runs(out)}
    runs = []
    for name, config, plan, mark in planned:
        done = finished.get((name, config.seed, mark))
        if done is None:
            done = {**run_arm(name, config, plan), "settings": mark, "preset": preset_name, "machine": machine}
            what = f"{done['seconds']:.1f} s, val top-1 {done['top1']:.2f}%"
        else:
            what = f"kept from {out / RUNS_FILE} (finished earlier, same settings)"
        runs.append(done)
        this_table = {run_key(r) for r in runs}  # the rest stay recorded: runs of other arms, and ones not reached yet
        write_runs(out, runs + [r for key, r in finished.items() if key not in this_table])
        print(f"  seed {config.seed} {name}: {what} ({len(runs)} of {len(planned)} runs)", file=sys.stderr, flush=True)
    title = (f"onion bench train --preset {preset_name}: {preset.source}, {preset.epochs} epochs, "
             f"{len(seeds)} seed(s), {machine}, compile {compile_mode}")
    return write_results(out, preset_name, sorted(runs, key=lambda r: [a for a, _ in arms].index(r["arm"])), title,
                         preset.parity_margin)


RUNS_FILE = "runs.json"


def run_key(run: dict) -> tuple[str, int, str | None]:
    return run["arm"], run["seed"], run.get("settings")


def read_runs(folder: Path) -> list[dict]:
    """The finished runs a bench folder records (none if it has no ``runs.json``)."""
    path = folder / RUNS_FILE
    if not path.exists():
        return []
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: not a bench's run record ({error})") from error
    if not isinstance(runs, list) or not all(isinstance(r, dict) and {"arm", "seed", "top1"} <= set(r) for r in runs):
        raise UsageError(f"{path}: not a bench's run record (a list of runs with arm, seed and top1)")
    return runs


def write_runs(out: Path, runs: list[dict]) -> None:
    """``runs.json``, replaced whole (written aside, then renamed): a stop never leaves half a record."""
    temporary = out / f".{RUNS_FILE}.partial"
    temporary.write_text(json.dumps(runs, indent=2))
    os.replace(temporary, out / RUNS_FILE)


def bench_merge(preset_name: str, folders: list[Path], out: Path, arms_file: str | None = None) -> list[dict]:
    """One table from bench folders that each ran some seeds of ``preset_name`` (dense in each).

    Each arm is paired with dense of the same seed from the same folder; an arm must have run with
    the same settings everywhere, and a seed of an arm may come from one folder only.
    """
    preset = preset_named(preset_name, arms_file)
    order = list(preset.arm_settings())
    runs, source, settings, machines = [], {}, {}, set()
    for folder in folders:
        mine = [r for r in read_runs(folder) if r.get("preset") == preset_name]
        if not mine:
            raise UsageError(f"{folder}: no finished run of preset {preset_name} in its {RUNS_FILE}")
        dense_seeds = {r["seed"] for r in mine if r["arm"] == "dense"}
        for run in mine:
            arm, seed = run["arm"], run["seed"]
            if seed not in dense_seeds:
                raise UsageError(f"{folder}: seed {seed} of {arm} has no dense run of the same seed there to pair with")
            if (arm, seed) in source:
                raise UsageError(f"seed {seed} of {arm} is in both {source[arm, seed]} and {folder}; run each piece "
                                 f"with its own seeds (--first-seed)")
            if settings.setdefault(arm, (run["settings"], folder))[0] != run["settings"]:
                raise UsageError(f"{arm} ran with other settings in {settings[arm][1]} than in {folder}")
            source[arm, seed] = folder
            machines.add(run.get("machine", "unknown machine"))
            runs.append(run)
    unknown = sorted({r["arm"] for r in runs} - set(order))
    if unknown:
        raise UsageError(f"arms {unknown} are not arms of preset {preset_name} (extra arms: --arms with the same YAML)")
    runs.sort(key=lambda r: (order.index(r["arm"]), r["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    write_runs(out, runs)
    seeds = len({r["seed"] for r in runs if r["arm"] == "dense"})
    title = (f"onion bench train --preset {preset_name}: {preset.source}, {preset.epochs} epochs, {seeds} seed(s) "
             f"merged from {len(folders)} folder(s), {', '.join(sorted(machines))}")
    return write_results(out, preset_name, runs, title, preset.parity_margin)


def write_results(out: Path, preset_name: str, runs: list[dict], title: str, margin: float = 0.5) -> list[dict]:
    """results.json, results.md and results.png from the runs (``runs.json`` holds them too)."""
    rows, block_rows = aggregate(runs, margin), block_vs_exact(runs)

    def plain(table: list[dict]) -> dict:
        return {r["arm"]: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
                for r in table}

    (out / "results.json").write_text(json.dumps({"preset": preset_name, "parity_margin": margin,
                                                  "arms": plain(rows), "block_vs_exact": plain(block_rows)}, indent=2))
    (out / "results.md").write_text(markdown(rows, title, margin, block_rows))
    plot(rows, out / "results.png", title, margin)
    return rows
