"""The schedules of a run: keep rates and the learning rate.

Keep rates: 1.0 while warming up, cosine down to the target, then constant.

Rates are quantised (default steps of 0.05) so a run sees only a handful of distinct token
counts: fewer shapes, steadier kernels, and the count a batch gets is predictable. With ``stages``
the ramp also moves in that many equal steps of its length, every schedule on the same steps: a
compiled run builds one graph per distinct pair of rates, and two rates falling on their own
quantum steps meet many pairs (token 0.7 and attention 0.3 at 0.05: 19), staged ones few (stages + 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import TrainConfig


@dataclass(frozen=True)
class KeepSchedule:
    target: float
    warmup_steps: int = 0
    ramp_steps: int = 0
    quantum: float = 0.05
    stages: int = 0  # > 0: the ramp falls in this many equal steps, each at the rate its end reaches

    def __call__(self, step: int) -> float:
        if self.target >= 1.0 or step < self.warmup_steps:
            return 1.0
        progress = 1.0 if self.ramp_steps <= 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        if self.stages > 0:
            progress = math.ceil(round(progress * self.stages, 6)) / self.stages
        rate = self.target + (1.0 - self.target) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.quantum > 0:
            rate = round(math.ceil(round(rate / self.quantum, 6)) * self.quantum, 6)  # up: never below target
        return min(1.0, max(self.target, rate))


def rate_pairs(token: KeepSchedule, attention: KeepSchedule) -> list[tuple[float, float]]:
    """The distinct (token, attention) keep rates a run meets, in order: one compiled graph each."""
    end = max(token.warmup_steps + token.ramp_steps, attention.warmup_steps + attention.ramp_steps)
    return list(dict.fromkeys((token(step), attention(step)) for step in range(end + 1)))


def lr_factor(config: TrainConfig, progress: float) -> float:
    """Learning-rate multiplier ``progress`` epochs into training: linear warm-up, then cosine down to
    min_lr. A function of (fractional) epochs, not steps, so epochs of different lengths (per-epoch
    example pruning) keep the schedule's shape and it still ends at min_lr.

    A run extended with a larger --epochs (``config.extensions``) follows, from the epoch where the
    extension began, a new cosine from the factor it had reached there down to min_lr at its new end."""
    if progress < config.warmup_epochs:
        return progress / config.warmup_epochs
    floor = config.min_lr / config.lr
    ends = [extension["epochs_before"] for extension in config.extensions] + [config.epochs]
    start, start_factor, end = config.warmup_epochs, 1.0, ends[0]
    for extension, extended_end in zip(config.extensions, ends[1:]):
        if progress >= extension["at_epoch"]:
            start, start_factor, end = extension["at_epoch"], extension["lr_factor"], extended_end
    done = min(1.0, (progress - start) / max(end - start, 1e-9))
    return floor + (start_factor - floor) * 0.5 * (1 + math.cos(math.pi * done))
