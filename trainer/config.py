"""Training configuration: one dataclass, filled from defaults, a YAML file, then the command line."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml


@dataclass
class TrainConfig:
    dataset: str = ""
    out: str = ""
    # model (any timm VisionTransformer by name, resized for small images)
    model: str = "deit_tiny_patch16_224"
    img_size: int | None = None  # default: the dataset's image size
    patch_size: int | None = None  # default: 4 for images of 16+ pixels, else 2
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    # sparsity and its schedules
    token_keep: float = 1.0
    token_blocks: list[int] | None = None  # default: 3, 6, 9 of 12, scaled to the depth
    attn_keep: float = 1.0
    fuse_token: bool = False
    keep_warmup_epochs: float = 0.0  # keep rate 1.0 this long
    keep_ramp_epochs: float = 0.0  # then cosine down to the target over this long
    keep_quantum: float = 0.05
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0
    # running
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 0  # steps; 0: at epoch ends only
    amp: str = "auto"  # auto: bf16 on a GPU that supports it, off on CPU; bf16; off
    device: str = "auto"
    nproc: int = 1
    record_dynamics: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_sources(cls, yaml_path: str | None, overrides: dict) -> "TrainConfig":
        """Defaults, then the YAML file, then the explicit overrides (``None`` means unset)."""
        values: dict = {}
        if yaml_path:
            with open(yaml_path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
            unknown = set(loaded) - cls.field_names()
            if unknown:
                raise ValueError(f"{yaml_path}: unknown settings {sorted(unknown)}")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
