"""One module names everything in a run folder (trainer/run_folder.py): no other module spells a run file's
name, and a real run holds nothing that module does not name."""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

from helpers import saved_config_of
from pipeline.curation.rounds import claim_run
from shards import UsageError, location
from trainer import run_folder
from trainer.errors import RunError
from trainer.launch import claim_run_directory, train
from trainer.resume import record_resume, resumed_config, saved_config

ROOT = Path(__file__).resolve().parent.parent
NAMES = {value for name, value in vars(run_folder).items() if name.isupper() and isinstance(value, str)}
NAME_PARTS = ("step-", "rng-r", "part-r")  # how the numbered names begin
# string constants equal to a run file's name that mean something else
ELSEWHERE = {("pipeline/curation/scoring/el2n.py", "checkpoints"): "a column of the el2n table: how many were averaged"}


def run_file_literals() -> list[tuple[str, int, str]]:
    found = []
    for top in ("trainer", "pipeline", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if where == "trainer/run_folder.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), where)):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                    continue
                if (node.value in NAMES or node.value.startswith(NAME_PARTS)) and (where, node.value) not in ELSEWHERE:
                    found.append((where, node.lineno, node.value))
    return found


def test_no_other_module_spells_a_run_files_name():
    assert run_file_literals() == []


def test_the_scan_finds_a_name_spelled_elsewhere(tmp_path, monkeypatch):
    """The scan itself can fail: a module that spells ``summary.json`` is found."""
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "stray.py").write_text('SUMMARY = "summary.json"\nname = f"step-{1:09d}"\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert run_file_literals() == [("trainer/stray.py", 1, "summary.json"), ("trainer/stray.py", 2, "step-")]


def patterns() -> list[re.Pattern]:
    """Every file a run may hold, as run_folder names it (paths relative to the run folder)."""
    numbered = {"step": re.escape(run_folder.step_folder(123456789)).replace("123456789", r"\d{9}"), "rank": r"\d+"}
    checkpoint = f"{run_folder.CHECKPOINTS}/{numbered['step']}"
    exact = [run_folder.CONFIG, run_folder.MODEL_JSON, run_folder.METRICS, run_folder.SUMMARY, run_folder.HISTORY,
             run_folder.CURATION, run_folder.EPOCH_SELECTIONS, f"{run_folder.CHECKPOINTS}/{run_folder.LATEST}"]
    return [re.compile(re.escape(name)) for name in exact] + [
        re.compile(f"{re.escape(run_folder.TENSORBOARD)}/.+"),
        re.compile(f"{checkpoint}/({re.escape(run_folder.MODEL_FILE)}|{re.escape(run_folder.EMA_FILE)}|"
                   f"{re.escape(run_folder.STATE_FILE)})"),
        re.compile(f"{checkpoint}/" + re.escape(run_folder.rng_file(7)).replace("7", numbered["rank"])),
        re.compile(f"{run_folder.DYNAMICS}/" + re.escape(run_folder.dynamics_part(7, 123456789)).replace(
            "123456789", r"\d{9}").replace("7", numbered["rank"])),
    ]


def test_a_run_holds_only_files_the_run_folder_module_names(digits, tmp_path):
    """A run with the model EMA and per-epoch pruning, resumed once with more epochs: every file it wrote is
    one run_folder names, and the names the run must write are there."""
    run = tmp_path / "run"
    train(saved_config_of(digits, run, epochs=1, ema=0.9, example_strategy="infobatch", prune_ratio=0.3))
    started = (run / run_folder.CONFIG).read_bytes()
    config, changed = resumed_config(str(run), {"epochs": 2})
    record_resume(config, changed, ["onion", "train", "--resume", str(run), "--epochs", "2"])
    train(config, resume=True)
    # config.json is written once; the resume's configuration is in the history, and is the one in force
    assert (run / run_folder.CONFIG).read_bytes() == started and json.loads(started)["epochs"] == 1
    assert saved_config(str(run)).epochs == 2 and run_folder.resumes(location(str(run)))[-1]["config"]["epochs"] == 2
    written = sorted(path.relative_to(run).as_posix() for path in run.rglob("*") if path.is_file())
    known = patterns()
    assert [name for name in written if not any(pattern.fullmatch(name) for pattern in known)] == []
    for name in (run_folder.CONFIG, run_folder.MODEL_JSON, run_folder.METRICS, run_folder.SUMMARY,
                 run_folder.HISTORY, run_folder.EPOCH_SELECTIONS, f"{run_folder.CHECKPOINTS}/{run_folder.LATEST}"):
        assert name in written
    assert any(name.endswith(run_folder.EMA_FILE) for name in written)
    assert any(name.startswith(run_folder.DYNAMICS + "/") for name in written)


def test_train_and_curate_claim_a_folder_the_same_way(tmp_path):
    """Both commands claim config.json; whichever comes first owns the folder, and the other is refused
    naming what is there (before, curate claimed curation.json and train config.json: both could start)."""
    config = saved_config_of("DATA", tmp_path / "curated")
    record = {"dataset": "DATA", "plan": {"rounds": 2}}
    assert claim_run(location(config.out), config, record)
    with pytest.raises(RunError, match="holds an onion curate run"):
        claim_run_directory(config, resume=False)
    assert not claim_run(location(config.out), config, record)  # the same curation again: resumed
    with pytest.raises(UsageError, match="holds a curation with other settings"):
        claim_run(location(config.out), config, {**record, "plan": {"rounds": 3}})

    config = saved_config_of("DATA", tmp_path / "trained")
    assert claim_run_directory(config, resume=False)
    with pytest.raises(UsageError, match="already holds a training run"):
        claim_run(location(config.out), config, record)
    with pytest.raises(RunError, match="already holds a run"):
        claim_run_directory(config, resume=False)
    assert not (tmp_path / "trained" / run_folder.CURATION).exists()
