"""Cleaning up temporaries: a killed writer's are removed, a live writer's are left alone (two twin
ingests used to delete each other's in-flight temporaries, and one failed renaming its shard)."""
import os
import subprocess
import time

from shards import location
from shards.urls import STALE_AFTER_SECONDS, TEMP_MARKER


def test_only_temporaries_of_writers_that_are_gone_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])  # a process that has surely exited (and been reaped) below
    gone.wait()
    names = {"live": f"a.tar{TEMP_MARKER}{os.getpid()}-0123abcd",
             "dead": f"b.tar{TEMP_MARKER}{gone.pid}-0123abcd",
             "old": f"c.tar{TEMP_MARKER}{os.getpid()}-4567abcd"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    hours_ago = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(tmp_path / names["old"], (hours_ago, hours_ago))  # a live pid this old was reused
    removed = location(str(tmp_path)).remove_stale_temporaries()
    assert removed == 2 and sorted(p.name for p in tmp_path.iterdir()) == [names["live"]]
