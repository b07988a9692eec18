"""``onion ingest wds:PATTERN OUT --in-place``: existing WebDataset tars indexed where they are. OUT gets
only onion's index and manifest; readers, verify and training work on it as on a copy; the source tars
are never written to, and a source shard changed after indexing is named."""
import gzip
import hashlib
import io
import shutil
import tarfile

import pytest
from torch.utils.data import DataLoader

from helpers import files_of, onion, top_level
from pipeline.curation.selection import SelectOptions, SourceExamples, select
from pipeline.ingest.in_place import InPlaceOptions, ingest_in_place
from pipeline.ingest.sources import SourceError, SourceOptions, open_source
from shards import DatasetDamaged, ShardDataset, location, read_example, read_index, read_manifest
from shards.reader import header_problem
from shards.selections import save_selection
from shards.tar_members import walk_tar
from shards.verify import verify_dataset
from test_ingest_wds import EXPECTED, TINY, ZOO, photo, run_ingest, tar_bytes, zoo  # noqa: F401 - zoo is a fixture

LONG = "img2dataset.v1/" + "a-very-long-folder-name-" * 5 + "/000000007.jpg"  # over USTAR's 100 bytes


def long_name_tar(tar_format: int, number: int = 5) -> bytes:
    """img2dataset-style samples (.jpg .json .txt .cls), one of them named longer than a USTAR header holds."""
    buffer = io.BytesIO()
    key, long = f"{number:09d}", f"{number}/{LONG}"
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for name, data in [(f"{key}.jpg", photo(5)), (f"{key}.json", b'{"caption": "x"}'),
                           (f"{key}.txt", b"x"), (f"{key}.cls", b"1"),
                           (long, photo(7)), (long.replace(".jpg", ".cls"), b"2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_source(folder, zoo_folder):  # noqa: F811 - not the fixture
    folder.mkdir()
    for path in sorted(zoo_folder.glob("*.tar")):
        shutil.copy(path, folder / path.name)
    (folder / "shard-000004.tar").write_bytes(long_name_tar(tarfile.PAX_FORMAT))
    (folder / "shard-000005.tar").write_bytes(long_name_tar(tarfile.GNU_FORMAT, 6))
    return folder


def index_in_place(pattern, out, check="header"):
    return ingest_in_place(open_source(f"wds:{pattern}", SourceOptions()), str(out), InPlaceOptions(check=check),
                           command=["test"], progress=False)


@pytest.fixture(scope="module")
def indexed(ray_local, zoo, tmp_path_factory):  # noqa: F811
    """(source folder, its files before, the in-place dataset, a copy-ingest of the same pattern)."""
    root = tmp_path_factory.mktemp("in-place")
    source = make_source(root / "source", zoo)
    before = files_of(source)
    index_in_place(f"{source}/*.tar", root / "out")
    run_ingest(f"wds:{source}/*.tar", root / "copy")
    return source, before, root / "out", root / "copy"


def test_index_points_at_the_source_members_and_writes_nothing_there(indexed):
    source, before, out, _ = indexed
    assert files_of(source) == before
    assert top_level(files_of(out)) == ["index/", "manifest.json"]
    manifest = read_manifest(location(str(out)))
    assert manifest["shard_root"] == str(source)
    accounting = manifest["accounting"]
    assert accounting["ok"] + accounting["quarantined"] == accounting["inputs"] == 14 + 4
    rows = read_index(location(str(out))).to_pylist()
    by_ref = {row["source_ref"]: row for row in rows}
    shard_of = {key: f"shard-00000{i // 5}.tar" for i, key in enumerate(ZOO)}
    shard_of.update({"s0010": "shard-000002.tar", "s0011": "shard-000003.tar"})
    for key, reason in EXPECTED.items():  # the same reasons as the copy: not an image, no image, no label...
        row = by_ref[f"{shard_of[key]}[{key}]"]
        assert (row["status"], row["reason"]) == (("ok", None) if reason is None else ("quarantined", reason)), row
    assert by_ref["shard-000002.tar[s0000]"]["reason"] == "duplicate key of shard-000000.tar"
    assert by_ref["shard-000003.tar[s0012]"]["reason"].startswith("shard-000003.tar: member 's0012.jpg': truncated")
    for row in rows:
        if row["status"] != "ok":
            continue
        data = (source / row["shard"]).read_bytes()
        member = data[row["image_offset"]:row["image_offset"] + row["image_size"]]
        assert hashlib.sha256(member).hexdigest() == row["sha256"]
        named = {m.offset: m.name for m in walk_tar(io.BytesIO(data), len(data))}
        long = len(named[row["image_offset"]].encode()) > 100
        assert row["member_name"] == named[row["image_offset"]] or long and LONG in named[row["image_offset"]]
    assert by_ref["shard-000000.tar[photos.v2/s0003]"]["member_name"] == "photos.v2/s0003.jpg"
    assert {e["name"]: e["bytes"] for e in manifest["shards"]} == {n: len(b) for n, b in before.items()}


def test_readers_see_what_they_see_in_a_copy(indexed):
    _, _, out, copy = indexed

    def seen(url):
        dataset = ShardDataset(str(url), shuffle=False)
        return {key: (label, hashlib.sha256(image.numpy().tobytes()).hexdigest()) for image, label, key in dataset}

    in_place = seen(out)
    assert in_place == seen(copy) and len(in_place) == 12  # the long names of PAX and GNU tars included
    for key in list(in_place)[:3]:
        assert read_example(str(out), key).image == read_example(str(copy), key).image


@pytest.mark.parametrize("selected", [False, True], ids=["whole split", "a selection"])
def test_exactly_once_over_two_ranks_and_two_workers(indexed, selected):
    _, _, out, _ = indexed
    dataset = location(str(out))
    selection = None
    if selected:  # a random 60% of the train split, stored as a selection version of the in-place dataset
        table = select(SourceExamples.of(dataset), None, SelectOptions(keep=0.6, strategy="random", seed=1))
        selection = save_selection(dataset, table, {"test": "in place"})
    everything = set(ShardDataset(str(out), selection=selection).keys())
    assert 0 < len(everything) < len(ShardDataset(str(out)).keys()) if selected else everything
    per_rank = []
    for rank in (0, 1):
        reader = ShardDataset(str(out), rank=rank, world_size=2, seed=3, buffer_size=4, selection=selection)
        per_rank.append([key for _, _, key in DataLoader(reader, batch_size=None, num_workers=2)])
        assert len(per_rank[-1]) == len(reader)
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(everything)


def test_header_check_compares_the_indexed_member_name():
    data = long_name_tar(tarfile.PAX_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(f"5/{LONG}")
    header = memoryview(data)[info.offset_data - 512:info.offset_data]
    stored = bytes(header[:100]).split(b"\0")[0].decode()  # the shortened name PAX leaves in the header
    assert header_problem(header, "key", info.size, stored) is None
    assert "names" in header_problem(header, "key", info.size, LONG)
    assert "says" in header_problem(header, "key", info.size + 1, stored)
    short = data[:512]
    assert header_problem(memoryview(short), "000000005", len(photo(5)), "000000005.jpg") is None
    assert header_problem(memoryview(short), "000000005", len(photo(5)), "dir/000000005.jpg")


def test_verify_passes_then_names_a_changed_source_shard(ray_local, zoo, tmp_path):  # noqa: F811
    source = make_source(tmp_path / "source", zoo)
    index_in_place(f"{source}/*.tar", source)  # OUT is the shards' own folder: only onion's files added
    assert top_level(files_of(source)) == sorted({p.name for p in source.glob("*.tar")} | {"index/", "manifest.json"})
    checked, problems = verify_dataset(str(source))
    assert (checked, problems) == (6, [])  # captions, .txt and .json members are not complained about
    row = next(r for r in read_index(location(str(source))).to_pylist()
               if r["status"] == "ok" and r["shard"] == "shard-000004.tar")
    shard = source / "shard-000004.tar"
    data = bytearray(shard.read_bytes())
    data[row["image_offset"] + 100] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(data))
    _, problems = verify_dataset(str(source))
    assert [p.shard for p in problems] == ["shard-000004.tar"] * 2, problems
    assert "it had when indexed" in problems[0].what and "mtime" in problems[0].what
    assert problems[1].member == row["member_name"] and "sha256" in problems[1].what
    with pytest.raises(DatasetDamaged, match=rf"shard-000004.tar: member '{row['member_name']}' \(key "
                                             rf"{row['key']}\): its bytes do not match"):
        list(ShardDataset(str(source), shards=["shard-000004.tar"]))
    other = source / "shard-000005.tar"
    other.write_bytes(other.read_bytes() + b"\0" * 512)  # appended bytes
    _, problems = verify_dataset(str(source))
    assert any(p.shard == "shard-000005.tar" and "bytes," in p.what and "when indexed" in p.what for p in problems)
    result = onion("verify", source, timeout=120)
    assert result.returncode == 1 and "shard-000004.tar" in result.stderr and "shard-000005.tar" in result.stderr


def test_decode_check_and_compressed_tars(ray_local, tmp_path):
    good = photo(1, "PNG")
    broken = good[:len(good) // 2]  # a PNG whose header is whole but whose pixel data is cut
    (tmp_path / "a.tar").write_bytes(tar_bytes([("x.jpg", good), ("x.cls", b"0"), ("y.jpg", broken), ("y.cls", b"0")]))
    header = index_in_place(f"{tmp_path}/a.tar", tmp_path / "h").manifest["accounting"]
    decoded = index_in_place(f"{tmp_path}/a.tar", tmp_path / "d", check="decode").manifest["accounting"]
    assert (header["ok"], decoded["ok"]) == (2, 1)
    (tmp_path / "z.tar").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    with pytest.raises(SourceError, match="z.tar is gzip-compressed.*cannot be indexed in place"):
        index_in_place(f"{tmp_path}/z.tar", tmp_path / "z")
    assert not (tmp_path / "z" / "manifest.json").exists()


def test_in_place_with_another_source_is_a_one_line_error(tmp_path):
    result = onion("ingest", "digits", tmp_path / "out", "--in-place", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--in-place indexes WebDataset shards" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_in_place_then_train_and_verify(zoo, tmp_path):  # noqa: F811
    source = make_source(tmp_path / "source", zoo)
    result = onion("ingest", f"wds:{source}/*.tar", tmp_path / "data", "--in-place", "--check", "decode")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inputs=18" in result.stdout and "quarantined=6" in result.stdout, result.stdout
    assert onion("verify", tmp_path / "data", timeout=120).returncode == 0
    result = onion("train", tmp_path / "data", "--out", tmp_path / "run", *TINY, "--img-size", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))
