"""Trainer figures for docs/benchmarks.md: sparse vs dense step speed, attention-level cost, dynamics cost.

    .venv/bin/python benchmarks/training.py [--out benchmarks/results] [--repeats 5] [--compile]

All arms run interleaved in one process on the same random batches; each figure is a median of
``--repeats`` timings of ``--steps`` training steps (forward, backward, AdamW step), after two
warm-up steps (which, with ``--compile``, include compiling: reported separately, not in the median).
  1. DeiT-Tiny shape (12 blocks, width 192, 3 heads) at 32x32 with 4x4 patches: dense, token
     keep 0.7 at blocks 3,6,9, token + attention keep 0.3 (exact mode), and the same in block mode
     (token+attention-block: FlexAttention on CUDA); measured vs FLOPs-predicted speed-up
     (the FLOPs model counts the token level only);
  2. the attention level's cost on top of the token level at longer sequences (larger images),
     exact and block mode (on CUDA also at 24 x 24 patches, 577 tokens: 384 px at patch 16);
  3. a pruning block's attention when the whole map is needed: fused kernel + ranking pass vs
     explicit attention reusing its probabilities (what the sparse ViT runs on CPU);
  4. the cost of recording training dynamics.
On CPU, where FlexAttention has no backward, block mode gathers each query tile's kept key tiles
where that computes at most half the scores (long sequences), else runs the tiles as a dense mask
(the cost of choosing tiles, no saving). ``--attn-block`` sets the tile side (default: the model's,
chosen from each pruning block's token count, ``sparse_vit.tile_side``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from report_files import write_report
from shards import location
from trainer import sparsify
from trainer.dynamics import DynamicsRecorder
from trainer.flops import ViTShape, forward_flops
from trainer.loop import FUSED_ADAMW_DEVICES
from trainer.sparse_vit import (
    MAX_AUTO_TILES,
    additive,
    block_keep_tiles,
    expand_tiles,
    gather_width,
    gathered_tiles,
    gathering_pays,
    kept_count,
    tile_side,
)

BLOCKS = (3, 6, 9)
DEVICE = torch.device("cpu")
COMPILE = False
ATTN_BLOCK: int | None = None  # block mode's tile side; None: the model's default (tile_side)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def autocast():  # noqa: ANN201 - bf16 on GPUs, as the trainer's "auto" does
    return (torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE.type == "cuda"
            else torch.autocast("cpu", enabled=False))


PATCH = 4


def deit_tiny(img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=PATCH,
                             num_classes=10)


class Arm:
    """One configuration: a sparse view of its own model, an optimiser, optional dynamics recording."""

    def __init__(self, img_size: int, token_keep: float, attn_keep: float,
                 recorder: DynamicsRecorder | None = None, attn_mode: str = "exact",
                 attn_block: int | None = None) -> None:
        self.model = sparsify(deit_tiny(img_size).to(DEVICE), token_keep=token_keep, token_blocks=BLOCKS,
                              attn_keep=attn_keep, attn_mode=attn_mode, attn_block=attn_block or ATTN_BLOCK).train()
        self.model.record_cls_attention = recorder is not None
        # Static shapes: one graph per arm (compiled during the warm-up steps, outside the median).
        self.forward = torch.compile(self.model, dynamic=False) if COMPILE else self.model
        self.warmup_seconds = 0.0
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4,
                                           fused=DEVICE.type in FUSED_ADAMW_DEVICES)  # as the trainer
        self.recorder = recorder
        self.flops = forward_flops(ViTShape.of(self.model), token_keep, set(BLOCKS))

    def step(self, x: torch.Tensor, y: torch.Tensor, keys: list[str], step: int) -> None:
        with autocast():
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.recorder is not None:
            self.recorder.record(keys, 0, step, logits, y, self.model.last_cls_attention_variance)

    def seconds(self, x: torch.Tensor, y: torch.Tensor, keys: list[str], steps: int) -> float:
        synchronize()
        start = time.perf_counter()
        for step in range(steps):
            self.step(x, y, keys, step)
        if self.recorder is not None:
            self.recorder.flush(steps)
        synchronize()
        return (time.perf_counter() - start) / steps


def race(arms: dict[str, Arm], img_size: int, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each arm, interleaved so machine drift favours none."""
    x = torch.randn(batch, 3, img_size, img_size, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    keys = [f"k{i}" for i in range(batch)]
    for arm in arms.values():
        arm.warmup_seconds = 2 * arm.seconds(x, y, keys, 2)  # warm-up (and compilation)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, arm in arms.items():
            times[name].append(arm.seconds(x, y, keys, steps))
    return {name: statistics.median(values) for name, values in times.items()}


def pruning_block_attention(img_size: int, batch: int, repeats: int, calls: int = 5) -> dict[str, float]:
    """Seconds for the forward and backward of one pruning block's attention when the whole map is
    needed (the attention level): the fused kernel plus a separate ranking pass over the scores, vs
    explicit attention whose probabilities also rank (what the sparse ViT runs on CPU)."""
    model = Arm(img_size, 0.7, 0.3).model
    attn = model.blocks[0].attn
    tokens = (img_size // PATCH) ** 2 + 1
    q, k, v = (torch.randn(batch, attn.num_heads, tokens, attn.head_dim, device=DEVICE, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def fused() -> None:
        out = F.scaled_dot_product_attention(q, k, v)
        model._ranking(q, k, attn.scale, full_map=True)
        out.backward(grad)

    def explicit() -> None:
        model._attend_and_rank(q, k, v, attn.scale, 0.0, True)[0].backward(grad)

    return median_seconds({"fused + ranking pass": fused, "explicit": explicit}, repeats, calls)


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each run, interleaved round by round; the first round warms up."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):
        for name, run in runs.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                run()
            synchronize()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def following_block_attention(img_size: int, batch: int, repeats: int, calls: int = 5) -> dict[str, float]:
    """Seconds for the forward and backward of block mode's attention in a block after the first
    pruning block (token keep 0.7, attention keep 0.3, a random map): the tiles as a dense mask
    through the fused kernel vs the kept tiles gathered (TileGather; the model gathers on CPU where
    ``gathering_pays``)."""
    model = Arm(img_size, 0.7, 0.3, attn_mode="block").model
    attn = model.blocks[0].attn
    tokens = kept_count(0.7, (img_size // PATCH) ** 2) + 1
    generator = torch.Generator().manual_seed(0)
    side = ATTN_BLOCK or tile_side(tokens)
    tiles = block_keep_tiles(torch.rand(batch, tokens, tokens, generator=generator).to(DEVICE), 0.3, side, 1, False)
    count = tiles.shape[-1]
    width = gather_width(count, 1, 0.3, False)
    if width == count:
        return {}
    gather = gathered_tiles(tiles, side, tokens, 1, width)
    mask = additive(expand_tiles(tiles, side, tokens))
    q, k, v = (torch.randn(batch, attn.num_heads, tokens, attn.head_dim, device=DEVICE, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    runs = {"dense masked": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad),
            "gathered": lambda: gather.attend(q, k, v, attn.scale).backward(grad)}
    return {"tokens_after_pruning": tokens, "tile": side, "share_computed": width / count,
            "model_gathers": gathering_pays(width, side, tokens), **median_seconds(runs, repeats, calls)}


def main() -> None:
    global DEVICE, PATCH, COMPILE, ATTN_BLOCK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="training", help="file stem of the written results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (then bf16 autocast)")
    parser.add_argument("--img-size", type=int, default=32, help="image side of the main table")
    parser.add_argument("--patch", type=int, default=4, help="patch side of every model")
    parser.add_argument("--attn-block", type=int, default=None,
                        help="block mode's tile side in tokens (default: per pruning block, sparse_vit.tile_side)")
    parser.add_argument("--skip-extras", action="store_true", help="only the main table")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each arm's model (static shapes); compile time reported apart")
    args = parser.parse_args()
    DEVICE, PATCH, COMPILE, ATTN_BLOCK = torch.device(args.device), args.patch, args.compile, args.attn_block
    if COMPILE:  # every arm's model is one more graph of the same forward code: no eager fallback
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 256)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report: dict = {"device": where, "repeats": args.repeats, "steps": args.steps, "batch": args.batch,
                    "compile": COMPILE, "attn_block": ATTN_BLOCK}

    size = args.img_size
    report["tokens"] = (size // PATCH) ** 2 + 1
    report["img_size"] = size
    arms = {"dense": Arm(size, 1.0, 1.0), "token 0.7": Arm(size, 0.7, 1.0),
            "token 0.7 + attention 0.3": Arm(size, 0.7, 0.3),
            "token+attention-block": Arm(size, 0.7, 0.3, attn_mode="block")}
    seconds = race(arms, size, args.batch, args.steps, args.repeats)
    dense = arms["dense"]
    report["speed"] = [{"arm": name, "seconds_per_step": seconds[name],
                        "measured_speedup": seconds["dense"] / seconds[name],
                        "flops_speedup": dense.flops / arm.flops,
                        "measured_over_predicted": (seconds["dense"] / seconds[name]) / (dense.flops / arm.flops),
                        "warmup_seconds": arm.warmup_seconds}
                       for name, arm in arms.items()]

    report["attention_level"] = []
    report["dynamics_overhead"] = None
    if args.skip_extras:
        return write_report(Path(args.out), args.name, report, render)
    lengths = [(32, args.batch), (64, max(1, args.batch // 4)), (96, max(1, args.batch // 8)),
               (128, max(1, args.batch // 16))]
    if DEVICE.type == "cuda" and 24 * PATCH not in dict(lengths):  # 577 tokens (384 px at patch 16)
        lengths = sorted(lengths + [(24 * PATCH, max(1, args.batch // 8))])
    for img_size, batch in lengths:
        arms = {"token": Arm(img_size, 0.7, 1.0), "token+attention": Arm(img_size, 0.7, 0.3),
                "token+attention-block": Arm(img_size, 0.7, 0.3, attn_mode="block")}
        if ATTN_BLOCK is None and tile_side(kept_count(0.7, (img_size // PATCH) ** 2) + 1) != 16:
            # where the default tiles are not 16 tokens, 16-token tiles side by side in the same race
            arms["block-16"] = Arm(img_size, 0.7, 0.3, attn_mode="block", attn_block=16)
        timing = race(arms, img_size, batch, args.steps, args.repeats)
        report["attention_level"].append({"tokens": (img_size // PATCH) ** 2 + 1, "batch": batch,
                                          "relative_time": timing["token+attention"] / timing["token"],
                                          "block_relative_time": timing["token+attention-block"] / timing["token"],
                                          **({"block16_relative_time": timing["block-16"] / timing["token"]}
                                             if "block-16" in timing else {})})

    if DEVICE.type == "cpu":
        report["tile_gather"] = [{"tokens": (img_size // PATCH) ** 2 + 1, "batch": batch,
                                  **following_block_attention(img_size, batch, args.repeats)}
                                 for img_size, batch in lengths]
    report["map_reuse"] = [{"tokens": (img_size // PATCH) ** 2 + 1, "batch": batch,
                            **pruning_block_attention(img_size, batch, args.repeats)} for img_size, batch in lengths]

    with tempfile.TemporaryDirectory() as scratch:
        pair = {"without dynamics": Arm(32, 0.7, 1.0),
                "with dynamics": Arm(32, 0.7, 1.0, DynamicsRecorder(location(scratch), 0))}
        timing = race(pair, 32, args.batch, args.steps, args.repeats)
    report["dynamics_overhead"] = timing["with dynamics"] / timing["without dynamics"] - 1.0
    write_report(Path(args.out), args.name, report, render)


def tiles_named(attn_block: int | None) -> str:
    if attn_block:
        return f"{attn_block}-token tiles"
    most = MAX_AUTO_TILES
    return f"tile side per pruning block, 16 up to {16 * most} tokens, 32 up to {32 * most}"


def render(report: dict) -> str:
    compiled = report.get("compile", False)
    lines = [f"Training steps, DeiT-Tiny shape at {report['img_size']}x{report['img_size']} / patch {PATCH} "
             f"({report['tokens']} tokens), batch {report['batch']}, "
             f"{report['device']}{', torch.compile' if compiled else ''}, "
             f"median of {report['repeats']} x {report['steps']} steps "
             f"(block mode: {tiles_named(report.get('attn_block', 16))}; FLOPs model: token level only):", "",
             "| arm | s/step | measured speed-up | FLOPs-predicted | measured / predicted |"
             + (" compile + 2 warm-up steps (s) |" if compiled else ""),
             "|---|---|---|---|---|" + ("---|" if compiled else "")]
    lines += [f"| {r['arm']} | {r['seconds_per_step']:.3f} | {r['measured_speedup']:.2f}x | "
              f"{r['flops_speedup']:.2f}x | {r['measured_over_predicted']:.2f} |"
              + (f" {r['warmup_seconds']:.1f} |" if compiled else "") for r in report["speed"]]
    if not report["attention_level"]:
        return "\n".join(lines + [""])
    by_length = report.get("attn_block") is None
    lines += ["", "Attention level (keep 0.3) on top of token level (keep 0.7), time relative to token level alone, "
              "exact mode and block mode" + (" (and block mode with 16-token tiles where the default differs)"
                                             if by_length else "") + ":", "",
              "| tokens | batch | exact | block |" + (" block, 16-token tiles |" if by_length else ""),
              "|---|---|---|---|" + ("---|" if by_length else "")]
    def cell(row: dict, key: str) -> str:
        return f" {row[key]:.3f} |" if key in row else " - |"

    lines += [f"| {r['tokens']} | {r['batch']} | {r['relative_time']:.3f} |" + cell(r, "block_relative_time")
              + (cell(r, "block16_relative_time") if by_length else "") for r in report["attention_level"]]
    if report.get("map_reuse"):
        lines += ["", "A pruning block's attention when the attention level needs the whole map, forward + backward "
                  "(ms): the fused kernel plus a ranking pass over the scores, vs explicit attention whose "
                  "probabilities rank (what the sparse ViT runs on CPU):", "",
                  "| tokens | batch | fused + ranking pass | explicit | explicit / fused |", "|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['batch']} | {1e3 * r['fused + ranking pass']:.2f} | {1e3 * r['explicit']:.2f} "
                  f"| {r['explicit'] / r['fused + ranking pass']:.2f} |" for r in report["map_reuse"]]
    gathered = [r for r in report.get("tile_gather", []) if "gathered" in r]
    if gathered:
        lines += ["", "Block mode's attention in a block after a pruning block on CPU, forward + backward (ms): the "
                  "kept tiles as a dense mask through the fused kernel vs gathered (TileGather; the last column: "
                  "which one the sparse ViT runs on CPU):", "",
                  "| tokens | tokens after pruning | batch | tile | share of key tiles computed | dense masked "
                  "| gathered | gathered / dense masked | model runs |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['tokens_after_pruning']} | {r['batch']} | "
                  f"{r.get('tile', report.get('attn_block'))} | {r['share_computed']:.2f} | "
                  f"{1e3 * r['dense masked']:.2f} | {1e3 * r['gathered']:.2f} | "
                  f"{r['gathered'] / r['dense masked']:.2f} | {'gathered' if r['model_gathers'] else 'dense masked'} |"
                  for r in gathered]
    lines += ["", f"Dynamics recording overhead: {100 * report['dynamics_overhead']:+.1f}% of step time", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
