"""``onion bench train``: every level of the method alone and together, side by side, in one run.

Arms: ``dense`` (all examples, no sparsity), ``example`` (curation rounds only), ``token``,
``attention``, ``token+attention`` and ``tri-level`` (all three), plus any from a YAML file. All use
the same data, epochs, seeds and hyper-parameters; the arm order rotates with the seed so machine
drift favours none. Time is each arm's whole wall clock (curation's scoring and survivor shards
included); FLOPs are counted from the token counts the steps really ran with.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.curate import CurationPlan, curate
from pipeline.ingest import IngestOptions, ingest
from pipeline.sources import SourceOptions, open_source
from trainer.config import TrainConfig
from trainer.launch import train

CURATE = "curate"  # arm setting: run the example level (curation rounds)


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

    def arm_settings(self) -> dict[str, dict]:
        sparse = {"token_keep": self.token_keep}
        attention = {"attn_keep": self.attn_keep}
        return {"dense": {}, "example": {CURATE: True}, "token": sparse, "attention": attention,
                "token+attention": {**sparse, **attention}, "tri-level": {CURATE: True, **sparse, **attention},
                **self.arms}


PRESETS = {
    # Correctness only (CI): every arm end to end in well under 3 minutes on 2 CPU cores. Pruning at
    # block 1 of 4: the class token's output feels dropped tokens and masked keys only through the
    # blocks after the one whose mask it is, so pruning late in a shallow model would change nothing.
    "smoke": Preset("digits", SourceOptions(), dict(depth=4, embed_dim=64, num_heads=2, img_size=16, patch_size=4, batch_size=64,
                                                    workers=1, lr=2e-3, warmup_epochs=0.3, token_blocks=[1]),
                    epochs=4, rounds=2, token_keep=0.5, attn_keep=0.5, seeds=1),
    # MNIST 5k with a DeiT-Tiny-shaped ViT for 28x28 (patch 4: 49 tokens + class token). Not yet
    # converged: 6 epochs (~5 min for the dense arm on 2 cores, ~28 min for 6 arms x 1 seed) reach
    # about 63% top-1; converging within 45 minutes for 3 seeds needs a smaller model or fewer epochs'
    # worth of data per arm. Tuning it is open work.
    "cpu": Preset("mnist5k", SourceOptions(), dict(embed_dim=192, num_heads=3, depth=12, patch_size=4, batch_size=32,
                                                   workers=2, lr=1e-3, warmup_epochs=1, keep_warmup_epochs=1,
                                                   keep_ramp_epochs=2),
                  epochs=6, rounds=3),
    # A CUDA machine: DeiT-Tiny at 64x64 (patch 8) on 50k synthetic images.
    "gpu": Preset("synthetic", SourceOptions(count=50_000, image_size=64), dict(patch_size=8, batch_size=256, workers=8,
                                                                                lr=2e-3, warmup_epochs=2, device="cuda",
                                                                                keep_warmup_epochs=2, keep_ramp_epochs=4),
                  epochs=30, rounds=5),
}


def run_arm(name: str, settings: dict, preset: Preset, dataset: str, out: Path, seed: int) -> dict:
    settings = dict(settings)
    curated = settings.pop(CURATE, False)
    run = out / "runs" / f"{name.replace('+', '-')}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    config = TrainConfig(**{**preset.train, **settings, "dataset": dataset, "out": str(run), "epochs": preset.epochs,
                            "seed": seed})
    started = time.perf_counter()
    if curated:
        plan = CurationPlan(rounds=preset.rounds, round_epochs=preset.epochs // preset.rounds, keep=preset.keep, seed=seed)
        summary = curate(dataset, config, plan, progress=False)
    else:
        summary = train(config)
    return {"arm": name, "seed": seed, "seconds": time.perf_counter() - started, "top1": summary["val_top1"],
            "images": summary["train_images"], "flops": summary["train_flops"],
            "images_per_second": summary["images_per_second"]}


def aggregate(runs: list[dict]) -> list[dict]:
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    mean = {arm: {k: statistics.fmean(r[k] for r in runs if r["arm"] == arm) for k in ("seconds", "images", "flops", "images_per_second")}
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
        })
    for row in rows:
        row["delta_top1"] = row["top1_mean"] - rows[0]["top1_mean"]
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| arm | time (s) | time vs dense | images/s | FLOPs vs dense | FLOPs/image vs dense | top-1 (%) | delta |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['seconds']:.1f} | {r['relative_time']:.2f}x | {r['images_per_second']:.0f} | "
              f"{r['relative_flops']:.2f}x | {r['relative_flops_per_image']:.2f}x | {r['top1_mean']:.2f} +- {r['top1_std']:.2f} | "
              f"{r['delta_top1']:+.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for row in rows:
        axes.errorbar(row["relative_time"], row["top1_mean"], yerr=row["top1_std"], fmt="o", capsize=3)
        axes.annotate(row["arm"], (row["relative_time"], row["top1_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.axvline(1.0, color="grey", lw=0.8, ls="--")
    axes.set_xlabel("training time relative to dense")
    axes.set_ylabel("top-1 (%)")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def bench_train(preset_name: str, out: Path, seeds: int | None = None, arms_file: str | None = None) -> list[dict]:
    preset = PRESETS[preset_name]
    if arms_file:
        with open(arms_file, encoding="utf-8") as handle:
            preset = Preset(**{**preset.__dict__, "arms": yaml.safe_load(handle) or {}})
    if preset.epochs % preset.rounds:
        raise ValueError(f"preset {preset_name}: {preset.epochs} epochs do not split into {preset.rounds} rounds")
    out.mkdir(parents=True, exist_ok=True)
    dataset = str(out / "data" / preset.source)
    ingest(open_source(preset.source, preset.source_options), dataset, IngestOptions(), ["onion", "bench"], progress=False)
    arms = list(preset.arm_settings().items())
    runs = []
    for seed in range(seeds or preset.seeds):
        for name, settings in arms[seed % len(arms):] + arms[: seed % len(arms)]:
            runs.append(run_arm(name, settings, preset, dataset, out, seed))
            (out / "runs.json").write_text(json.dumps(runs, indent=2))
    rows = aggregate(sorted(runs, key=lambda r: [a for a, _ in arms].index(r["arm"])))
    title = f"onion bench train --preset {preset_name}: {preset.source}, {preset.epochs} epochs, {seeds or preset.seeds} seed(s)"
    (out / "results.json").write_text(json.dumps({"preset": preset_name, "arms": {r["arm"]: r for r in rows}}, indent=2))
    (out / "results.md").write_text(markdown(rows, title))
    plot(rows, out / "results.png", title)
    return rows
