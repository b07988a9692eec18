"""The training loop: stream shards, train the sparse ViT, evaluate, checkpoint, record dynamics."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from shards import ShardDataset, location, read_manifest
from shards.reader import Selection
from trainer.augment import device_augmentation
from trainer.checkpoint import (
    Position,
    commit_checkpoint,
    latest_position,
    load_checkpoint,
    save_rank_state,
)
from trainer.compile import compiled, compiled_graphs
from trainer.config import TrainConfig
from trainer.curriculum import epoch_sides, side_of
from trainer.dynamics import DynamicsRecorder, latest_losses
from trainer.ema import SparseModelEma
from trainer.epoch_planner import (
    Collective,
    loss_weights,
    plan_epoch_in_parts,
    plans_in_parts,
    torch_collective,
)
from trainer.example_pruning import (
    STRATEGY,
    PlannedEpoch,
    kept_keys_of,
    plan_epoch,
    prunes_epoch,
    record_epoch,
    record_plan,
)
from trainer.flops import ViTShape, measured_forward_flops
from trainer.inputs import Normalization, augment_policy, data_info, input_side, prepare, reader_transforms
from trainer.model import build_model, model_kwargs, patch_size_of
from trainer.run_folder import METRICS, MODEL_JSON, TENSORBOARD, claim, write_summary
from trainer.schedule import KeepSchedule, lr_factor, rate_pairs
from trainer.sparse_vit import SparseVisionTransformer

NO_DECAY_TOKENS = ("pos_embed", "cls_token", "dist_token", "reg_token")  # learned tokens: no weight decay
TRAIN_FLOPS_PER_FORWARD = 3  # backward costs about twice the forward pass
# torch's fused AdamW: one kernel over all parameters instead of ~10 ops per parameter (CPU, the
# benchmark's 80-parameter ViT: 0.6 vs 2.3 ms per step, a fixed cost the token level cannot shrink).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")
NOT_EVALUATED = float("nan")  # val_top1 / val_loss of an epoch that --eval-every skipped


def pick_device(config: TrainConfig, rank: int) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_for(config: TrainConfig, device: torch.device):  # noqa: ANN201 - a context manager
    use_bf16 = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda"
                                        and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


class Trainer:
    def __init__(self, config: TrainConfig, rank: int = 0, world_size: int = 1, *, resuming: bool = False) -> None:
        """``resuming``: a checkpoint will replace the weights, so ``--pretrained`` is not read."""
        self.config, self.rank, self.world_size = config, rank, world_size
        self.run = location(config.out)
        self.dataset = location(config.dataset)
        self.device = pick_device(config, rank)
        info = data_info(self.dataset)
        self.img_size = input_side(config, info)
        self.normalization = Normalization.of(config)
        self.num_classes = info.num_classes
        self.augment = augment_policy(config, info)
        # a resolution curriculum's side per epoch (empty: img_size always)
        self.sides = epoch_sides(self.img_size, config.curriculum_side, config.curriculum_until, config.epochs,
                                 patch_size_of(config, self.img_size))
        self.train_transform, self.eval_transform = reader_transforms(self.augment, info, self.img_size, config.seed,
                                                                      self.sides)
        self.device_augment = device_augmentation(self.augment, self.device)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model: SparseVisionTransformer = build_model(
            config, self.img_size, self.num_classes, load_pretrained_weights=not resuming,
            say=lambda line: sys.stderr.write(f"{config.out}: {line}\n") if rank == 0 else None).to(self.device)
        self.model.record_cls_attention = config.record_dynamics
        self.shape = ViTShape.of(self.model)
        self.ddp = DistributedDataParallel(self.model) if world_size > 1 else None
        # After DDP (which broadcasts rank 0's weights: every rank's copy starts the same), before compile.
        self.ema = SparseModelEma(self.model, config.ema) if config.ema > 0 else None
        self.step_model = compiled(self.ddp or self.model, config.compile)
        self.graphs_before = compiled_graphs()  # dynamo's counter is per process: report this run's share
        self.step_shapes: set[tuple[int, ...]] = set()  # distinct (batch size, tokens in each block) of the steps
        self.compiled_shapes: set[tuple[int, ...]] = set()  # those of the steps that ran compiled
        self.position = Position(step=0, epoch=0, batch=0)
        self.example_weights: dict[str, float] | None = None  # loss weights of this epoch's examples (infobatch)
        self.said_no_val = False  # a dataset without val is said once, not at every curation round
        self.use_dataset(config.dataset, config.selection or None)
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            (no_decay if parameter.ndim <= 1 or name in NO_DECAY_TOKENS else decay).append(parameter)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                                           fused=self.device.type in FUSED_ADAMW_DEVICES)

        def next_step_factor(_: int) -> float:  # the rate of the step about to run, from its place in the epochs
            return lr_factor(config, self.position.epoch + (self.position.batch + 1) / self.steps_per_epoch)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, next_step_factor)
        ramp = dict(warmup_steps=int(config.keep_warmup_epochs * self.steps_per_epoch),
                    ramp_steps=int(config.keep_ramp_epochs * self.steps_per_epoch), quantum=config.keep_quantum,
                    stages=config.keep_stages)
        self.token_schedule = KeepSchedule(config.token_keep, **ramp)
        self.attn_schedule = KeepSchedule(config.attn_keep, **ramp)
        self.keep_rate_pairs = pairs = len(rate_pairs(self.token_schedule, self.attn_schedule))
        if config.compile != "off" and self.is_main:
            sys.stderr.write(f"{config.out}: --compile: the keep-rate schedule meets {pairs} distinct pair(s) of "
                             f"keep rates, a graph to compile for each" + ("" if pairs <= 4 or config.keep_stages else
                                                                   " (--keep-stages 3 would bound them to 4)") + "\n")
        self.mixup = (Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                            label_smoothing=config.label_smoothing, num_classes=self.num_classes)
                      if config.mixup > 0 or config.cutmix > 0 else None)
        self.dynamics = DynamicsRecorder(self.run, rank) if config.record_dynamics else None

    def use_dataset(self, url: str, selection: str | None = None) -> None:
        """Stream this dataset (only ``selection``'s kept train examples, when given) from the next epoch
        on: curation rounds swap in each round's selection."""
        self.data_url, self.data_selection = url, selection
        self.train_data = ShardDataset(url, "train", seed=self.config.seed, batch_size=self.config.batch_size,
                                       channels=3, rank=self.rank, world_size=self.world_size, selection=selection,
                                       image_transform=self.train_transform)
        # A dataset without a val split (a flat class folder ingested with --val-fraction 0) still trains:
        # the run says so once and reports no validation (val_top1 nan), rather than stop at a dead end.
        has_val = "val" in read_manifest(location(url))["counts"]["by_split"]
        self.val_data = ShardDataset(url, "val", shuffle=False, batch_size=self.config.batch_size,
                                     channels=3, rank=self.rank, world_size=self.world_size,
                                     image_transform=self.eval_transform) if has_val else None
        if not has_val and self.is_main and not self.said_no_val:
            self.said_no_val = True
            sys.stderr.write(f"{self.config.out}: {url} has no val split, so this run reports no validation "
                             "(val top-1 nan); to have one, ingest with --val-fraction 0.1 or train/ and val/ "
                             "folders\n")
        self.loaders: dict[str, DataLoader] = {}  # one per split while the data sets stay the same
        self._restrict_train_data(None)

    def _restrict_train_data(self, keys: Selection | None) -> None:
        """Train on only these keys of the training set from this epoch on (None: all); the loader's
        workers keep running (per-epoch pruning changes the keys every epoch)."""
        self.train_data.restrict(keys)
        self.steps_per_epoch = max(1, math.ceil(len(self.train_data) / self.config.batch_size))

    def _plan_examples(self) -> None:
        """Per-epoch example pruning (--example-strategy infobatch): choose this epoch's examples and
        loss weights from the latest losses, the same on every rank, and record the choice."""
        config, epoch = self.config, self.position.epoch
        self.example_weights = None
        epochs = config.epochs_at(epoch)  # an extended run plans its earlier epochs as it did then
        if not prunes_epoch(epoch, epochs, config.prune_anneal):
            self._restrict_train_data(None)
            return
        dataset = location(self.data_url)
        parameters = {"strategy": STRATEGY, "run": config.out, "ratio": config.prune_ratio,
                      "anneal": config.prune_anneal, "seed": config.seed}
        if plans_in_parts(dataset):  # each rank plans some index parts: nothing sized by the whole dataset
            collective = (torch_collective(self.rank, self.world_size) if self.world_size > 1 else Collective())
            planned = plan_epoch_in_parts(dataset, self.run, self.data_selection, epoch, config.prune_ratio,
                                          config.seed, collective, parameters)
            self._restrict_train_data(planned.version)
            self.train_data.set_epoch(epoch, start_batch=self.position.batch)  # as _train_epoch will: its shards
            reading = {segment.shard for segment in self.train_data.segments()}
            self.example_weights = loss_weights(dataset, planned, reading, config.prune_ratio)
        else:  # an index stored as one file (an earlier onion's dataset): planned in one process
            keys = self.train_data.keys()
            plan = plan_epoch(keys, latest_losses(self.run, keys, epoch), epoch, epochs, config.prune_ratio,
                              config.prune_anneal, config.seed)
            version = record_plan(dataset, plan, self.data_selection, parameters) if self.is_main else ""
            planned = PlannedEpoch(version, int(plan.kept.sum()), int((~plan.kept).sum()), plan.threshold)
            self.example_weights = plan.weight_of()
            self._restrict_train_data(kept_keys_of(plan))
        if self.is_main:
            record_epoch(self.run, epoch, planned)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resume(self) -> bool:
        position = latest_position(self.run)
        if position is None:
            return False
        ema_loaded = load_checkpoint(self.run, position, self.rank, self.model, self.optimizer, self.scheduler,
                                     self.ema.module if self.ema else None)
        if self.ema and not ema_loaded:  # a checkpoint saved without --ema (onion curate run again with it)
            self.ema.set(self.model)
            if self.is_main:
                sys.stderr.write(f"{self.config.out}: the checkpoint at step {position.step} holds no model EMA: "
                                 "the EMA starts from its weights\n")
        if self.dynamics:
            self.dynamics.drop_parts_after(position.step)
        self.position = position
        return True

    def checkpoint(self) -> None:
        if self.dynamics:
            self.dynamics.flush(self.position.step)
        save_rank_state(self.run, self.position, self.rank)
        self._barrier()
        if self.is_main:
            commit_checkpoint(self.run, self.position, self.model, self.optimizer, self.scheduler,
                              self.ema.module if self.ema else None)
        self._barrier()

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def train(self, until_epoch: int | None = None) -> dict:
        """Train up to ``until_epoch`` (default: the end); the summary is written at the end."""
        config = self.config
        if self.is_main:
            claim(self.run, config.to_dict())  # written once: a claimed run has it already (resumes: history.jsonl)
            self.run.write_atomic(MODEL_JSON, json.dumps(
                {"model": config.model, "kwargs": model_kwargs(config, self.img_size, self.num_classes),
                 "mean": list(self.normalization.mean), "std": list(self.normalization.std)},
                indent=2).encode())
        last = min(config.epochs, until_epoch if until_epoch is not None else config.epochs)
        try:
            while self.position.epoch < last:
                if config.example_strategy == STRATEGY:
                    self._plan_examples()
                started = time.perf_counter()
                images, loss_sum, correct = self._train_epoch()
                elapsed = time.perf_counter() - started
                finished = self.position.epoch + 1
                # Validation is a fixed cost per epoch: every --eval-every epochs, and always after the
                # run's last epoch (curation rounds in between are not special: the bench evaluates
                # every arm the same way).
                evaluate = finished == config.epochs or finished % config.eval_every == 0
                val_top1, val_loss = self.evaluate() if evaluate else (NOT_EVALUATED, NOT_EVALUATED)
                val_top1_ema = self.evaluate_ema() if evaluate and self.ema else NOT_EVALUATED
                done = self.position
                self.position = replace(done, epoch=done.epoch + 1, batch=0, train_seconds=done.train_seconds + elapsed,
                                        train_images=done.train_images + images * self.world_size, val_top1=val_top1,
                                        val_top1_ema=val_top1_ema)
                self.checkpoint()
                if self.is_main:
                    self._log({"epoch": self.position.epoch, "step": self.position.step,
                               "train_loss": loss_sum / max(1, images), "train_top1": 100.0 * correct / max(1, images),
                               "val_top1": val_top1, "val_loss": val_loss,
                               # without --ema no column: metrics.csv keeps the columns it always had
                               **({"val_top1_ema": val_top1_ema} if self.ema else {}),
                               "lr": self.scheduler.get_last_lr()[0],
                               "token_keep": self.model.token_keep, "attn_keep": self.model.attn_keep,
                               "images_per_second": images * self.world_size / max(elapsed, 1e-9),
                               "epoch_seconds": elapsed})
        finally:
            self.loaders.clear()  # persistent DataLoader workers end with this call, not at exit or GC

        summary = {"val_top1": self.position.val_top1,
                   **({"val_top1_ema": self.position.val_top1_ema} if self.ema else {}),
                   "train_seconds": self.position.train_seconds,
                   "images_per_second": self.position.train_images / max(self.position.train_seconds, 1e-9),
                   "epochs": self.position.epoch, "steps": self.position.step, "world_size": self.world_size,
                   "train_images": self.position.train_images, "train_flops": self.position.train_flops,
                   "device": str(self.device), "config": config.to_dict(),
                   "token_counts": sorted({shape[1:] for shape in self.step_shapes}),
                   "step_shapes": len(self.step_shapes),
                   "compiled_shapes": len(self.compiled_shapes),
                   "compiled_graphs": compiled_graphs() - self.graphs_before,
                   "keep_rate_pairs": self.keep_rate_pairs,
                   "model_kwargs": model_kwargs(config, self.img_size, self.num_classes)}
        if self.is_main and self.position.epoch >= config.epochs:
            write_summary(self.run, summary)
        return summary

    def _train_epoch(self) -> tuple[int, float, int]:
        config = self.config
        (self.ddp or self.model).train()
        self.train_data.set_epoch(self.position.epoch, start_batch=self.position.batch)
        loader = self._loader("train")
        # Running sums stay on the device: reading them is a host-device sync, done only at the
        # progress-bar interval and at the end of the epoch, never inside a step.
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, correct
        images_seen = 0
        bar = tqdm(loader, total=self.steps_per_epoch - self.position.batch, disable=None if self.is_main else True,
                   desc=f"epoch {self.position.epoch + 1}/{config.epochs}", unit="batch", leave=False)
        join = self.ddp.join() if self.ddp else nullcontext()
        started = last_line = time.perf_counter()
        # In a log or a pipe the bar is off: a line every --progress-seconds instead, so a long first epoch
        # is not silent.
        lines = self.is_main and bar.disable
        with join:
            for images, labels, keys in bar:
                self._step(images, labels, keys, totals)
                images_seen += len(keys)
                if not bar.disable and self.position.step % config.log_every == 0:
                    loss_sum = totals[0].item()  # the one sync of a logging interval
                    bar.set_postfix(img_s=f"{images_seen * self.world_size / (time.perf_counter() - started):.0f}",
                                    loss=f"{loss_sum / max(1, images_seen):.3f}")
                if lines and time.perf_counter() - last_line >= config.progress_seconds:
                    last_line = time.perf_counter()
                    loss_sum = totals[0].item()  # the one sync of a progress line
                    sys.stderr.write(f"{config.out}: epoch {self.position.epoch + 1}/{config.epochs}  step "
                                     f"{self.position.batch}/{self.steps_per_epoch}  train loss "
                                     f"{loss_sum / max(1, images_seen):.4f}  "
                                     f"{images_seen * self.world_size / (last_line - started):.0f} img/s\n")
                    sys.stderr.flush()
                if config.checkpoint_every and self.position.step % config.checkpoint_every == 0:
                    self.checkpoint()
        loss_sum, correct = totals.tolist()
        return images_seen, loss_sum, int(correct)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str], totals: torch.Tensor) -> None:
        """One optimisation step. Nothing here reads a device value on the host, so the host can
        queue the next steps while the device works (checked by the tests)."""
        config = self.config
        self.model.set_rates(self.token_schedule(self.position.step), self.attn_schedule(self.position.step))
        x = prepare(images, side_of(self.sides, self.position.epoch, self.img_size), self.device, self.normalization)
        if self.device_augment is not None:  # DeiT's random erasing, per sample, before Mixup as in timm
            x = self.device_augment(x)
        y = labels.to(self.device, non_blocking=True)
        inputs, targets = self.mixup(x, y) if self.mixup and len(x) % 2 == 0 else (x, y)
        smoothing = 0.0 if self.mixup else config.label_smoothing
        # A partial batch (an epoch's last) runs eagerly: compiled, each distinct size would be one more
        # graph, and example pruning changes that size every epoch (a recompile per epoch for one step).
        compiled_step = config.compile != "off" and len(keys) == config.batch_size
        model = self.step_model if compiled_step else (self.ddp or self.model)
        with autocast_for(config, self.device):
            logits = model(inputs)
            if self.example_weights is None:
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
            else:  # well-learned examples that stay weigh 1 / (1 - ratio): the expected gradient is unbiased
                weights = torch.tensor([self.example_weights.get(key, 1.0) for key in keys])
                loss = (F.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction="none")
                        * weights.to(self.device, non_blocking=True)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad)
        self.optimizer.step()
        if self.ema:  # from the unwrapped model: every DDP rank folds in the same weights
            self.ema.update(self.model, step=self.position.step + 1)
        if self.dynamics:
            self.dynamics.record(keys, self.position.epoch, self.position.step, logits, y,
                                 self.model.last_cls_attention_variance)
        totals[0] += loss.detach() * len(keys)
        totals[1] += (logits.detach().argmax(dim=1) == y).sum()
        shape = (len(keys), *self.model.last_token_counts)
        self.step_shapes.add(shape)
        if compiled_step:
            self.compiled_shapes.add(shape)
        step_flops = TRAIN_FLOPS_PER_FORWARD * len(keys) * measured_forward_flops(
            self.shape, self.model.last_input_tokens, self.model.last_token_counts)
        self.position = replace(self.position, step=self.position.step + 1, batch=self.position.batch + 1,
                                train_flops=self.position.train_flops + step_flops * self.world_size)
        self.scheduler.step()  # after the position moved: it sets the rate of the next step

    def _loader(self, split: str) -> DataLoader:
        """The split's DataLoader. Its workers persist across epochs (starting them is a fixed cost per
        epoch otherwise); the dataset's epoch reaches them through shared memory."""
        if split not in self.loaders:
            workers = self.config.loader_workers
            # A private generator: creating a DataLoader iterator draws a seed, which must not move the
            # global RNG (dropout, mixup), or a resumed run would diverge from an uninterrupted one.
            self.loaders[split] = DataLoader(
                self.train_data if split == "train" else self.val_data, batch_size=None, num_workers=workers,
                persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.config.seed))
        return self.loaders[split]

    @torch.no_grad()
    def evaluate(self, model: SparseVisionTransformer | None = None) -> tuple[float, float]:
        """Val top-1 (%) and mean loss of ``model`` (default: the raw model)."""
        if self.val_data is None:
            return NOT_EVALUATED, NOT_EVALUATED
        model = model or self.model
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
        loader = self._loader("val")
        for images, labels, _ in loader:
            y = labels.to(self.device)
            with autocast_for(self.config, self.device):
                logits = model(prepare(images, self.img_size, self.device, self.normalization)).float()
            totals += torch.tensor([float((logits.argmax(1) == y).sum()),
                                    float(F.cross_entropy(logits, y, reduction="sum")), len(y)],
                                   dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(totals)
        correct, loss_sum, count = totals.tolist()
        return 100.0 * correct / max(count, 1), loss_sum / max(count, 1)

    def evaluate_ema(self) -> float:
        """The model EMA's val top-1 (%), at the raw model's keep rates."""
        return self.evaluate(self.ema.at_rates_of(self.model))[0]

    def _log(self, row: dict) -> None:
        """Append a row to metrics.csv (rewritten whole, so object-store runs get it too) and TensorBoard."""
        previous = self.run.read_bytes(METRICS).decode() if self.run.exists(METRICS) else ""
        line = io.StringIO()
        writer = csv.DictWriter(line, fieldnames=list(row))
        if not previous:
            writer.writeheader()
        writer.writerow(row)
        self.run.write_atomic(METRICS, (previous + line.getvalue()).encode())
        if not sys.stderr.isatty():  # the progress bar is off in logs and pipes: one line per epoch instead
            val = "not evaluated" if math.isnan(row["val_top1"]) else f"{row['val_top1']:.2f}%"
            if not math.isnan(row.get("val_top1_ema", NOT_EVALUATED)):
                val += f" (EMA {row['val_top1_ema']:.2f}%)"
            sys.stderr.write(f"{self.config.out}: epoch {row['epoch']}/{self.config.epochs}  "
                             f"train loss {row['train_loss']:.4f}  val top-1 {val}  "
                             f"{row['images_per_second']:.0f} img/s  {row['epoch_seconds']:.1f} s\n")
            sys.stderr.flush()
        if not self.run.is_local:
            return  # TensorBoard's writer needs a local directory
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(os.path.join(self.run.root, TENSORBOARD)) as board:
            for name, value in row.items():
                if name not in ("epoch", "step") and not math.isnan(value):
                    board.add_scalar(name, value, row["step"])
