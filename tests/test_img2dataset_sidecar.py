"""img2dataset's sidecars: beside each ``NNNNN.tar`` it writes ``NNNNN.parquet`` (a row per URL attempted)
and ``NNNNN_stats.json`` (its counts). ``wds:`` copies and ``--in-place`` indexes take each sample's url,
caption and original size (before img2dataset's resize) from them when they are there, record img2dataset's
counts in the manifest, still work without them, and refuse one that cannot be read, naming it."""
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from helpers import files_of, onion, top_level
from pipeline.ingest.in_place import InPlaceOptions, ingest_in_place
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceError, SourceOptions, open_source
from pipeline.ingest.sources.img2dataset import SidecarRow, read_sidecars, sidecar_names
from shards import location, read_index, read_manifest
from test_ingest_wds import photo

OPTIONS = SourceOptions(label_field="label", class_names=("china", "flower"))  # a save_additional_columns field
# img2dataset's sidecar schema: the input's columns (url, caption, the additional ones), then its own
SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("label", pa.string()), ("key", pa.string()),
                    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                    ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                    ("sha256", pa.string())])
# shard 00000: (number, caption, label, original size; None: img2dataset failed to download it)
ATTEMPTED = [(0, "a temple", "china", (640, 427)), (1, "a lost photo", "flower", None),
             (2, "a flower", "flower", (1280, 853)), (3, "the sidecar's caption", "china", (500, 400))]
EDITED = "a caption edited since"  # 000000003.txt: the member wins over the sidecar
STATS = {"count": 4, "successes": 3, "failed_to_download": 1, "failed_to_resize": 0, "duration": 2.5,
         "status_dict": {"success": 3, "HTTP Error 404: Not Found": 1}}


def meta(number: int, caption: str, label: str, original: tuple[int, int] | None, key: str = "") -> dict:
    """A row as img2dataset writes it to the sidecar and, for a success, to the sample's .json (its image
    ``photo(number)``, 48+number x 48)."""
    key = key or f"{number:09d}"
    image = photo(number)
    ok = original is not None
    return {"url": f"https://example.com/{key}.jpg", "caption": caption, "label": label, "key": key,
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP Error 404: Not Found", "width": 48 + number if ok else None,
            "height": 48 if ok else None, "original_width": original[0] if ok else None,
            "original_height": original[1] if ok else None,
            "sha256": hashlib.sha256(image).hexdigest() if ok else None}


def write_shard(folder, name: str, rows: list[dict], captions: dict[str, str | None]) -> None:
    """The tar as img2dataset's TarWriter writes it: per success ``.jpg``, ``.json`` (its row), ``.txt``."""
    with wds.TarWriter(str(folder / name)) as sink:
        for row in rows:
            if row["status"] != "success":
                continue  # a failed download has a sidecar row and no members
            image = photo(row["width"] - 48)
            sample = {"__key__": row["key"], "jpg": image, "json": json.dumps(row, indent=4)}
            if captions.get(row["key"]) is not None:
                sample["txt"] = captions[row["key"]]
            sink.write(sample)


@pytest.fixture
def folder(tmp_path):
    """00000: full sidecars (a failed download among its rows); 00001: no sidecar; 00002: a .parquet of
    img2dataset's older or leaner options (key, url and status only) and no _stats.json."""
    folder = tmp_path / "img2ds"
    folder.mkdir()
    rows = [meta(*attempt) for attempt in ATTEMPTED]
    write_shard(folder, "00000.tar", rows, {"000000000": "a temple", "000000003": EDITED})  # 2 has no .txt
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text(json.dumps(STATS, indent=4))
    write_shard(folder, "00001.tar", [meta(9, "a bare shard", "flower", (90, 60), "000010000")],
                {"000010000": "a bare shard"})
    lean = meta(5, "unused", "china", (300, 200), "000020000")
    write_shard(folder, "00002.tar", [lean], {})
    pq.write_table(pa.table({"key": ["000020000"], "url": [lean["url"]], "status": ["success"]}),
                   folder / "00002.parquet")
    return folder


def test_sidecars_are_read_with_their_optional_columns_missing(folder):
    sidecars = read_sidecars(location(str(folder)), ["00000.tar", "00001.tar", "00002.tar"])
    assert set(sidecars) == {"00000.tar", "00002.tar"}  # 00001.tar has none
    full = sidecars["00000.tar"]
    assert full.stats == {"count": 4, "successes": 3, "failed_to_download": 1, "failed_to_resize": 0}
    assert full.row("000000000") == SidecarRow("https://example.com/000000000.jpg", "a temple", (640, 427))
    assert full.row("000000001") == SidecarRow("https://example.com/000000001.jpg", "a lost photo", None)
    assert full.row("999999999") is None
    lean = sidecars["00002.tar"]
    assert lean.stats is None and lean.row("000020000") == SidecarRow(url="https://example.com/000020000.jpg")
    assert sidecar_names("sub/00012.tar") == ("sub/00012.parquet", "sub/00012_stats.json")
    remote = location("memory://img2dataset-sidecars")  # the object-store way: a listing, then a read each
    for name in ("00000.tar", "00000.parquet", "00000_stats.json"):
        remote.fs.pipe_file(remote.path(name), (folder / name).read_bytes())
    assert read_sidecars(remote, ["00000.tar"]) == {"00000.tar": full}


def records_by_ref(folder) -> dict:
    return {r.source_ref: r for r in open_source(f"wds:{folder}/*.tar", OPTIONS).records()}


def test_records_take_url_caption_and_original_size_from_the_sidecar(folder):
    records = records_by_ref(folder)
    assert len(records) == 5  # the failed download has no members: not an input
    first = records["00000.tar[000000000]"]
    assert first.original_size == (640, 427) and first.quarantine is None
    assert first.extra["url"] == "https://example.com/000000000.jpg" and first.extra["caption"] == "a temple"
    assert first.extra["source_json"]["original_width"] == 640  # the sample's own .json is kept as it was
    assert records["00000.tar[000000002]"].extra["caption"] == "a flower"  # no .txt: the sidecar's caption
    assert records["00000.tar[000000003]"].extra["caption"] == EDITED  # the .txt wins
    bare = records["00001.tar[000010000]"]
    assert bare.original_size is None and "url" not in bare.extra and bare.extra["caption"] == "a bare shard"
    lean = records["00002.tar[000020000]"]
    assert lean.original_size is None and lean.extra["url"].endswith("/000020000.jpg") and "caption" not in lean.extra


def example_json(out, row: dict) -> dict:
    start = row["json_offset"]
    return json.loads((out / row["shard"]).read_bytes()[start:start + row["json_size"]])


def test_copy_ingest_carries_the_sidecar_into_index_and_example_json(ray_local, folder, tmp_path):
    out = tmp_path / "copy"
    report = ingest(open_source(f"wds:{folder}/*.tar", OPTIONS), str(out), IngestOptions(shard_size=3),
                    command=["test"], progress=False)
    manifest = read_manifest(location(str(out)))
    assert manifest["accounting"] == {"inputs": 5, "ok": 5, "quarantined": 0}  # tar samples, not URLs attempted
    assert manifest["img2dataset"] == report.manifest["img2dataset"] == {
        "parquet_sidecars": 2, "samples_with_sidecar_row": 4, "stats_files": 1,
        "count": 4, "successes": 3, "failed_to_download": 1, "failed_to_resize": 0}
    rows = {row["source_ref"]: row for row in read_index(location(str(out))).to_pylist()}
    first = rows["00000.tar[000000000]"]
    assert (first["width"], first["height"], first["original_width"], first["original_height"]) == (48, 48, 640, 427)
    document = example_json(out, first)
    assert document["url"] == "https://example.com/000000000.jpg" and document["caption"] == "a temple"
    assert (document["original_width"], document["original_height"]) == (640, 427)
    assert example_json(out, rows["00000.tar[000000002]"])["caption"] == "a flower"
    assert example_json(out, rows["00000.tar[000000003]"])["caption"] == EDITED
    bare = rows["00001.tar[000010000]"]  # no sidecar: the stored image's own size, as before
    assert (bare["original_width"], bare["original_height"]) == (bare["width"], bare["height"])
    assert "url" not in example_json(out, bare)
    lean = rows["00002.tar[000020000]"]
    assert (lean["original_width"], lean["original_height"]) == (lean["width"], lean["height"])
    assert example_json(out, lean)["url"] == "https://example.com/000020000.jpg"


def test_in_place_index_takes_the_original_size_from_the_sidecar(ray_local, folder, tmp_path):
    before = files_of(folder)
    for out in (tmp_path / "index", folder):  # OUT may be the shards' own folder, sidecars and all
        ingest_in_place(open_source(f"wds:{folder}/*.tar", OPTIONS), str(out), InPlaceOptions(), command=["test"],
                        progress=False)
        manifest = read_manifest(location(str(out)))
        assert manifest["accounting"] == {"inputs": 5, "ok": 5, "quarantined": 0}
        assert manifest["img2dataset"]["failed_to_download"] == 1
        rows = {row["source_ref"]: row for row in read_index(location(str(out))).to_pylist()}
        sizes = {ref: (row["original_width"], row["original_height"], row["width"]) for ref, row in rows.items()}
        assert sizes["00000.tar[000000000]"] == (640, 427, 48)
        assert sizes["00000.tar[000000002]"] == (1280, 853, 50)
        assert sizes["00001.tar[000010000]"] == (57, 48, 57)  # no sidecar: the image's own size
    assert top_level(files_of(folder)) == top_level(set(before) | {"index/", "manifest.json"})


@pytest.mark.parametrize(("name", "damage", "why"), [
    ("00000.parquet", lambda data: data[:len(data) // 2], "not valid Parquet"),  # img2dataset stopped mid-write
    ("00000.parquet", lambda _: pq_bytes(pa.table({"url": ["x"]})), "a Parquet file without .* 'key' column"),
    ("00000_stats.json", lambda data: data[:10], "not valid JSON"),
    ("00000_stats.json", lambda _: b"[4, 3, 1]", "JSON but not an object of counts"),
])
def test_a_sidecar_that_cannot_be_read_is_refused_naming_it(folder, tmp_path, name, damage, why):
    path = folder / name
    path.write_bytes(damage(path.read_bytes()))
    message = rf"{folder}/{name} is {why}.*beside 00000\.tar.*move it away to ingest 00000\.tar without it"
    with pytest.raises(SourceError, match=message):
        open_source(f"wds:{folder}/*.tar", OPTIONS).records()
    with pytest.raises(SourceError, match=message):  # before any shard is read or anything written
        ingest_in_place(open_source(f"wds:{folder}/*.tar", OPTIONS), str(tmp_path / "index"), InPlaceOptions(),
                        command=["test"], progress=False)
    assert not (tmp_path / "index").exists()


def pq_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_cli_summary_shows_what_img2dataset_attempted(folder, tmp_path):
    result = onion("ingest", f"wds:{folder}/*.tar", tmp_path / "out", "--label-field", "label",
                   "--class-names", "china,flower", "--ray-cpus", "1", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inputs=5 ok=5 quarantined=0" in result.stdout
    assert ("img2dataset sidecars: url, caption and original size of 4 samples from 2 .parquet; its _stats.json "
            "of 1 shard(s) count 4 URLs attempted: 3 successes, 1 failed to download, 0 failed to resize"
            ) in result.stdout, result.stdout
