"""Keep-rate schedules: 1.0 while warming up, cosine down to the target, then constant.

Rates are quantised (default steps of 0.05) so a run sees only a handful of distinct token
counts: fewer shapes, steadier kernels, and the count a batch gets is predictable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KeepSchedule:
    target: float
    warmup_steps: int = 0
    ramp_steps: int = 0
    quantum: float = 0.05

    def __call__(self, step: int) -> float:
        if self.target >= 1.0 or step < self.warmup_steps:
            return 1.0
        progress = 1.0 if self.ramp_steps <= 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        rate = self.target + (1.0 - self.target) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.quantum > 0:
            rate = round(math.ceil(round(rate / self.quantum, 6)) * self.quantum, 6)  # up: never below target
        return min(1.0, max(self.target, rate))
