"""Where a training epoch's time goes, dense vs sparse: a torch.profiler summary per arm.

    .venv/bin/python benchmarks/profile_step.py DATASET [--out benchmarks/results] [--name profile]
        [--arms dense,token,token+attention-block] [any `onion train` setting, e.g. --img-size 224 --patch-size 16]

Each arm is a real ``Trainer`` on DATASET: one epoch to warm up (allocator, kernels, compiled
graphs), then one profiled epoch. Reported per arm: wall seconds per step, host (CPU) op time and
device kernel time per step, host-device synchronisations per step (CUDA runtime sync calls; on CPU,
the reads of tensor values made by onion's code, which would each be one on a GPU), and the top
ops by self time (full tables in NAME-<arm>.txt).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.cli.train import add_train_options
from report_files import write_report
from trainer.config import TrainConfig
from trainer.host_reads import HostReads
from trainer.loop import Trainer

ARMS = {"dense": {}, "token": {"token_keep": 0.7}, "token+attention": {"token_keep": 0.7, "attn_keep": 0.3},
        "token+attention-block": {"token_keep": 0.7, "attn_keep": 0.3, "attn_mode": "block"}}
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
TOP = 12


def profile_arm(config: TrainConfig, name: str, out: Path, report_name: str) -> dict:
    trainer = Trainer(config)
    cuda = trainer.device.type == "cuda"
    trainer._train_epoch()  # warm-up epoch: allocator, kernel selection, compiled graphs
    trainer.position = replace(trainer.position, epoch=trainer.position.epoch + 1, batch=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    reads = HostReads()
    with profile(activities=activities) as prof, reads:
        started = time.perf_counter()
        trainer._train_epoch()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    steps = trainer.steps_per_epoch
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    (out / f"{report_name}-{name}.txt").write_text(events.table(sort_by=sort, row_limit=40))
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events) if cuda else 0
    host_us = sum(e.self_cpu_time_total for e in events)
    syncs = sum(e.count for e in events if e.key in SYNC_CALLS) if cuda else len(reads.reads)
    ranked = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total,
                    reverse=True)
    return {"arm": name, "steps": steps, "seconds_per_step": wall / steps,
            "host_op_seconds_per_step": host_us / 1e6 / steps,
            "device_seconds_per_step": device_us / 1e6 / steps, "syncs_per_step": syncs / steps,
            "sync_kind": "CUDA runtime sync calls" if cuda else "host reads of tensor values in onion code",
            "top_ops": [{"op": e.key, "self_ms_per_step": (getattr(e, "self_device_time_total", 0) if cuda
                                                          else e.self_cpu_time_total) / 1e3 / steps,
                         "calls_per_step": e.count / steps} for e in ranked[:TOP]]}


def render(report: dict) -> str:
    lines = [f"Profiled epoch per arm on {report['device']} ({report['steps']} steps, batch {report['batch']}, "
             f"compile {report['compile']}); syncs: {report['arms'][0]['sync_kind']}", "",
             "| arm | s/step | host op s/step | device s/step | syncs/step | top op (self ms/step) |",
             "|---|---|---|---|---|---|"]
    for arm in report["arms"]:
        top = arm["top_ops"][0] if arm["top_ops"] else {"op": "-", "self_ms_per_step": 0.0}
        lines.append(f"| {arm['arm']} | {arm['seconds_per_step']:.4f} | {arm['host_op_seconds_per_step']:.4f} | "
                     f"{arm['device_seconds_per_step']:.4f} | {arm['syncs_per_step']:.2f} | "
                     f"{top['op']} ({top['self_ms_per_step']:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="profile")
    parser.add_argument("--arms", default="dense,token,token+attention-block",
                        help=f"comma-separated, from {', '.join(ARMS)}")
    add_train_options(parser, skip=("out", "epochs", "token_keep", "attn_keep", "attn_mode"))
    args = parser.parse_args()
    settings = {name: value for name, value in vars(args).items()
                if name in TrainConfig.help_of() and value is not None and name != "dataset"}
    report: dict = {"arms": []}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.arms.split(","):
            config = TrainConfig(**{**settings, **ARMS[name], "dataset": args.dataset, "epochs": 2,
                                    "out": f"{scratch}/{name}"})
            arm = profile_arm(config, name, args.out, args.name)
            report["arms"].append(arm)
            report.update(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() and config.device != "cpu"
                          else "CPU", steps=arm["steps"], batch=config.batch_size, compile=config.compile)
    write_report(args.out, args.name, report, render)


if __name__ == "__main__":
    main()
