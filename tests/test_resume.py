"""``onion train --resume RUN``: the folder given is the run (a copy resumes into the copy), options
given with it follow one rule (applied and recorded, or refused naming them), a larger --epochs
extends the run, and the advice after a Ctrl-C is the one that works in the state the run is in."""
import json
import math
import os
import shutil
import signal
import subprocess
from dataclasses import replace

import pytest

from helpers import ONION, assert_same_weights, files_of, last_weights, onion_ok, saved_config_of
from pipeline.cli import main
from trainer.config import TrainConfig
from trainer.launch import train
from trainer.loop import Trainer
from trainer.resume import APPLIED_ON_RESUME, record_resume, resumed_config, saved_config
from trainer.schedule import lr_factor

SMALL = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4", "--batch-size", "64",
         "--loader-workers", "0", "--token-keep", "0.5", "--token-blocks", "0", "--warmup-epochs", "0.5"]


def test_a_copied_run_folder_resumes_into_the_copy_and_extends(digits, tmp_path):
    original, copy = tmp_path / "run", tmp_path / "copy"
    onion_ok("train", digits, "--out", original, "--epochs", "1", *SMALL)
    shutil.copytree(original, copy)
    before = files_of(original)
    resumed = onion_ok("train", "--resume", copy, "--epochs", "2", "--eval-every", "2")
    assert files_of(original) == before  # the original run is untouched
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["config"]["out"] == str(copy)
    # config.json is written once (as the run started); the configuration in force is the resume's
    assert json.loads((copy / "config.json").read_text()) == json.loads((original / "config.json").read_text())
    assert saved_config(str(copy)).out == str(copy) and saved_config(str(copy)).epochs == 2
    assert len((copy / "metrics.csv").read_text().splitlines()) == 3  # header + epochs 1 and 2
    history = [json.loads(line) for line in (copy / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["resumed_at"]["epoch"] == 1
    assert history[0]["changed"] == {"epochs": {"before": 1, "now": 2}, "eval_every": {"before": 1, "now": 2},
                                     "out": {"before": str(original), "now": str(copy)}}
    assert history[0]["config"] == saved_config(str(copy)).to_dict()
    assert "epochs 1 -> 2" in resumed.stdout and "eval_every 1 -> 2" in resumed.stdout
    finished = onion_ok("train", "--resume", copy)
    assert "is finished (2 of 2 epochs" in finished.stdout and "a larger --epochs extends it" in finished.stdout


@pytest.fixture(scope="module")
def finished_run(digits, tmp_path_factory):
    """A one-epoch run, finished; tests that only read it share it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    onion_ok("train", digits, "--out", run, "--epochs", "1", *SMALL)
    return run


@pytest.mark.parametrize("option, value", [
    ("--model", "vit_small_patch16_224"), ("--img-size", "16"), ("--patch-size", "2"), ("--token-keep", "0.7"),
    ("--attn-keep", "0.5"), ("--batch-size", "32"), ("--lr", "0.01"), ("--seed", "1"), ("--nproc", "2"),
    ("--amp", "bf16"), ("--loader-workers", "2"), ("--out", "ELSEWHERE"), ("dataset", "OTHER"),
])
def test_resume_refuses_what_would_change_what_the_run_learns(digits, finished_run, tmp_path, capsys, option, value):
    before = files_of(finished_run)
    if option == "dataset":
        shutil.copytree(digits, tmp_path / "other")  # a dataset that exists: refused for being another one
        given = [str(tmp_path / "other")]
    else:
        given = [option, str(tmp_path / value) if value == "ELSEWHERE" else value]
    code = main(["train", "--resume", str(finished_run), "--epochs", "2", *given])  # the CLI, in this process
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("onion train: error: ") and ("--dataset" if option == "dataset" else option) in lines[0]
    assert files_of(finished_run) == before  # nothing applied, nothing recorded


def test_the_same_values_and_the_dataset_however_written_are_not_changes(digits, finished_run):
    before = files_of(finished_run)
    again = onion_ok("train", f"file://{digits}", "--resume", finished_run, "--lr", "0.001", "--seed", "0",
                     "--epochs", "1", "--device", "cpu")
    assert "is finished" in again.stdout and files_of(finished_run) == before


def test_resume_options_are_the_ones_that_do_not_change_what_is_learned():
    assert set(APPLIED_ON_RESUME) == {"epochs", "device", "eval_every", "compile", "log_every", "progress_seconds",
                                      "checkpoint_every"}
    assert set(APPLIED_ON_RESUME) <= set(TrainConfig.options())


def test_fewer_epochs_are_refused(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--epochs", "1"]) == 0  # the same: nothing to resume
    assert main(["train", "--resume", str(finished_run), "--epochs", "0"]) == 2  # not even a length
    capsys.readouterr()
    recorded = (finished_run / "config.json").read_bytes()
    shorter = replace(saved_config(str(finished_run)), epochs=3)
    (finished_run / "config.json").write_text(json.dumps(shorter.to_dict()))  # as if it had been a 3-epoch run
    try:
        assert main(["train", "--resume", str(finished_run), "--epochs", "2"]) == 2
        assert "--epochs 2 is fewer than the run's 3" in capsys.readouterr().err
    finally:
        (finished_run / "config.json").write_bytes(recorded)


def test_an_extension_continues_the_learning_rate_from_where_it_was():
    base = TrainConfig(epochs=10, warmup_epochs=1, lr=1e-3, min_lr=1e-5)
    at = 6  # a run that stopped in epoch 5 extends from the next boundary
    extended = replace(base, epochs=20, extensions=[{"at_epoch": at, "lr_factor": lr_factor(base, at),
                                                     "epochs_before": 10}])
    for progress in (0.5, 1.0, 3.3, 5.99):  # before the extension: the schedule it ran on
        assert lr_factor(extended, progress) == lr_factor(base, progress)
    assert lr_factor(extended, at) == pytest.approx(lr_factor(base, at))  # continuous where it starts
    falling = [lr_factor(extended, at + k * 0.5) for k in range(29)]
    assert all(a > b for a, b in zip(falling, falling[1:]))  # a cosine down ...
    assert lr_factor(extended, 20) == pytest.approx(1e-2) and lr_factor(extended, 25) == pytest.approx(1e-2)  # to min
    assert extended.epochs_at(5) == 10 and extended.epochs_at(6) == 20
    finished = replace(base, epochs=15, extensions=[{"at_epoch": 10, "lr_factor": lr_factor(base, 10),
                                                     "epochs_before": 10}])
    assert all(lr_factor(finished, 10 + k) == pytest.approx(1e-2) for k in range(6))  # a finished run: at min_lr
    assert math.isclose(lr_factor(base, 10), 1e-2)


def test_resume_extends_mid_run_from_the_next_epoch_boundary(digits, tmp_path):
    run = tmp_path / "run"
    train(saved_config_of(digits, run, epochs=3, checkpoint_every=5))
    (run / "summary.json").unlink()
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["epoch"] == 3
    # Rewind the pointer to the mid-epoch checkpoint of epoch 2 (as if stopped there).
    mid = sorted((run / "checkpoints").glob("step-*"))[0].name
    position = {**latest, "step": int(mid.split("-")[1])}
    steps_per_epoch = latest["step"] // 3
    position.update(epoch=position["step"] // steps_per_epoch, batch=position["step"] % steps_per_epoch)
    assert position["batch"] > 0
    (run / "checkpoints" / "latest.json").write_text(json.dumps(position))
    config, changed = resumed_config(str(run), {"epochs": 5})
    assert changed == {"epochs": (3, 5)}
    assert config.extensions == [{"at_epoch": position["epoch"] + 1, "epochs_before": 3,
                                  "lr_factor": lr_factor(saved_config(str(run)), position["epoch"] + 1)}]


def test_an_extension_interrupted_at_an_epoch_boundary_ends_where_an_uninterrupted_one_does(digits, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for run in (whole, parts):
        train(saved_config_of(digits, run, epochs=2))
    config, changed = resumed_config(str(whole), {"epochs": 4})
    record_resume(config, changed, ["test"])
    train(config, resume=True)
    config, changed = resumed_config(str(parts), {"epochs": 4})
    record_resume(config, changed, ["test"])  # the resume's configuration, extension included, is recorded
    trainer = Trainer(config)
    trainer.resume()
    trainer.train(until_epoch=3)  # stopped after one added epoch
    trainer.loaders.clear()
    recorded = saved_config(str(parts))
    assert recorded.epochs == 4 and recorded.extensions == config.extensions
    train(recorded, resume=True)
    assert_same_weights(last_weights(whole), last_weights(parts))
    assert json.loads((parts / "summary.json").read_text())["epochs"] == 4


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_advises_what_works_and_it_does(digits, tmp_path):
    run = tmp_path / "run"
    # Batch 1: 1,468 steps in the epoch (digits' train split), a progress line each of over 100 bytes. The
    # test reads only the first line, so the pipe (64 KiB) fills long before the epoch could end: the
    # interrupt lands before any checkpoint.
    command = ["train", digits, "--out", str(run), *SMALL, "--epochs", "1", "--batch-size", "1",
               "--progress-seconds", "0"]
    process = subprocess.Popen([*ONION, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    first = process.stderr.readline()
    assert ": epoch 1/1  step " in first, first
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, rest[-3000:]
    advice = rest.strip().splitlines()[-1]
    assert advice == "onion train: interrupted; no checkpoint was written yet: run the same command again to " \
                     "start over", advice
    assert not (run / "checkpoints").exists()
    finished = onion_ok(*command, timeout=600)  # the advice, as printed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] == summary["train_images"] > 1000
    assert finished.stderr.count(": epoch 1/1  step ") == summary["steps"]  # --progress-seconds 0: every step


def test_piped_output_gets_progress_lines_within_an_epoch(digits, tmp_path):
    result = onion_ok("train", digits, "--out", tmp_path / "run", *SMALL, "--epochs", "1", "--progress-seconds", "0")
    lines = [line for line in result.stderr.splitlines() if ": epoch 1/1  step " in line]
    steps = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"]
    assert [line.split("step ")[1].split("/")[0] for line in lines] == [str(n) for n in range(1, steps + 1)]
    assert all(f"/{steps}  train loss " in line and " img/s" in line for line in lines)
    assert lines[0].startswith(f"{tmp_path / 'run'}: epoch 1/1  step 1/{steps}")
