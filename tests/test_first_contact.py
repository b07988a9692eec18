"""What a new user hits in the first hour: values checked where they enter, a failed command that
does not lock its output, Ctrl-C, inspecting a key, a fast ``--help``."""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import ONION, onion, onion_ok

TINY = ["--epochs", "1", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
        "--batch-size", "64", "--loader-workers", "0"]


@pytest.mark.parametrize("args, option", [
    (["select", "DATA", "--keep", "1.5"], "--keep"),
    (["select", "DATA", "--keep", "0"], "--keep"),
    (["select", "DATA", "--hard-cut", "1"], "--hard-cut"),
    (["select", "DATA", "--remove-n", "-3"], "--remove-n"),
    (["curate", "DATA", "--out", "RUN", "--keep", "1.0"], "--keep"),
    (["curate", "DATA", "--out", "RUN", "--round-epochs", "0"], "--round-epochs"),
    (["ingest", "synthetic", "OUT", "--dup-rate", "1.5"], "--dup-rate"),
    (["ingest", "synthetic", "OUT", "--val-fraction", "-0.1"], "--val-fraction"),
    (["ingest", "synthetic", "OUT", "--flip-rate", "nan"], "--flip-rate"),
    (["train", "DATA", "--out", "RUN", "--token-keep", "1.5"], "--token-keep"),
    (["train", "DATA", "--out", "RUN", "--attn-keep", "0"], "--attn-keep"),
    (["train", "DATA", "--out", "RUN", "--drop-path", "1.0"], "--drop-path"),
    (["train", "DATA", "--out", "RUN", "--label-smoothing", "-0.1"], "--label-smoothing"),
    (["train", "DATA", "--out", "RUN", "--epochs", "0"], "--epochs"),
    (["train", "DATA", "--out", "RUN", "--lr", "-1"], "--lr"),
    (["curate", "DATA", "--out", "RUN", "--token-keep", "2"], "--token-keep"),
])
def test_out_of_range_values_exit_2_naming_the_option(tmp_path, args, option):
    result = onion(*[str(tmp_path / a) if a in ("DATA", "OUT", "RUN") else a for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert option in lines[0] and lines[0].startswith(f"onion {args[0]}: error:"), lines[0]
    assert not (tmp_path / "RUN").exists() and not (tmp_path / "OUT").exists()  # nothing claimed


@pytest.mark.slow
def test_a_failed_train_does_not_lock_its_output(digits, tmp_path):
    run = tmp_path / "run"
    missing = onion("train", tmp_path / "nope", "--out", run, *TINY)
    assert missing.returncode == 2 and "no such dataset" in missing.stderr
    assert not (run / "config.json").exists()
    bad_value = onion("train", digits, "--out", run, *TINY, "--token-keep", "1.5")
    assert bad_value.returncode == 2 and "--token-keep" in bad_value.stderr
    not_a_dataset = tmp_path / "folder"
    not_a_dataset.mkdir()
    (not_a_dataset / "notes.txt").write_text("hello")
    foreign = onion("train", not_a_dataset, "--out", run, *TINY)
    assert foreign.returncode == 2 and "not an onion dataset" in foreign.stderr, foreign.stderr
    onion_ok("train", digits, "--out", run, *TINY)
    finished = onion_ok("train", "--resume", run)
    assert "is finished" in finished.stdout


@pytest.mark.slow
def test_a_failed_curate_does_not_lock_its_output(digits, tmp_path):
    run = tmp_path / "run"
    curate = ["--rounds", "2", "--round-epochs", "2", "--remove-n", "50", *TINY[2:], "--ray-cpus", "1"]
    missing = onion("curate", tmp_path / "nope", "--out", run, *curate)
    assert missing.returncode == 2 and "no such dataset" in missing.stderr and "Traceback" not in missing.stderr
    assert not run.exists() or not any(run.iterdir())
    onion_ok("curate", digits, "--out", run, *curate, timeout=900)
    resumed = onion("train", "--resume", run)
    assert resumed.returncode == 2 and "curation run" in resumed.stderr and "onion curate" in resumed.stderr


def session_members(session: int) -> list[int]:
    """Live processes of ``session`` (the command's own and every process it started, Ray's included)."""
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getsid(process.pid) == session and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def interrupt(command: list[str], at: str, counter: Path) -> tuple[subprocess.Popen, str]:
    """Run ``command`` in a session of its own and press Ctrl-C (SIGINT to its process group, as a terminal
    would) right after the first write boundary whose line contains ``at`` (see shards.faults): the job
    is under way there by construction, whatever the machine's load."""
    environment = {**os.environ, "ONION_FAULT_COUNTER": str(counter), "ONION_FAULT_MATCH": at,
                   "ONION_FAULT_AT": "1", "ONION_FAULT_SIGNAL": "INT"}
    process = subprocess.Popen([*ONION, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env=environment)
    _, stderr = process.communicate(timeout=600)
    return process, stderr


def assert_no_survivors(session: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = session_members(session)
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes left behind after Ctrl-C: {alive}")


@pytest.mark.slow
@pytest.mark.parametrize("job", ["ingest", "train", "curate"])
def test_ctrl_c_ends_with_one_line_and_130_and_the_same_command_completes(digits, tmp_path, job):
    out = tmp_path / "out"
    commands = {  # (command, the write boundary right after which Ctrl-C is pressed)
        "ingest": (["ingest", "synthetic", out, "--count", "3000", "--image-size", "16", "--shard-size", "50",
                    "--ray-cpus", "1"], f"rename {out}/_parts/"),
        "train": (["train", digits, "--out", out, *TINY[:1], "3", *TINY[2:]], f"rename {out}/metrics.csv"),
        "curate": (["curate", digits, "--out", out, "--rounds", "2", "--round-epochs", "2", "--remove-n", "50",
                    *TINY[2:], "--ray-cpus", "1"], f"rename {out}/metrics.csv"),
    }
    command, at = commands[job]
    counter = tmp_path / "boundaries"
    process, stderr = interrupt([str(part) for part in command], at, counter)
    assert any(at in line for line in counter.read_text().splitlines()), "the Ctrl-C point was never reached"
    # progress bars (and per-epoch lines) may precede it; the interruption itself is one line
    lines = [line for line in stderr.strip().splitlines()
             if not re.search(r"\d+%\||: epoch \d+/\d+ ", line) and line.strip()]
    assert process.returncode == 130, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"onion {job}: interrupted;"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert_no_survivors(process.pid)
    if job == "ingest":
        assert not (out / "manifest.json").exists()  # nothing partial looks complete
    again = ["train", "--resume", out] if job == "train" else command
    onion_ok(*again, timeout=900)


def test_inspect_a_val_key_says_what_it_is(digits):
    from shards import location, read_index

    index = read_index(location(digits), columns=["key", "split", "label"]).to_pylist()
    val = next(row for row in index if row["split"] == "val")
    shown = json.loads(onion_ok("inspect", digits, "--key", val["key"], "--format", "json").stdout)
    assert shown["split"] == "val" and shown["label"] == val["label"] and shown["status"] == "ok"
    assert "never" in shown["note"] or "only ever choose among train" in shown["note"]
    assert shown["lineage"] == []  # no selection has decided about it
    table = onion_ok("inspect", digits, "--key", val["key"]).stdout
    assert val["key"] in table and "val" in table
    unknown = onion("inspect", digits, "--key", "no-such-key")
    assert unknown.returncode == 2 and unknown.stderr.strip().endswith("no example with key 'no-such-key'")


def test_inspect_modes_are_mutually_exclusive(digits):
    result = onion("inspect", digits, "--sql", "select 1", "--selection", "v0001")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_help_imports_neither_torch_nor_ray():
    code = ("import sys\nfrom pipeline.cli import build_parser, chosen_command\n"
            "for argv in ([], ['inspect'], ['verify']):\n"
            "    build_parser(only=chosen_command(argv)).format_help()\n"
            "print(sorted(m for m in ('torch', 'ray', 'timm') if m in sys.modules))")
    result = subprocess.run([ONION[0], "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    started = time.perf_counter()
    onion_ok("--help")
    onion_ok("inspect", "--help")
    assert time.perf_counter() - started < 4  # two interpreter starts; each well under a second here


def test_a_read_example_can_be_shown(digits):
    from shards import location, read_example, read_index

    key = read_index(location(digits), columns=["key"])["key"][0].as_py()
    picture = read_example(digits, key).to_pil()
    assert picture.size == (8, 8)
