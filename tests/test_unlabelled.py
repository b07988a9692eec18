"""Unlabelled data (LAION/DataComp-style shards: images with captions, no classes) are a first-class
dataset: the label column is null, nothing is quarantined for lack of a label, the grouping scorers and
``select --dedup`` work on it, a report is built, and whatever learns labels (``onion train``, the
``loss``/``forgetting``/``el2n`` scores) refuses it in one line naming what it needs."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from helpers import files_of, onion, onion_ok
from pipeline.curation.materialize import kept_url
from pipeline.curation.scoring import read_scores
from pipeline.ingest.sources import SourceError, SourceOptions, open_source
from shards import ShardDataset, location, read_example, read_index, read_manifest
from shards.selections import read_selection
from test_ingest_wds import photo, tar_bytes, zoo  # noqa: F401 - zoo is a fixture

CAPTIONS = ["a temple", "a flower", "the temple again", "a third view", "a fourth view", "a fifth view"]


def laion_shard(first: int, images: list[bytes], extra: list[tuple[str, bytes]] = ()) -> bytes:
    """A tar in img2dataset's member order and names (``000000012.jpg``, ``.json``, ``.txt``), no ``.cls``."""
    members = []
    for number, image in enumerate(images, start=first):
        key = f"{number:09d}"
        members += [(f"{key}.jpg", image),
                    (f"{key}.json", json.dumps({"key": key, "url": f"https://example.com/{key}.jpg",
                                                "caption": CAPTIONS[number % len(CAPTIONS)]}).encode()),
                    (f"{key}.txt", CAPTIONS[number % len(CAPTIONS)].encode())]
    return tar_bytes(members + list(extra))


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """Two shards of six samples: 000000002 is an exact copy of 000000000's image, and one sample's image
    member is not an image (quarantined: a reason other than a missing label)."""
    folder = tmp_path_factory.mktemp("laion")
    (folder / "00000.tar").write_bytes(laion_shard(0, [photo(0), photo(1), photo(0)]))
    (folder / "00001.tar").write_bytes(laion_shard(3, [photo(3), photo(4), b"not an image at all"]))
    return folder


@pytest.fixture(scope="module")
def ingested(ray_local, laion, tmp_path_factory):
    """(copy-ingested dataset, in-place dataset, the source's files before): both by the CLI."""
    root = tmp_path_factory.mktemp("unlabelled")
    before = files_of(laion)
    copied = onion_ok("ingest", f"wds:{laion}/{{00000..00001}}.tar", root / "copy", "--ray-cpus", "1", timeout=240)
    in_place = onion_ok("ingest", f"wds:{laion}/*.tar", root / "in-place", "--in-place", "--ray-cpus", "1",
                        timeout=240)
    for result in (copied, in_place):
        assert "inputs=6 ok=5 quarantined=1" in result.stdout, result.stdout
        assert "unlabelled: no sample has a .cls member (give --label-field NAME" in result.stdout, result.stdout
    return root / "copy", root / "in-place", before


def test_records_have_no_label_and_only_real_problems_are_quarantined(laion):
    source = open_source(f"wds:{laion}/*.tar")
    records = source.records()
    assert source.labelled is False and source.class_names == []
    assert [r.label for r in records] == [None] * 6
    assert [r.quarantine for r in records] == [None] * 6  # the non-image is found when it is loaded
    assert records[1].extra["caption"] == "a flower"


@pytest.mark.parametrize("form", ["copy", "in-place"])
def test_the_dataset_is_written_unlabelled(ingested, form):
    dataset = ingested[0] if form == "copy" else ingested[1]
    manifest = read_manifest(location(str(dataset)))
    assert manifest["labelled"] is False and manifest["class_names"] == []
    assert manifest["accounting"] == {"inputs": 6, "ok": 5, "quarantined": 1}
    assert manifest["counts"]["by_class"] == {}
    index = read_index(location(str(dataset))).to_pylist()
    assert [row["label"] for row in index] == [None] * 6 and {row["class_name"] for row in index} == {None}
    assert [row["reason"] for row in index if row["status"] != "ok"] == ["not an image (no known image format)"]
    assert all(row["cls_offset"] is None for row in index)
    reader = ShardDataset(str(dataset), "train", seed=0)
    labels = {label for _, label, _ in reader}
    assert labels == {-1}  # the reader's label for "none"
    ok = next(row for row in index if row["status"] == "ok")
    example = read_example(str(dataset), ok["key"])
    assert example.label is None and example.image[:2] == b"\xff\xd8"
    onion_ok("verify", dataset, timeout=120)


def test_copied_shards_hold_no_cls_member_and_stock_webdataset_reads_them(ingested):
    copied = ingested[0]
    samples = list(wds.WebDataset([str(p) for p in sorted(copied.glob("*.tar"))], shardshuffle=False))
    assert len(samples) == 5 and all("cls" not in s and "jpg" in s for s in samples)
    assert {json.loads(s["json"])["caption"] for s in samples} >= {"a temple", "a flower"}


@pytest.mark.slow  # about a minute: three grouping scorers, a dedup and a report page
def test_grouping_scores_dedup_and_report_work(ingested, laion, tmp_path):
    copied, in_place, before = ingested
    for dataset in (copied, in_place):
        for scorer in ("exact", "phash"):
            onion_ok("score", dataset, scorer, "--ray-cpus", "1", timeout=180)
    index = {row["source_ref"]: row["key"] for row in read_index(location(str(in_place))).to_pylist()}
    exact = read_scores(location(str(in_place)), "exact").to_pylist()
    groups = {}
    for row in exact:
        groups.setdefault(row["group"], set()).add(row["key"])
    copies = {index["00000.tar[000000000]"], index["00000.tar[000000002]"]}
    assert copies in groups.values() and len(exact) == 5  # val_fraction 0: every ok example is in train
    result = onion_ok("select", in_place, "--dedup", "exact", timeout=120)
    assert f"onion materialize {in_place} --selection" in result.stdout  # not "onion train"
    version = result.stdout.split("selections/")[1][:5]
    selection = {row["key"]: row for row in read_selection(location(str(in_place)), version).to_pylist()}
    kept = [selection[key]["kept"] for key in sorted(copies)]
    assert kept == [True, False] and selection[max(copies)]["reason"] == f"duplicate-of:{min(copies)}"
    assert sum(row["kept"] for row in selection.values()) == 4
    onion_ok("materialize", in_place, "--selection", version, "--keys", tmp_path / "kept", timeout=120)
    kept_keys = pq.read_table(tmp_path / "kept.parquet")["key"].to_pylist()
    assert sorted(kept_keys) == sorted(key for key, row in selection.items() if row["kept"])
    result = onion_ok("select", copied, "--dedup", "exact", "--materialize", "--ray-cpus", "1", timeout=240)
    survivors = location(kept_url(str(copied), result.stdout.split("selections/")[1][:5]))
    assert read_manifest(survivors)["labelled"] is False
    assert read_manifest(survivors)["accounting"]["ok"] == 4
    onion_ok("report", in_place, "--out", tmp_path / "page", timeout=180)
    assert len(list((tmp_path / "page" / "thumbs").glob("*.png"))) == 5
    data = (tmp_path / "page" / "data" / "report.js").read_text()
    assert '"class_names":[]' in data and '"classes_by_split":{}' in data
    assert f'"{min(copies)}"' in (tmp_path / "page" / "data" / "selections.js").read_text()
    summary = onion_ok("inspect", in_place, timeout=120).stdout
    assert "Unlabelled: the examples carry no class" in summary and "Examples by class" not in summary
    assert files_of(laion) == before


@pytest.mark.parametrize("command", [
    ("score", "{dataset}", "loss", "--run", "{dataset}"),
    ("score", "{dataset}", "el2n", "--run", "{dataset}"),
    ("train", "{dataset}", "--out", "{run}", "--epochs", "1"),
    ("curate", "{dataset}", "--out", "{run}"),
    ("select", "{dataset}", "--scores", "random", "--class-balanced"),
])
def test_what_learns_labels_refuses_in_one_line(ingested, tmp_path, command):
    dataset = ingested[1]
    args = [part.format(dataset=dataset, run=tmp_path / "run") for part in command]
    result = onion(*args, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{dataset} is unlabelled" in lines[0] and "needs labels" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_unlabelled_flag_ignores_labels_and_refuses_what_contradicts_it(zoo, tmp_path):  # noqa: F811
    source = open_source(f"wds:{zoo}/shard-00000[01].tar", SourceOptions(unlabelled=True))
    records = source.records()
    assert source.labelled is False and {r.label for r in records} == {None}
    # s0006 (no .cls) and s0007 (label 'dog') were quarantined for their labels: not any more
    assert not [r for r in records if r.quarantine and "label" in r.quarantine]
    assert source.parameters["unlabelled"] is True
    with pytest.raises(SourceError, match="--unlabelled reads no labels: drop --label-field"):
        open_source(f"wds:{zoo}/*.tar", SourceOptions(unlabelled=True, label_field="label"))
    (tmp_path / "cat").mkdir()
    with pytest.raises(SourceError, match="--unlabelled works with the sources wds:, parquet:, hf:, not imagefolder"):
        open_source(f"imagefolder:{tmp_path}", SourceOptions(unlabelled=True))


def png_table(labels: list | None) -> pa.Table:
    images = [photo(number, "PNG") for number in range(3)]
    columns = {"image": pa.array([{"bytes": image, "path": None} for image in images])}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    return pa.table(columns)


def test_parquet_without_a_label_column_is_unlabelled(tmp_path):
    pq.write_table(png_table(None), tmp_path / "captions.parquet")
    source = open_source(f"parquet:{tmp_path}/captions.parquet")
    assert source.labelled is False and source.class_names == []
    assert [(r.label, r.quarantine) for r in source.records()] == [(None, None)] * 3
    (tmp_path / "labelled").mkdir()
    pq.write_table(png_table([0, None, 1]), tmp_path / "labelled" / "t.parquet")
    labelled = open_source(f"parquet:{tmp_path}/labelled")
    assert labelled.labelled is True and [r.label for r in labelled.records()] == [0, None, 1]
    forced = open_source(f"parquet:{tmp_path}/labelled", SourceOptions(unlabelled=True))
    assert forced.labelled is False and [(r.label, r.quarantine) for r in forced.records()] == [(None, None)] * 3
    with pytest.raises(SourceError, match="has no column 'kind' \\(--label-column or --unlabelled"):
        open_source(f"parquet:{tmp_path}/captions.parquet", SourceOptions(label_column="kind"))
