"""``benchmarks/scale.py --quick``: every step (one rank's reader in each mode, per-epoch pruning's planning
among them, select, score loss on Ray actors, report, inspect --key) runs on both smoke sizes, and every
figure it reports is a positive number."""

import pytest

from helpers import run_quick_benchmark

READER_MODES = {"import", "plain", "restrict", "prune", "restrict-none", "selection"}


def numbers(value, path=""):
    """Every number in a JSON value, with where it is (booleans are not figures)."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from numbers(item, f"{path}.{name}")
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from numbers(item, f"{path}[{position}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.mark.slow  # about a minute on 2 cores: 16 fresh processes, most of them importing torch
def test_quick_run_measures_every_step_with_positive_figures(tmp_path):
    out = tmp_path / "bench"
    report = run_quick_benchmark("scale.py", out, timeout=600)
    assert report["quick"] and (out / "results.md").read_text().startswith("# onion at scale")
    assert [size["rows"] for size in report["sizes"]] == [20_000, 200_000]
    for size in report["sizes"]:
        assert size["shards"] == size["rows"] // 2000
        assert set(size["reader"]) == READER_MODES
        for step in [*size["reader"].values(), size["select"], size["score"], size["report"],
                     size["inspect_key_lookup"]]:
            assert not step.get("timed_out") and step["seconds"] > 0 and step["peak_rss_mib"] > 0, step
        for mode in READER_MODES - {"import"}:
            assert size["reader"][mode]["to_first_batch_seconds"] > 0
        # rank 0 planned its share of a pruned epoch with 63 ranks beside it, and left some out
        prune = size["reader"]["prune"]
        assert prune["plan_seconds"] > 0 and 0 < prune["left_out"] < size["rows"]
        assert prune["examples_this_rank"] < size["reader"]["plain"]["examples_this_rank"]
        assert set(size["bytes_per_example"]) == {"index", "index_unique_sha256", "scores_random", "manifest",
                                                  "selection", "index_scores_selection"}
        assert size["index_parts"] == size["shards"]
        # the reader holds no index rows until it reads a shard, with a (partitioned) selection too
        for mode in ("plain", "restrict-none", "selection"):
            assert size["reader"][mode]["arrow_bytes_after_construct_mib"] == 0
        for where, value in numbers(size):
            if not where.endswith("arrow_bytes_after_construct_mib"):
                assert value > 0, f"{size['rows']} rows: {where} = {value}"
    assert not list(out.glob("data-*")), "the synthetic datasets are deleted unless --keep-data"
