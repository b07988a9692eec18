"""Resource faults end in a clean error or a retry, never a silently wrong result: a disk (a small
tmpfs) that fills up while shards are written or has no room for the virtualenv, and a DDP rank
killed mid-run.
Object-store faults mid-upload are in test_object_store.py, a Ray worker killed mid-task in
test_curation.py."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import ONION, onion, onion_ok
from shards.verify import verify_dataset

pytestmark = pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out

INGEST = ["ingest", "synthetic", "--count", "500", "--image-size", "32", "--shard-size", "100", "--ray-cpus", "1"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 1 MiB tmpfs (needs CAP_SYS_ADMIN, which root in a container usually has)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_full_while_writing_shards_is_a_clean_error_and_a_rerun_completes(small_filesystem):
    out = small_filesystem / "out"
    command = [*INGEST[:2], out, *INGEST[2:]]  # ~1.5 MB of shards for 1 MiB of disk
    full = onion(*command, timeout=600)
    assert full.returncode == 1, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("onion ingest: error:")]
    assert errors and str(out) in errors[0] and "No space left on device" in errors[0], full.stderr[-3000:]
    assert not (out / "manifest.json").exists()  # nothing claims to be complete
    written = sorted(out.glob("*.tar"))
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_filesystem)], check=True)
    rerun = onion(*command, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert verify_dataset(str(out))[1] == []
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no half-written temporaries left behind
    assert all(shard.read_bytes() == (out / shard.name).read_bytes() for shard in written)


def test_setup_without_room_for_the_virtualenv_refuses_before_installing(small_filesystem):
    checkout = small_filesystem / "checkout"
    checkout.mkdir()
    for name in ("run.sh", "pyproject.toml"):
        shutil.copy2(Path(__file__).parent.parent / name, checkout / name)
    setup = subprocess.run(["./run.sh", "test"], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert setup.returncode == 1, setup.stderr[-3000:]
    assert f"error: {checkout}/.venv needs about 8 GB free" in setup.stderr, setup.stderr[-3000:]
    assert "only 0 GB is free" in setup.stderr
    assert not (checkout / ".venv").exists()  # refused before pip started, nothing half-installed


def test_a_killed_ddp_rank_stops_the_run_with_a_clear_error(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    onion_ok("ingest", "digits", data, "--ray-cpus", "1", timeout=600)
    command = [*ONION, "train", str(data), "--out", str(run), "--nproc", "2", "--epochs", "50", "--depth", "2",
               "--embed-dim", "32", "--num-heads", "2", "--loader-workers", "0", "--batch-size", "16"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.csv").exists():  # the ranks are training
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    ranks = [child for child in psutil.Process(process.pid).children(recursive=True)
             if "spawn_main" in " ".join(child.cmdline())]
    assert len(ranks) >= 2, [child.cmdline() for child in ranks]
    os.kill(ranks[-1].pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)  # no hang: the other rank is stopped
    assert process.returncode == 2, stderr[-3000:]
    assert any(line.startswith(f"onion train: error: {run}: training process") for line in stderr.splitlines()), \
        stderr[-3000:]
    assert f"--resume {run}" in stderr
