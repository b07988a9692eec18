"""Model EMA (``--ema DECAY``): timm's ``ModelEmaV3`` over onion's sparse ViT.

The average is a full copy of the model (``deepcopy``: its own parameters and buffers, nothing shared
with the raw model), updated in place after every optimizer step (``update(model, step=N)``) from
the unwrapped model, so every DDP rank keeps the same copy without communicating. Its state_dict
has timm's keys, as the raw model's does, so ``ema.safetensors`` loads wherever
``model.safetensors`` does.
"""
from __future__ import annotations

from timm.utils import ModelEmaV3

from trainer.sparse_vit import SparseVisionTransformer


class SparseModelEma(ModelEmaV3):
    """An exponential moving average of a :class:`SparseVisionTransformer`'s weights."""

    module: SparseVisionTransformer

    def __init__(self, model: SparseVisionTransformer, decay: float) -> None:
        # A constant decay, no warm-up (timm's train.py default). Updated with the step number, as timm's
        # train.py does, the first update copies the weights: the average starts from step 1, not the init.
        super().__init__(model, decay=decay)
        self.module.record_cls_attention = False  # the recorded dynamics are the raw model's

    def at_rates_of(self, model: SparseVisionTransformer) -> SparseVisionTransformer:
        """The averaged model at ``model``'s keep rates: the copy holds the rates it was made with,
        and an evaluation must compare both at the same token and attention sparsity."""
        self.module.set_rates(model.token_keep, model.attn_keep)
        return self.module
