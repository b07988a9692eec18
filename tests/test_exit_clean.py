"""The README's "Read it" snippet exits cleanly, every time.

A short script that read the index used to abort at interpreter exit ("terminate called without
an active exception", exit 134) in a sizeable fraction of runs: pyarrow released buffers wrapping
Python objects on its own pool threads while the interpreter was finalizing (see
``shards.index.parquet_bytes_to_table``). The crash is a race, so the snippet runs many times.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from helpers import write_direct_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = 20
PARALLEL = 2  # the imports (torch) dominate; two at a time keeps the test well under a minute

# The README's second "Read it" snippet, pointed at a test dataset.
SNIPPET = """
import sys
import duckdb
import webdataset as wds
from shards import read_example
root, count = sys.argv[1], int(sys.argv[2])
samples = list(wds.WebDataset(root + "/train-{000000..000002}.tar", shardshuffle=False).decode("pil"))
assert len(samples) == count, len(samples)
rows = duckdb.sql(f"select class_name, count(*) from '{root}/index.parquet' group by 1").fetchall()
assert sum(n for _, n in rows) == count, rows
assert read_example(root, "ex-00123").image.startswith(b"\\x89PNG")
"""


def test_read_snippet_exits_cleanly_every_time(tmp_path):
    root = str(tmp_path / "ds")
    truth = write_direct_dataset(root, [60, 60, 40])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}

    def run(_: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", SNIPPET, root, str(len(truth))], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=180)

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(run, range(RUNS)))
    bad = [(r.returncode, r.stderr[-600:]) for r in results if r.returncode != 0 or "terminate called" in r.stderr]
    assert not bad, f"{len(bad)} of {RUNS} runs did not exit cleanly; first: exit {bad[0][0]}\n{bad[0][1]}"
