"""The rest of onion on a dataset indexed in place (``onion ingest wds:PATTERN OUT --in-place``): inspect,
score, select (with dedup), report and verify work on it as on a copy, stock ``webdataset`` reads the same
keys and bytes from the source shards as onion does, and ``onion materialize --keys`` gives the survivors
of a selection to a stock webdataset pipeline without copying anything."""
import json
import warnings

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from helpers import files_of, onion_ok
from pipeline.curation.materialize import kept_keys_by_shard
from pipeline.curation.scoring import read_scores
from shards import ShardDataset, location, read_example, read_index, read_manifest
from shards.selections import kept_keys, read_selection
from test_ingest_in_place import index_in_place, make_source
from test_ingest_wds import photo, run_ingest, tar_bytes, zoo  # noqa: F401 - zoo is a fixture

IMAGE_EXTENSIONS = ("jpg", "png", "webp")


@pytest.fixture(scope="module")
def datasets(ray_local, zoo, tmp_path_factory):  # noqa: F811
    """(source folder, its files before, the in-place dataset, a copy-ingest of the same shards): the zoo's
    shards (a duplicate key, a truncated tar, PAX and GNU long names) and one more whose two images are
    exact copies of two others under new keys, for the grouping scorers."""
    root = tmp_path_factory.mktemp("in-place-commands")
    source = make_source(root / "source", zoo)
    (source / "shard-000006.tar").write_bytes(tar_bytes([("d0000.jpg", photo(0)), ("d0000.cls", b"0"),
                                                         ("d0001.png", photo(1, "PNG")), ("d0001.cls", b"1")]))
    before = files_of(source)
    index_in_place(f"{source}/*.tar", root / "out")
    run_ingest(f"wds:{source}/*.tar", root / "copy")
    return source, before, root / "out", root / "copy"


def stock_webdataset(urls: list[str], kept: dict | None = None) -> dict[tuple[str, str], bytes]:
    """``(__url__, __key__) -> image bytes`` as a stock webdataset pipeline reads them (filtered by ``kept``
    as docs/reading.md shows). The zoo's truncated tar ends its shard with a warning, not an exception."""
    pipeline = wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue)
    if kept is not None:
        pipeline = pipeline.select(lambda sample: sample["__key__"] in kept[sample["__url__"]])
    seen = {}
    for sample in pipeline:
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        assert (sample["__url__"], sample["__key__"]) not in seen
        seen[sample["__url__"], sample["__key__"]] = image
    return seen


def ok_rows(dataset) -> list[dict]:
    return [row for row in read_index(location(str(dataset))).to_pylist() if row["status"] == "ok"]


def test_stock_webdataset_reads_the_keys_and_bytes_onion_reads(datasets):
    source, _, out, _ = datasets
    urls = [str(path) for path in sorted(source.glob("*.tar"))]
    with pytest.warns(UserWarning):  # shard-000003.tar is cut mid-member
        theirs = stock_webdataset(urls)
    rows = ok_rows(out)
    assert len(rows) == 14
    for row in rows:
        wds_key = row["source_ref"][len(row["shard"]) + 1:-1]
        assert theirs[str(source / row["shard"]), wds_key] == read_example(str(out), row["key"]).image, row


@pytest.mark.slow  # ~20 s: score, select and materialize --keys (three onion processes), then webdataset
def test_kept_keys_filter_a_stock_webdataset_pipeline(datasets, tmp_path):
    source, before, out, copy = datasets
    onion_ok("score", out, "random", timeout=120)
    result = onion_ok("select", out, "--scores", "random", "--keep", "0.5", timeout=120)
    version = result.stdout.split("selections/")[1][:5]
    result = onion_ok("materialize", out, "--selection", version, "--keys", tmp_path / "kept" / version, timeout=120)
    assert "kept keys" in result.stdout and not (out / "kept").exists() and files_of(source) == before
    kept = {url: set(keys) for url, keys in json.loads((tmp_path / "kept" / f"{version}.json").read_text()).items()}
    assert sorted(kept) == [str(path) for path in sorted(source.glob("*.tar"))]  # every shard, as __url__
    table = pq.read_table(tmp_path / "kept" / f"{version}.parquet")
    assert table.column_names == ["shard", "wds_key", "key"]
    onion_key = {(row["shard"], row["wds_key"]): row["key"] for row in table.to_pylist()}
    chosen = set(kept_keys(location(str(out)), version).to_pylist())
    assert set(onion_key.values()) == chosen == set(ShardDataset(str(out), selection=version).keys())
    assert 0 < len(chosen) < 14

    with warnings.catch_warnings():  # shard-000003.tar, cut mid-member, warns if it is read
        warnings.simplefilter("ignore", UserWarning)
        theirs = stock_webdataset([url for url, keys in kept.items() if keys], kept)
    assert set(theirs) == set(onion_key)
    for (url, key), image in theirs.items():
        assert image == read_example(str(out), onion_key[url, key]).image
    again = tmp_path / "again" / version
    onion_ok("materialize", out, "--selection", version, "--keys", again, timeout=120)
    for suffix in (".json", ".parquet"):  # the same selection, the same bytes
        assert (tmp_path / "kept" / f"{version}{suffix}").read_bytes() == again.with_suffix(suffix).read_bytes()

    # onion's own shards: __url__ the copy's shards, __key__ the onion key
    copy_version = onion_ok("select", copy, "--strategy", "random", "--keep", "0.5", timeout=120)
    copy_version = copy_version.stdout.split("selections/")[1][:5]
    table, by_shard = kept_keys_by_shard(str(copy), copy_version)
    assert table["wds_key"].to_pylist() == table["key"].to_pylist()
    shards = read_manifest(location(str(copy)))["shards"]
    assert list(by_shard) == sorted(str(copy / entry["name"]) for entry in shards)
    theirs = stock_webdataset([url for url, keys in by_shard.items() if keys], by_shard)
    assert {key for _, key in theirs} == set(kept_keys(location(str(copy)), copy_version).to_pylist())


@pytest.mark.slow
def test_score_select_inspect_report_and_verify_work_in_place(datasets, tmp_path):
    source, before, out, copy = datasets
    onion_ok("verify", out, timeout=120)
    assert "shard-000006.tar" in onion_ok("inspect", out, timeout=120).stdout
    for scorer in ("phash", "exact"):
        onion_ok("score", out, scorer, "--ray-cpus", "1", timeout=180)
    onion_ok("score", copy, "phash", "--ray-cpus", "1", timeout=180)
    in_place = read_scores(location(str(out)), "phash")
    # the same groups, sizes, representatives, distances and hashes; a group's id is its representative's
    # row in the index, and the copy's index (other shards) has its rows elsewhere
    assert in_place.drop_columns(["group"]).equals(read_scores(location(str(copy)), "phash").drop_columns(["group"]))
    id_of = dict(zip(in_place["representative"].to_pylist(), in_place["group"].to_pylist()))
    assert len(set(id_of.values())) == len(id_of)  # one id per group, and each group's members share it
    assert all(id_of[representative] == group for representative, group in
               zip(in_place["representative"].to_pylist(), in_place["group"].to_pylist()))
    assert in_place.num_rows == 14 - sum(row["split"] == "val" for row in ok_rows(out))

    onion_ok("score", out, "random", timeout=120)
    result = onion_ok("select", out, "--dedup", "exact", "--scores", "random", "--keep", "0.9", timeout=120)
    version = result.stdout.split("selections/")[1][:5]
    selection = read_selection(location(str(out)), version).to_pylist()
    keys = {row["source_ref"]: row["key"] for row in ok_rows(out)}
    reasons = {row["key"]: row["reason"] for row in selection}
    for ref in ("s0000", "s0001"):  # d000N holds s000N's image again: dropped as its copy
        assert reasons[keys[f"shard-000006.tar[d{ref[1:]}]"]] == f"duplicate-of:{keys[f'shard-000000.tar[{ref}]']}"
    result = onion_ok("inspect", out, "--groups", "exact", "--grid", tmp_path / "groups.png", timeout=120)
    assert Image.open(tmp_path / "groups.png").size[0] > 0
    onion_ok("inspect", out, "--selection", version, "--grid", tmp_path / "grid.png", timeout=120)
    assert Image.open(tmp_path / "grid.png").size[0] > 0

    onion_ok("report", out, "--out", tmp_path / "page", timeout=180)
    thumbnails = list((tmp_path / "page" / "thumbs").glob("*.png"))
    assert (tmp_path / "page" / "index.html").exists() and len(thumbnails) == 14  # OUT holds no shards to read
    assert sorted(p.name for p in out.iterdir()) == ["index", "manifest.json", "scores", "selections"]
    assert files_of(source) == before
