"""How a scoring actor finds its keys' rows in the dynamics: the binary search over Python strings that
forgetting and loss used, against the Arrow hash lookup they use now (the same codes, checked).

    .venv/bin/python benchmarks/key_lookup.py [--keys 5000000] [--repeats 2]

An actor at 10^7 examples on 2 CPUs holds 5M keys (ingest-like, 26 characters) and looks up twice as
many presentations (keys drawn at random). Prints each way's median seconds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from pipeline.curation.scoring.dynamics_scores import _codes, sorted_keys_of


def python_strings(keys: list[str], presented: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The earlier way: sorted in Python, each presentation placed by a binary search of string comparisons."""
    ordered = np.array(sorted(keys), dtype=object)
    values = np.asarray(presented.to_numpy(zero_copy_only=False), dtype=object)
    codes = np.searchsorted(ordered, values)
    known = (codes < len(ordered)) & (ordered[np.minimum(codes, len(ordered) - 1)] == values)
    return ordered, codes, known


def arrow_lookup(keys: list[str], presented: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ordered = sorted_keys_of(pa.array(keys, pa.string()))
    codes, known = _codes(ordered, presented)
    return ordered, codes, known


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=5_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    keys = [f"{i % 5000:05d}-{i:09d}-{rng.integers(1 << 40):010x}" for i in range(args.keys)]
    presented = pa.chunked_array([pa.array([keys[i] for i in rng.integers(0, args.keys, 2 * args.keys)], pa.string())])
    seconds: dict[str, list[float]] = {"python strings": [], "arrow lookup": []}
    for _ in range(args.repeats):
        for name, way in (("python strings", python_strings), ("arrow lookup", arrow_lookup)):
            start = time.perf_counter()
            way(keys, presented)
            seconds[name].append(time.perf_counter() - start)
    before, after = python_strings(keys, presented), arrow_lookup(keys, presented)
    same = ((before[0] == after[0]).all() and (before[2] == after[2]).all()
            and (before[1][before[2]] == after[1][after[2]]).all())
    for name, values in seconds.items():
        print(f"{name}: {statistics.median(values):.1f} s (median of {len(values)})")
    print(f"the same sorted keys and codes: {bool(same)}")


if __name__ == "__main__":
    main()
