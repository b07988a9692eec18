"""A resolution curriculum (after EfficientTrain++): the first epochs train at a lower input side,
rising to the full side, which the last epochs use; evaluation always runs at the full side.

The side of an epoch is decided here alone, from the epoch number, so the loader workers (which
crop and resize to it while decoding: smaller images to move and collate) and the training step
(which resizes equal-size stored images on the device) agree, and a resumed run picks up the same
side. The model interpolates its position embedding to each side's patch grid (timm's
``dynamic_img_size``), so fewer patches mean fewer tokens in every block.
"""
from __future__ import annotations

import math

from trainer.errors import RunError


def epoch_sides(full: int, start: int | None, until: float, epochs: int, patch: int) -> tuple[int, ...]:
    """The input side of each epoch: ``start`` at epoch 0, rising linearly to ``full`` at the epoch
    ``until * epochs`` and ``full`` from there, each side rounded down to a whole number of patches
    (never below ``start``). Empty when there is no curriculum (``start`` None)."""
    if start is None:
        return ()
    if start % patch or not 0 < start < full:
        raise RunError(f"--curriculum-side {start} must be a multiple of the patch side {patch} below the input "
                       f"side {full}")
    ramp = max(1, math.ceil(until * epochs))
    sides = []
    for epoch in range(epochs):
        if epoch >= ramp or epoch == epochs - 1:
            sides.append(full)
        else:
            side = start + (full - start) * epoch / ramp
            sides.append(max(start, int(side // patch) * patch))
    return tuple(sides)


def side_of(sides: tuple[int, ...], epoch: int, full: int) -> int:
    """The side of ``epoch`` (the full side past the schedule: an extended run trains at full side)."""
    return sides[epoch] if epoch < len(sides) else full
