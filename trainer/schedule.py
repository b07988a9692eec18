"""Keep-rate schedules: 1.0 while warming up, cosine down to the target, then constant.

Rates are quantised (default steps of 0.05) so a run sees only a handful of distinct token
counts: fewer shapes, steadier kernels, and the count a batch gets is predictable. With ``stages``
the ramp also moves in that many equal steps of its length, every schedule on the same steps: a
compiled run builds one graph per distinct pair of rates, and two rates falling on their own
quantum steps meet many pairs (token 0.7 and attention 0.3 at 0.05: 19), staged ones few (stages + 1).
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
