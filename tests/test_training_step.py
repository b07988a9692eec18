"""The training step: it never makes the host wait for the device, and ``--compile`` trains like eager.

A step that reads a device value on the host (``loss.item()``, ``int(correct.sum())``, a blocking
copy of dynamics to the CPU) makes the host wait for the device every step, so the GPU idles while
Python prepares the next one. On CPU there is no device to wait for, so the CPU test counts the
reads themselves: a torch function mode records every tensor-to-Python read made from onion's own
code while ``Trainer._step`` runs. On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` turns any
synchronisation inside the step, ours or torch's, into an error.
"""
import pytest
import torch

from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.host_reads import HostReads
from trainer.launch import train
from trainer.loop import Trainer

# Every part of the step that could read on the host is switched on: both sparsity levels with a
# fused token and a ramp, mixup, clipping, dynamics, the model EMA's update.
SPARSE_STEP = dict(epochs=1, batch_size=16, depth=3, embed_dim=64, num_heads=2, patch_size=4, lr=1e-3,
                   warmup_epochs=0.2, loader_workers=0, token_blocks=[1], token_keep=0.5, attn_keep=0.5,
                   fuse_token=True, keep_ramp_epochs=0.5, mixup=0.2, clip_grad=1.0, record_dynamics=True, ema=0.99)


def count_reads_in_steps(monkeypatch: pytest.MonkeyPatch) -> tuple[HostReads, list[int]]:
    counter, steps = HostReads(), []
    step = Trainer._step

    def counted_step(self: Trainer, *args: object) -> None:
        with counter:
            step(self, *args)
        steps.append(self.position.step)

    monkeypatch.setattr(Trainer, "_step", counted_step)
    return counter, steps


def test_the_training_step_reads_nothing_from_the_device(digits, tmp_path, monkeypatch):
    counter, steps = count_reads_in_steps(monkeypatch)
    summary = train(TrainConfig(dataset=digits, out=str(tmp_path / "run"), **SPARSE_STEP))
    assert len(steps) == summary["steps"] > 50
    assert counter.reads == [], counter.reads
    # The counter does see reads where onion makes them: evaluation sums up once, on the host.
    trainer = Trainer(TrainConfig(dataset=digits, out=str(tmp_path / "again"), **SPARSE_STEP))
    with counter:
        trainer.evaluate()
    assert any("trainer/loop.py" in read for read in counter.reads), counter.reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_sync_debug_mode watches CUDA streams only")
def test_the_training_step_never_synchronises_on_cuda(digits, tmp_path, monkeypatch):
    steps = []
    step = Trainer._step

    def strict_step(self: Trainer, *args: object) -> None:
        if self.position.step < 2:  # the first steps allocate and may load kernels
            return step(self, *args)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps.append(self.position.step)

    monkeypatch.setattr(Trainer, "_step", strict_step)
    config = {**SPARSE_STEP, "device": "cuda", "mixup": 0.0}  # timm's Mixup builds its lambda on the host
    summary = train(TrainConfig(dataset=digits, out=str(tmp_path / "run"), **config))
    assert len(steps) == summary["steps"] - 2


# Keep 0.5 in steps of 0.5: token counts at rate 1.0 and at 0.5. Digits' 1,468 training examples
# in batches of 64 leave a partial batch of 60 each epoch, a third shape, which runs eagerly.
COMPILED = dict(epochs=2, batch_size=64, depth=2, embed_dim=32, num_heads=2, patch_size=4, lr=1e-3,
                warmup_epochs=0.2, label_smoothing=0.0, loader_workers=0, token_blocks=[1], token_keep=0.5,
                keep_warmup_epochs=0.5, keep_quantum=0.5, record_dynamics=False)


@pytest.mark.slow
def test_compiled_training_follows_eager_with_one_graph_per_token_count(digits, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    eager = train(TrainConfig(dataset=digits, out=str(tmp_path / "eager"), **COMPILED))
    compiled = train(TrainConfig(dataset=digits, out=str(tmp_path / "compiled"), compile="default", **COMPILED))
    assert len(eager["token_counts"]) == 2 and eager["step_shapes"] == 3, eager  # the premise: 2 counts, 3 shapes
    assert compiled["token_counts"] == eager["token_counts"]
    # One graph per token count (full batches; the partial one runs eagerly): no graph breaks, no
    # recompiles once each shape has been seen.
    assert compiled["compiled_graphs"] == compiled["compiled_shapes"] == len(compiled["token_counts"]) == 2, compiled
    assert compiled["step_shapes"] == 3 and eager["compiled_shapes"] == eager["compiled_graphs"] == 0
    losses = [[float(line.split(",")[2]) for line in (tmp_path / run / "metrics.csv").read_text().splitlines()[1:]]
              for run in ("eager", "compiled")]
    # Inductor fuses and reorders float arithmetic; two epochs of AdamW keep the curves within 1%.
    assert losses[1] == pytest.approx(losses[0], rel=1e-2), losses
    assert compiled["val_top1"] == pytest.approx(eager["val_top1"], abs=2.0)


def test_staged_keep_ramp_bounds_the_token_counts(digits, tmp_path):
    """--keep-stages 2: the ramp meets three pairs of rates (1.0, then two stages), so three token counts,
    where each rate on its own 0.05 steps meets ten or more (one compiled graph each)."""
    ramp = {**SPARSE_STEP, "img_size": 16, "patch_size": 2, "batch_size": 64, "keep_ramp_epochs": 1.0,
            "mixup": 0.0, "record_dynamics": False}
    free = train(TrainConfig(dataset=digits, out=str(tmp_path / "free"), **ramp))
    staged = train(TrainConfig(dataset=digits, out=str(tmp_path / "staged"), keep_stages=2, **ramp))
    assert free["keep_rate_pairs"] >= 10 and len(free["token_counts"]) >= 10, free
    assert staged["keep_rate_pairs"] == 3 and len(staged["token_counts"]) == 3, staged


@pytest.mark.parametrize("name,value,rule", [("keep_stages", -1, "a whole number >= 0"),
                                             ("keep_stages", 1.5, "a whole number >= 0"),
                                             ("attn_block", 24, "a power of two >= 16"),
                                             ("attn_block", 8, "a power of two >= 16")])
def test_tiles_and_stages_a_run_cannot_mean_are_refused(name, value, rule):
    with pytest.raises(RunError, match=f"--{name.replace('_', '-')} must be {rule}"):
        TrainConfig(**{name: value})
    assert TrainConfig(attn_block=32, keep_stages=3).attn_block == 32  # and the good ones pass
