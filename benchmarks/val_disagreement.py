"""Where the width of a bench's paired interval comes from, for docs/benchmarks.md:

    .venv/bin/python benchmarks/val_disagreement.py benchmarks/results/bench-cpu-parity example-dynamic ...

For each seed, the final checkpoints of dense and of the arm are evaluated on the val split and
compared image by image: b = images only dense gets right, c = images only the arm gets right
(McNemar's counts). The paired difference is (c - b) / N, so the finite val set alone gives one
pair a standard deviation of about sqrt(b + c) / N; set against the observed spread of the paired
differences over seeds, it says whether more seeds (or more val images) or better training would
narrow the interval. Writes ``disagreements.json`` next to the bench's results.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from shards import location
from trainer.config import TrainConfig
from trainer.inputs import prepare
from trainer.loop import Trainer
from trainer.run_folder import SUMMARY, run_config


def correct_by_key(run: Path) -> dict[str, bool]:
    """Each val image's correctness under the run's last checkpoint, at the keep rates it ended with."""
    config = TrainConfig.from_dict({**run_config(location(str(run))), "loader_workers": 0})
    trainer = Trainer(config)
    if not trainer.resume():
        raise SystemExit(f"{run}: no checkpoint")
    step = trainer.position.step
    trainer.model.set_rates(trainer.token_schedule(step), trainer.attn_schedule(step))
    trainer.model.eval()
    correct: dict[str, bool] = {}
    with torch.no_grad():
        for images, labels, keys in trainer.val_data:
            predicted = trainer.model(prepare(images, trainer.img_size, trainer.device)).argmax(1)
            correct.update(zip(keys, (predicted == labels).tolist()))
    recorded = json.loads((run / SUMMARY).read_text())["val_top1"]
    if abs(100 * sum(correct.values()) / len(correct) - recorded) > 1e-6:  # the same model as the bench's
        raise SystemExit(f"{run}: re-evaluated top-1 differs from the recorded {recorded}")
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="an onion bench train --out folder (runs/ kept)")
    parser.add_argument("arms", nargs="+", help="arms to compare with dense")
    args = parser.parse_args()
    seeds = sorted({int(p.name.rsplit("seed", 1)[1]) for p in (args.bench / "runs").glob("dense-seed*")})
    results = {}
    for arm in args.arms:
        pairs = []
        for seed in seeds:
            dense = correct_by_key(args.bench / "runs" / f"dense-seed{seed}")
            other = correct_by_key(args.bench / "runs" / f"{arm}-seed{seed}")
            only_dense = sum(dense[k] and not other[k] for k in dense)
            only_arm = sum(other[k] and not dense[k] for k in dense)
            pairs.append({"seed": seed, "only_dense": only_dense, "only_arm": only_arm, "n": len(dense),
                          "delta": 100 * (only_arm - only_dense) / len(dense)})
        results[arm] = {
            "paired_sd": statistics.stdev(p["delta"] for p in pairs),
            "val_sampling_sd": statistics.fmean(100 * math.sqrt(p["only_dense"] + p["only_arm"]) / p["n"]
                                                for p in pairs),
            "mean_disagreements": statistics.fmean(p["only_dense"] + p["only_arm"] for p in pairs),
            "pairs": pairs,
        }
        summary = {k: round(v, 2) for k, v in results[arm].items() if k != "pairs"}
        print(f"{arm}: {summary}", flush=True)
    (args.bench / "disagreements.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
