"""Training configuration: one dataclass, filled from defaults, a YAML file, then the command line.

Every field carries its help text, so ``onion train --help`` explains every knob.
"""
from __future__ import annotations

import dataclasses
import math
import typing
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
    selection: str = knob("", "train only on this selection version of DATASET (vNNNN, from onion select), read "
                              "from the source shards through the index (no survivor shards); val is read whole")
    out: str = knob("", "run directory: checkpoints, dynamics/, metrics.csv, tensorboard/, summary.json")
    model: str = knob("deit_tiny_patch16_224", "a timm VisionTransformer name. Named here (or in --config), the "
                                               "model is built as published: its own input side and patch size "
                                               "unless --img-size/--patch-size are given, and its pretrained "
                                               "config's input normalisation (ImageNet mean/std for DeiT); not "
                                               "named, onion's own ViT: this default's layers sized to the data "
                                               "(see --img-size, --patch-size), inputs scaled to [-1, 1]. List the "
                                               "ones onion trains: python -c \"import timm; print(timm.list_"
                                               "models(module=['vision_transformer', 'deit']))\"")
    pretrained: str = knob("", "weights to start from: a timm state dict in safetensors or a torch file (read with "
                               "weights_only=True: a file that needs code to unpickle is refused), local or any "
                               "fsspec URL; an onion run's RUN/checkpoints/step-N/model.safetensors works. A head "
                               "of another class count is left out (a fresh one trains), the position and patch "
                               "embeddings are resampled to another grid or patch size (timm's filter); each said")
    img_size: int | None = knob(None, "input side in pixels (default: a named --model's own; else the stored side "
                                      "when every image has the same size, as digits, MNIST and CIFAR do; else 224)")
    patch_size: int | None = knob(None, "patch side (default: a named --model's own; else 16 from 128 px up, 4 from "
                                        "16 px, else 2)")
    augment: str = knob("auto", "training augmentation, run per example in the loader workers: none (decode as "
                                "stored, resize on the device; images of mixed sizes get the evaluation resize), "
                                "basic (RandomResizedCrop 0.08-1, ratio 3/4-4/3, and a horizontal flip), deit (DeiT's "
                                "recipe: basic, bicubic, then RandAugment rand-m9-mstd0.5-inc1 and random erasing "
                                ".25; with --mixup .8 --cutmix 1 --label-smoothing .1 --drop-path .1 the paper's); "
                                "auto: none when every image has the same size under 128 px, else basic. Evaluation "
                                "(with basic or deit, or mixed sizes) resizes the short side to size/0.875 and "
                                "takes the centre square")
    mean: list[float] | None = knob(None, "input normalisation mean per channel on a 0-1 scale, e.g. "
                                          "0.485,0.456,0.406 (default: a named --model's pretrained config; "
                                          "0.5,0.5,0.5 for onion's own)")
    std: list[float] | None = knob(None, "input normalisation standard deviation per channel on a 0-1 scale "
                                         "(default: as --mean)")
    depth: int | None = knob(None, "number of blocks (default: the model's)")
    embed_dim: int | None = knob(None, "token width (default: the model's)")
    num_heads: int | None = knob(None, "attention heads (default: the model's)")
    drop_path: float = knob(0.0, "stochastic depth rate")
    ema: float = knob(0.0, "decay of a model EMA updated after every optimizer step, e.g. 0.9998 (0: off); "
                          "evaluated beside the raw weights each evaluated epoch (metrics val_top1_ema), saved "
                          "in every checkpoint as ema.safetensors (timm's keys, loads like model.safetensors)")
    token_keep: float = knob(1.0, "share of patch tokens kept at each pruning block (1.0: token level off)")
    token_blocks: list[int] | None = knob(None, "0-based pruning blocks, e.g. 3,6,9 "
                                                "(default: 3,6,9 of 12, scaled to the depth)")
    attn_keep: float = knob(1.0, "share of keys each query keeps from a pruning block on (1.0: attention level off)")
    token_merge: int = knob(0, "token merging (ToMe), the alternative token level: patch tokens merged away in "
                               "every block by bipartite soft matching of their attention keys, merged tokens "
                               "averaged by size and weighed by it in attention (proportional attention), e.g. 4 "
                               "takes 49 patches to 25 over 6 blocks; needs --token-keep 1 and --attn-keep 1 "
                               "(0: off)")
    curriculum_side: int | None = knob(None, "resolution curriculum (EfficientTrain++): the input side of the first "
                                             "epoch, a multiple of the patch side; the side rises to the full one "
                                             "by --curriculum-until, decided per epoch in the loader workers (which "
                                             "decode to it) and on the device; the position embedding is "
                                             "interpolated to each grid; evaluation runs at the full side "
                                             "(default: off)")
    curriculum_until: float = knob(0.5, "share of the epochs over which the curriculum's side rises; the rest, "
                                        "and always the last epoch, train at the full side")
    patch_drop: float = knob(0.0, "share of each training image's patch tokens removed at random after the position "
                                  "embedding, a new draw per image and step (PatchDropout, timm's patch_drop_rate; "
                                  "FLIP masks 0.5-0.75); the blocks see the rest, evaluation sees every token "
                                  "(0: off)")
    fuse_token: bool = knob(False, "fuse the dropped tokens into one attention-weighted token (EViT)")
    attn_mode: str = knob("exact", "exact: each query keeps its top keys, a dense masked kernel (the paper's "
                                   "regulariser; saves no time); block: each tile of queries keeps its top tiles of "
                                   "keys and the rest are skipped (saves time on long sequences: FlexAttention on "
                                   "CUDA; on CPU the kept tiles are gathered where that computes at most half the "
                                   "scores of a long sequence, else the same mask runs densely)")
    attn_block: int | None = knob(None, "tile side in tokens for --attn-mode block, a power of two >= 16 (default: "
                                        "at each pruning block the smallest leaving at most 24 tiles: 16 up to 384 "
                                        "tokens, 32 up to 768, 64 up to 1,536; a fine choice on short sequences, "
                                        "tiles that skip work efficiently on long ones)")
    example_strategy: str = knob("all", "all: every example every epoch; infobatch: before each epoch, a random "
                                        "--prune-ratio of the well-learned examples (latest loss below the mean) "
                                        "sit it out and those that stay weigh 1/(1-ratio) (InfoBatch); the first "
                                        "epoch and the last --prune-anneal share use every example")
    prune_ratio: float = knob(0.5, "infobatch: share of the well-learned examples left out of an epoch")
    prune_anneal: float = knob(0.125, "infobatch: share of the last epochs trained on every example")
    keep_warmup_epochs: float = knob(0.0, "epochs at keep rate 1.0 before the keep rates start falling")
    keep_ramp_epochs: float = knob(0.0, "epochs over which keep rates fall (cosine) from 1.0 to their targets")
    keep_quantum: float = knob(0.05, "keep rates are rounded up to multiples of this (few distinct token counts)")
    keep_stages: int = knob(0, "the keep-rate ramp falls in this many equal steps, token and attention rates together "
                               "(0: each rate on its own --keep-quantum steps); with --compile each distinct pair of "
                               "rates is a graph to compile, and a few stages bound them to stages + 1")
    epochs: int = knob(10, "training epochs")
    batch_size: int = knob(128, "batch size per process")
    lr: float = knob(1e-3, "peak learning rate (AdamW)")
    min_lr: float = knob(1e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = knob(0.05, "AdamW weight decay (not on norms, biases, position embedding, "
                                     "class/distillation/register tokens)")
    warmup_epochs: float = knob(1.0, "linear learning-rate warm-up, in epochs")
    label_smoothing: float = knob(0.1, "label smoothing of the training loss")
    clip_grad: float = knob(1.0, "gradient norm clipping (0: off)")
    mixup: float = knob(0.0, "timm Mixup alpha (0: off)")
    cutmix: float = knob(0.0, "timm CutMix alpha (0: off)")
    seed: int = knob(0, "seed of weights, data order, dropout and mixup")
    loader_workers: int = knob(2, "DataLoader worker processes per training process")
    checkpoint_every: int = knob(0, "also checkpoint every N steps (0: at epoch ends only)")
    eval_every: int = knob(1, "evaluate on val every N epochs, and always after the last "
                              "(skipped epochs log val_top1 as nan)")
    amp: str = knob("auto", "auto (bf16 on a GPU that supports it, else off), bf16, or off")
    device: str = knob("auto", "auto (cuda if present), cpu, cuda, cuda:1, ...")
    nproc: int = knob(1, "DDP processes on this machine (gloo on CPU, NCCL on GPU); or launch with torchrun")
    ray_workers: int = knob(0, "train on N workers of the Ray cluster with Ray Train (one GPU each where the "
                               "cluster has them, else CPU workers; --address or RAY_ADDRESS picks the cluster); "
                               "0: not on Ray")
    record_dynamics: bool = knob(True, "write per-example training dynamics to dynamics/*.parquet")
    compile: str = knob("off", "torch.compile the training step: off, default, reduce-overhead (CUDA graphs) or "
                               "max-autotune; one static graph per distinct pair of keep rates a full batch meets (the "
                               "token rate fixes the token counts, the attention rate how many keys each query keeps; "
                               "an epoch's partial last batch runs eagerly), compile time included in every timing")
    log_every: int = knob(50, "steps between progress-bar updates (each reads the loss from the device once; the "
                              "step itself never waits for the device)")
    progress_seconds: float = knob(10.0, "when output is not a terminal (a log, a pipe): seconds between progress "
                                         "lines within an epoch (0: a line every step)")
    extensions: list[dict] = knob([], "set by --resume with a larger --epochs, not a flag: where each extension "
                                      "began (epoch), the learning-rate factor there and the epochs before it")

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def help_of(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """Each setting's value type (``int`` for ``int | None``), from the annotations."""
        hints = typing.get_type_hints(cls)
        return {name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
                for name, hint in hints.items()}

    def check(self) -> None:
        """Refuse values a setting cannot mean, naming the option (a rate of 1.5 would silently run at 1.0)."""
        def refuse(name: str, rule: str) -> None:
            raise RunError(f"--{name.replace('_', '-')} must be {rule}, not {getattr(self, name)!r}")

        for name in RATES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                refuse(name, "in (0, 1]")
        for name in NON_NEGATIVE:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                refuse(name, "a number >= 0")
        for name in POSITIVE_COUNTS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                refuse(name, "a whole number >= 1")
        for name in SHARES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                refuse(name, "in [0, 1)")
        for name in ("loader_workers", "keep_stages", "ray_workers", "token_merge"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                refuse(name, "a whole number >= 0")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and len(value) == CHANNELS and all(
                    isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or name == "mean") for v in value)):
                refuse(name, f"{CHANNELS} finite numbers (red, green, blue)" + (", each > 0" if name == "std" else ""))
        if self.keep_quantum > 1.0:
            refuse("keep_quantum", "at most 1")
        if self.attn_block is not None and (self.attn_block < 16 or self.attn_block & (self.attn_block - 1)):
            refuse("attn_block", "a power of two >= 16 (FlexAttention's tiles)")
        if self.token_merge and (self.token_keep < 1.0 or self.attn_keep < 1.0):
            raise RunError(f"--token-merge {self.token_merge} is the token level in place of pruning: give it with "
                           f"--token-keep 1 and --attn-keep 1 (not {self.token_keep} and {self.attn_keep})")
        if self.ray_workers and self.nproc > 1:
            raise RunError(f"--ray-workers {self.ray_workers} and --nproc {self.nproc}: choose one (Ray Train's "
                           "workers or local processes)")
        if self.example_strategy == "infobatch" and not self.record_dynamics:
            raise RunError("--example-strategy infobatch scores examples by their recorded losses: "
                           "it needs --record-dynamics")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                refuse(name, "one of " + ", ".join(allowed))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A configuration from stored values; settings renamed since (``workers``) are read under their new name."""
        values = {RENAMED.get(name, name): value for name, value in values.items()}
        unknown = set(values) - set(cls.help_of())
        if unknown:
            raise RunError(f"unknown settings {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def given_values(cls, yaml_path: str | None, overrides: dict) -> dict:
        """The settings a user gave: the YAML file's, then the explicit overrides (``None`` means unset)."""
        values: dict = {}
        if yaml_path:
            with open(yaml_path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
            unknown = {RENAMED.get(name, name) for name in loaded} - set(cls.options())
            if unknown:
                raise RunError(f"{yaml_path}: unknown settings {sorted(unknown)}")
            values.update({RENAMED.get(name, name): value for name, value in loaded.items()})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return values

    @classmethod
    def from_sources(cls, yaml_path: str | None, overrides: dict) -> TrainConfig:
        """Defaults, then the YAML file, then the explicit overrides (``None`` means unset)."""
        return cls.from_dict(cls.given_values(yaml_path, overrides))

    @classmethod
    def options(cls) -> dict[str, str]:
        """The settings a user gives (flags and YAML keys) with their help: all but what runs record themselves."""
        return {name: text for name, text in cls.help_of().items() if name not in RECORDED}

    def epochs_at(self, epoch: int) -> int:
        """The run's length as it stood while ``epoch`` trained (an extended run was shorter before)."""
        return next((e["epochs_before"] for e in self.extensions if epoch < e["at_epoch"]), self.epochs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECORDED = ("extensions",)  # recorded by onion train --resume (in history.jsonl's configuration), never given
RENAMED = {"workers": "loader_workers"}  # old name -> current name, for configs written before the rename
CHANNELS = 3  # the loaders give RGB (grey images are converted)
RATES = ("token_keep", "attn_keep", "curriculum_until")
SHARES = ("drop_path", "patch_drop", "ema", "label_smoothing", "prune_ratio", "prune_anneal")
NON_NEGATIVE = ("lr", "min_lr", "weight_decay", "warmup_epochs", "keep_warmup_epochs", "keep_ramp_epochs",
                "keep_quantum", "clip_grad", "mixup", "cutmix", "checkpoint_every", "progress_seconds")
POSITIVE_COUNTS = ("img_size", "patch_size", "curriculum_side", "depth", "embed_dim", "num_heads", "epochs",
                   "batch_size", "nproc", "attn_block", "log_every", "eval_every")
ATTN_MODES = ("exact", "block")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
EXAMPLE_STRATEGIES = ("all", "infobatch")
AUGMENTS = ("auto", "none", "basic", "deit")
CHOICES = {"augment": AUGMENTS, "example_strategy": EXAMPLE_STRATEGIES, "attn_mode": ATTN_MODES,
           "compile": COMPILE_MODES, "amp": ("auto", "bf16", "off")}
