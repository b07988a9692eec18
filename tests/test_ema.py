"""Model EMA (``--ema DECAY``): averaged weights beside the raw ones, evaluated at the raw model's keep
rates (metrics ``val_top1_ema``), saved in every checkpoint as ``ema.safetensors`` (timm's keys), and a
resumed run continues both bit-identically; without ``--ema`` nothing changes, runs from before it
included."""
import csv
import json
import math
from dataclasses import replace

import pytest
import timm
import torch

from helpers import assert_same_weights, last_weights, saved_config_of
from pipeline.cli import main
from trainer.launch import train
from trainer.loop import Trainer
from trainer.resume import saved_config
from trainer.run_folder import EMA_FILE

# A small decay, so that 2 short epochs (26 steps each) leave the average clearly apart from the raw weights.
EMA = dict(epochs=2, ema=0.9, checkpoint_every=10, record_dynamics=False)


def metrics_of(run) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))


@pytest.fixture(scope="module")
def ema_run(digits, tmp_path_factory):
    """A finished two-epoch run with --ema, trained in this process (its trainer is kept to look inside)."""
    run = tmp_path_factory.mktemp("runs") / "ema"
    trainer = Trainer(saved_config_of(digits, run, **EMA))
    trainer.train()
    return run, trainer


def test_the_ema_is_saved_evaluated_and_loads_into_timm(ema_run):
    run, trainer = ema_run
    raw, ema = last_weights(run), last_weights(run, EMA_FILE)
    assert raw.keys() == ema.keys()  # timm's keys, as model.safetensors
    assert all(torch.isfinite(tensor).all() for tensor in ema.values())
    assert any(not torch.equal(raw[name], ema[name]) for name in raw if raw[name].is_floating_point())
    # A full copy: no parameter or buffer shares memory with the raw model.
    shared = {t.data_ptr() for t in trainer.model.state_dict().values()}
    assert not shared & {t.data_ptr() for t in trainer.ema.module.state_dict().values()}
    # Evaluated at the raw model's keep rates: the same tokens kept in every block on the last val batch.
    assert trainer.model.token_keep == 0.5 and trainer.ema.module.token_keep == trainer.model.token_keep
    assert trainer.ema.module.last_token_counts == trainer.model.last_token_counts
    rows = metrics_of(run)
    assert len(rows) == 2 and all(math.isfinite(float(row["val_top1_ema"])) for row in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_top1_ema"] == float(rows[-1]["val_top1_ema"]) > 10.0  # chance is 10%
    # As docs/training.md says to load it: timm's own pretrained loading, the head kept (num_classes given).
    built = json.loads((run / "model.json").read_text())
    file = sorted((run / "checkpoints").glob("step-*"))[-1] / EMA_FILE
    dense = timm.create_model(built["model"], pretrained=True, **built["kwargs"],
                              pretrained_cfg_overlay=dict(file=str(file), num_classes=built["kwargs"]["num_classes"]))
    assert_same_weights(dense.state_dict(), ema)


def test_a_run_stopped_and_resumed_ends_with_the_same_raw_and_ema_weights(digits, ema_run, tmp_path):
    straight, _ = ema_run
    run = tmp_path / "stopped"
    config = saved_config_of(digits, run, **EMA)
    Trainer(config).train(until_epoch=1)  # stopped at the end of epoch 1
    resumed = Trainer(config, resuming=True)
    assert resumed.resume()
    resumed.train()
    for name in ("model.safetensors", EMA_FILE):
        assert_same_weights(last_weights(straight, name), last_weights(run, name))
    # Stopped inside epoch 2 (the pointer rewound to its mid-epoch checkpoint, as if killed just after it).
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    step = int(sorted((run / "checkpoints").glob("step-*"))[0].name.split("-")[1])
    steps_per_epoch = latest["step"] // 2
    assert step % steps_per_epoch > 0
    (run / "checkpoints" / "latest.json").write_text(json.dumps(
        {**latest, "step": step, "epoch": step // steps_per_epoch, "batch": step % steps_per_epoch}))
    resumed = Trainer(config, resuming=True)
    assert resumed.resume()
    resumed.train()
    for name in ("model.safetensors", EMA_FILE):
        assert_same_weights(last_weights(straight, name), last_weights(run, name))


def test_a_run_without_ema_writes_none_and_a_run_from_before_it_resumes(digits, tmp_path):
    run = tmp_path / "run"
    config = saved_config_of(digits, run, epochs=2, record_dynamics=False)
    Trainer(config).train(until_epoch=1)
    # As written before --ema existed: no ema setting, no val_top1_ema in the checkpoint's position.
    for name, key in (("config.json", "ema"), ("checkpoints/latest.json", "val_top1_ema")):
        values = json.loads((run / name).read_text())
        del values[key]
        (run / name).write_text(json.dumps(values))
    # onion curate run again with --ema over such a checkpoint: the average starts from its weights.
    late = Trainer(replace(config, ema=0.99), resuming=True)
    assert late.resume()
    assert_same_weights(late.ema.module.state_dict(), late.model.state_dict())
    summary = train(saved_config(str(run)), resume=True)
    assert summary["epochs"] == 2 and "val_top1_ema" not in summary
    assert not list(run.rglob(EMA_FILE))
    assert len(metrics_of(run)) == 2 and "val_top1_ema" not in metrics_of(run)[0]


@pytest.mark.parametrize("command", ["train", "curate"])
@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_a_decay_outside_0_to_1_is_refused_in_one_line(tmp_path, capsys, command, value):
    code = main([command, str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--ema", value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"onion {command}: error: ") and "--ema" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
