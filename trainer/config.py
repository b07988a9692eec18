"""Training configuration: one dataclass, filled from defaults, a YAML file, then the command line.

Every field carries its help text, so ``onion train --help`` explains every knob.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from trainer.errors import RunError


def knob(default: object, help: str) -> object:  # noqa: A002 - argparse's word
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    dataset: str = knob("", "onion dataset to train on (path or URL); its train and val splits are used")
    out: str = knob("", "run directory: checkpoints, dynamics/, metrics.csv, tensorboard/, summary.json")
    model: str = knob("deit_tiny_patch16_224", "any timm VisionTransformer name")
    img_size: int | None = knob(None, "input side in pixels (default: the dataset's image size)")
    patch_size: int | None = knob(None, "patch side (default: 4 for images of 16+ pixels, else 2)")
    depth: int | None = knob(None, "number of blocks (default: the model's)")
    embed_dim: int | None = knob(None, "token width (default: the model's)")
    num_heads: int | None = knob(None, "attention heads (default: the model's)")
    drop_path: float = knob(0.0, "stochastic depth rate")
    token_keep: float = knob(1.0, "share of patch tokens kept at each pruning block (1.0: token level off)")
    token_blocks: list[int] | None = knob(None, "0-based pruning blocks, e.g. 3,6,9 (default: 3,6,9 of 12, scaled to the depth)")
    attn_keep: float = knob(1.0, "share of keys each query keeps from a pruning block on (1.0: attention level off)")
    fuse_token: bool = knob(False, "fuse the dropped tokens into one attention-weighted token (EViT)")
    keep_warmup_epochs: float = knob(0.0, "epochs at keep rate 1.0 before the keep rates start falling")
    keep_ramp_epochs: float = knob(0.0, "epochs over which keep rates fall (cosine) from 1.0 to their targets")
    keep_quantum: float = knob(0.05, "keep rates are rounded up to multiples of this (few distinct token counts)")
    epochs: int = knob(10, "training epochs")
    batch_size: int = knob(128, "batch size per process")
    lr: float = knob(1e-3, "peak learning rate (AdamW)")
    min_lr: float = knob(1e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = knob(0.05, "AdamW weight decay (not on norms, biases, pos_embed, cls_token)")
    warmup_epochs: float = knob(1.0, "linear learning-rate warm-up, in epochs")
    label_smoothing: float = knob(0.1, "label smoothing of the training loss")
    clip_grad: float = knob(1.0, "gradient norm clipping (0: off)")
    mixup: float = knob(0.0, "timm Mixup alpha (0: off)")
    cutmix: float = knob(0.0, "timm CutMix alpha (0: off)")
    seed: int = knob(0, "seed of weights, data order, dropout and mixup")
    workers: int = knob(2, "DataLoader worker processes per training process")
    checkpoint_every: int = knob(0, "also checkpoint every N steps (0: at epoch ends only)")
    amp: str = knob("auto", "auto (bf16 on a GPU that supports it, else off), bf16, or off")
    device: str = knob("auto", "auto (cuda if present), cpu, cuda, cuda:1, ...")
    nproc: int = knob(1, "DDP processes on this machine (gloo on CPU, NCCL on GPU); or launch with torchrun")
    record_dynamics: bool = knob(True, "write per-example training dynamics to dynamics/*.parquet")

    @classmethod
    def help_of(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_sources(cls, yaml_path: str | None, overrides: dict) -> "TrainConfig":
        """Defaults, then the YAML file, then the explicit overrides (``None`` means unset)."""
        values: dict = {}
        if yaml_path:
            with open(yaml_path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
            unknown = set(loaded) - set(cls.help_of())
            if unknown:
                raise RunError(f"{yaml_path}: unknown settings {sorted(unknown)}")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
