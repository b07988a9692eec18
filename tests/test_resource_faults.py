"""Resource faults end in a clean error or a retry, never a silently wrong result: a disk that fills
up while shards are written (a kernel file-size quota, RLIMIT_FSIZE), and a DDP rank killed mid-run.
Object-store faults mid-upload are in test_object_store.py, a Ray worker killed mid-task in
test_curation.py."""
import os
import resource
import signal
import subprocess
import sys
import time

import psutil

from shards.verify import verify_dataset

ONION = [sys.executable, "-m", "pipeline"]
INGEST = ["ingest", "synthetic", "--count", "400", "--image-size", "32", "--shard-size", "100", "--workers", "1"]


def small_disk(limit_bytes: int):
    """In the child: no file may grow past ``limit_bytes`` (writes then fail with EFBIG, like ENOSPC)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_disk_full_while_writing_shards_is_a_clean_error_and_a_rerun_completes(tmp_path):
    out = tmp_path / "out"
    full = subprocess.run([*ONION, INGEST[0], INGEST[1], str(out), *INGEST[2:]], capture_output=True, text=True,
                          timeout=600, preexec_fn=small_disk(64 << 10))  # each shard is ~300 KB
    assert full.returncode == 1, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"onion ingest: error: {out}") and "File too large" in last, full.stderr[-3000:]
    assert not (out / "manifest.json").exists()  # nothing claims to be complete
    shards = [p for p in out.glob("*.tar")] if out.exists() else []
    assert shards == []  # no shard under its final name (temporaries only)
    rerun = subprocess.run([*ONION, INGEST[0], INGEST[1], str(out), *INGEST[2:]], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert verify_dataset(str(out))[1] == []
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the failed run's temporaries are gone


def test_a_killed_ddp_rank_stops_the_run_with_a_clear_error(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    subprocess.run([*ONION, "ingest", "digits", str(data), "--workers", "1"], check=True, capture_output=True, timeout=600)
    command = [*ONION, "train", str(data), "--out", str(run), "--nproc", "2", "--epochs", "50", "--depth", "2",
               "--embed-dim", "32", "--num-heads", "2", "--workers", "0", "--batch-size", "16"]
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
    assert stderr.strip().splitlines()[-1].startswith(f"onion train: error: {run}: training process"), stderr[-3000:]
    assert f"--resume {run}" in stderr
