"""``onion ingest wds:PATTERN OUT``: existing WebDataset shards (webdataset's ShardWriter, img2dataset's
layout) copied into onion shards. Samples are grouped as webdataset groups them, images are stored byte
for byte, every sample that cannot become an example is a quarantined row with its reason, and hostile
tars are reported, never extracted."""
import gzip
import hashlib
import io
import json
import os
import re
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from helpers import files_of, onion
from photos import photo_bytes, sample_photos
from pipeline.ingest.encode import EncodeOptions
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceError, SourceOptions, open_source
from pipeline.ingest.sources.webdataset import derived_class_names, group_samples, split_name
from shards import location, read_example, read_index, read_manifest
from shards.tar_members import BoundedReader, walk_tar

TINY = ("--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--epochs", "1", "--batch-size", "64",
        "--loader-workers", "0", "--patch-size", "4")


def photo(number: int, kind: str = "JPEG", side: int = 48) -> bytes:
    """A crop of one of scikit-learn's two photos, saved as ``kind``."""
    pixels = list(sample_photos().values())[number % 2]
    top, left = 20 + 7 * number, 30 + 11 * number
    return photo_bytes(pixels[top:top + side, left:left + side + number], "RGB", kind)


def tar_bytes(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    """A tar as a plain ``tar`` run writes it (GNU format, long names allowed): regular members given as
    ``(name, data)``, others (links, devices) as a ``TarInfo``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            info = tarfile.TarInfo(member[0])
            info.size = len(member[1])
            tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def member_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmember(name).offset


def with_size(data: bytes, name: str, size: int) -> bytes:
    """The tar with member ``name``'s header claiming ``size`` bytes (its checksum fixed, nothing moved)."""
    at = member_offset(data, name)
    header = bytearray(data[at:at + 512])
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:at] + bytes(header) + data[at + 512:]


# key -> (image member, label, caption); None: no such member
ZOO = {
    "s0000": (("jpg", photo(0)), b"0", "a temple"),
    "s0001": (("png", photo(1, "PNG")), b"1", "a flower"),
    "s0002": (("webp", photo(2, "WEBP")), b"1", None),
    "photos.v2/s0003": (("jpg", photo(3)), b"0", None),  # dots in a directory name: the key is all of it
    "s0004": (("jpg", b"definitely not an image"), b"0", None),
    "s0005": (None, b"1", "no picture here"),
    "s0006": (("jpg", photo(6)), None, None),
    "s0007": (("jpg", photo(7)), b"dog", None),
    "s0008": (("jpg", photo(8)), b"2", None),
    "s0009": (("png", photo(9, "PNG")), b"0", None),
}
EXPECTED = {  # source key (first occurrence) -> reason; None: ok
    "s0000": None, "s0001": None, "s0002": None, "photos.v2/s0003": None, "s0008": None, "s0009": None,
    "s0010": None, "s0011": None,
    "s0004": "not an image (no known image format)",
    "s0005": "no image member (found: .cls, .json, .txt)",
    "s0006": "no label (no .cls member)",
    "s0007": "label 'dog' (.cls) is a name, but other labels are integers (give --class-names to name the classes)",
}


def zoo_sample(key: str) -> dict:
    image, label, caption = ZOO[key]
    sample = {"__key__": key, "json": json.dumps({"origin": key, "n": 1}).encode()}
    if image:
        sample[image[0]] = image[1]
    if label is not None:
        sample["cls"] = label
    if caption is not None:
        sample["txt"] = caption.encode()
    return sample


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Four shards: two by webdataset's ShardWriter, one with a key already seen, one cut mid-member."""
    folder = tmp_path_factory.mktemp("zoo")
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=5, verbose=0) as sink:
        for key in ZOO:
            sink.write(zoo_sample(key))
    with wds.TarWriter(str(folder / "shard-000002.tar")) as sink:
        sink.write({"__key__": "s0000", "jpg": photo(10), "cls": b"1"})  # a key shard-000000.tar holds
        sink.write({"__key__": "s0010", "jpg": photo(11), "cls": b"1"})
    cut = tar_bytes([("s0011.jpg", photo(12)), ("s0011.cls", b"0"), ("s0012.cls", b"1"), ("s0012.jpg", photo(13))])
    (folder / "shard-000003.tar").write_bytes(cut[:member_offset(cut, "s0012.jpg") + 512 + 300])
    return folder


def test_members_are_named_and_grouped_as_webdataset_does(zoo):
    names = ["a.jpg", "dir.v1/000123.seg.png", "x/y.z/k.TXT", "a..b", "noext", "dir/.hidden", "/abs/k.cls"]
    for name in names:
        key, extension = base_plus_ext(name)
        assert split_name(name) == ((key, extension.lower()) if key else None), name
    path = zoo / "shard-000000.tar"
    with open(path, "rb") as handle:
        ours = [sample.key for sample in group_samples(walk_tar(handle, path.stat().st_size))]
    theirs = [sample["__key__"] for sample in wds.WebDataset(str(path), shardshuffle=False)]
    assert ours == theirs == list(ZOO)[:5]


def test_listing_reads_tar_headers_and_metadata_not_images(zoo, monkeypatch):
    reads = []  # (position, bytes) of every read the listing makes
    original = BoundedReader.read

    def counted(self, count=-1):
        position = self.tell()
        data = original(self, count)
        reads.append((position, len(data)))
        return data

    monkeypatch.setattr(BoundedReader, "read", counted)
    records = open_source(f"wds:{zoo}/shard-000000.tar").records()
    images = [record.locator for record in records]
    assert len(images) == 5 and all(images) and len(reads) > 10
    for _, offset, size in images:  # tarfile's 1-byte probe at the end of a member's padding aside
        assert not [read for read in reads if read[1] > 1 and read[0] < offset + size and offset < sum(read)]
    shard, offset, size = images[0]
    assert (zoo / shard).read_bytes()[offset:offset + size] == ZOO["s0000"][0][1]


def test_patterns_braces_globs_and_their_errors(zoo, tmp_path):
    def shards(pattern):
        return [r.source_ref.split("[")[0] for r in open_source(f"wds:{pattern}").records()]

    braces = shards(f"{zoo}/shard-{{000002..000003}}.tar")
    assert sorted(set(braces)) == ["shard-000002.tar", "shard-000003.tar"]
    assert set(shards(f"{zoo}/*.tar")) == {f"shard-00000{i}.tar" for i in range(4)}
    assert set(shards(f"{zoo.parent}/{zoo.name}/shard-00000[3].tar")) == {"shard-000003.tar"}
    errors = {
        f"{zoo}/nothing-*.tar": "matches no files",
        f"{zoo}/shard-{{000003..000005}}.tar": "names 2 files that do not exist",
        f"{zoo}/shard-{{000003.tar": "Unbalanced braces",
        str(zoo): "is a folder: name its shards, e.g.",
    }
    for pattern, message in errors.items():
        with pytest.raises(SourceError, match=message):
            open_source(f"wds:{pattern}")
    (tmp_path / "00000.tar.gz").write_bytes(gzip.compress((zoo / "shard-000002.tar").read_bytes()))
    (tmp_path / "00001.tar").write_bytes(gzip.compress((zoo / "shard-000002.tar").read_bytes()))
    (tmp_path / "00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(SourceError, match="00000.tar.gz is compressed: onion copies uncompressed .tar shards"):
        open_source(f"wds:{tmp_path}/00000*")
    with pytest.raises(SourceError, match="00001.tar is gzip-compressed"):
        open_source(f"wds:{tmp_path}/00001.tar").records()
    with pytest.raises(SourceError, match=r"not .tar shards \(00001.parquet\); narrow the pattern"):
        open_source(f"wds:{tmp_path}/00001*")


def test_img2dataset_layout_with_a_label_field_and_class_names(tmp_path):
    captions = ["a temple", "a flower", "a second flower", "nothing to say"]
    labels = ["china", 1, "flower", None]
    members = []
    for number, (caption, label) in enumerate(zip(captions, labels)):
        key = f"{number:09d}"
        document = {"key": key, "caption": caption, "status": "success", **({"label": label} if label else {})}
        members += [(f"{key}.jpg", photo(number)), (f"{key}.json", json.dumps(document).encode()),
                    (f"{key}.txt", caption.encode())]
    members += [("000000001.jpg", photo(5)), ("000000001.json", b'{"label": "china"}')]  # its key again
    (tmp_path / "00000.tar").write_bytes(tar_bytes(members))
    options = SourceOptions(label_field="label", class_names=("china", "flower"))
    source = open_source(f"wds:{tmp_path}/{{00000..00000}}.tar", options)
    records = source.records()
    assert source.class_names == ["china", "flower"]
    assert [r.label for r in records] == [0, 1, 1, None, None]
    assert records[3].quarantine == "no label (no field 'label' in a .json member)"
    assert records[4].quarantine == "duplicate key of 00000.tar" and records[4].key != records[1].key
    assert records[0].extra == {"caption": "a temple", "source_json": {
        "key": "000000000", "caption": "a temple", "status": "success", "label": "china"}}
    assert records[0].key.startswith("00000-000000000-") and records[0].source_ref == "00000.tar[000000000]"
    unnamed = open_source(f"wds:{tmp_path}/00000.tar", SourceOptions(label_field="label"))
    records = unnamed.records()
    assert unnamed.class_names == ["0", "1"] and [r.label for r in records] == [None, 1, None, None, None]
    assert records[0].quarantine == ("label 'china' (field 'label') is a name, but other labels are integers "
                                     "(give --class-names to name the classes)")


def test_class_names_without_class_names_given():
    assert derived_class_names([3, "1", " x", 10**9]) == ["0", "1", "2", "3"]  # as other sources number them
    assert derived_class_names(["b", "a", "b"]) == ["a", "b"]  # no integer among them: the names, sorted
    assert derived_class_names([]) == []
    assert derived_class_names(["9" * 5000, 2]) == ["0", "1", "2"]  # thousands of digits: out of range, no crash


def test_metadata_that_cannot_be_kept_quarantines_its_sample(tmp_path):
    members = [("a.jpg", photo(0)), ("a.cls", b"0"), ("a.json", b"{not json"),
               ("b.jpg", photo(1)), ("b.cls", b"0"), ("b.txt", b"\xff\xfe caption"),
               ("c.jpg", photo(2)), ("c.cls", b"0"), ("c.json", b" " * ((1 << 20) + 1)),
               ("d.jpg", photo(3)), ("d.cls", b"9" * 5000), ("e.jpg", photo(4)), ("e.cls", b"1"), ("README", b"hi")]
    (tmp_path / "x.tar").write_bytes(tar_bytes(members))
    reasons = {r.source_ref: r.quarantine for r in open_source(f"wds:{tmp_path}/x.tar").records()}
    assert reasons == {
        "x.tar[a]": "the .json member is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                    "column 2 (char 1))",
        "x.tar[b]": "the .txt member is not UTF-8 text",
        "x.tar[c]": "x.tar: member 'c.json': 1048577 bytes, over the 1048576-byte limit of a member read whole",
        "x.tar[d]": f"label {'9' * 40} (.cls) over 99999, the most classes onion numbers itself (give --class-names)",
        "x.tar[e]": None,
        "x.tar[README]": "x.tar: member 'README' has no extension, so it belongs to no sample",
    }


def run_ingest(spec, out, **encode):
    return ingest(open_source(spec, SourceOptions()), str(out),
                  IngestOptions(shard_size=4, encode=EncodeOptions(**encode)), command=["test"], progress=False)


def test_zoo_ingest_accounts_for_every_sample(ray_local, zoo, tmp_path):
    report = run_ingest(f"wds:{zoo}/shard-{{000000..000003}}.tar", tmp_path / "a")
    rows = read_index(location(str(tmp_path / "a"))).to_pylist()
    by_ref = {row["source_ref"]: row for row in rows}
    assert len(rows) == 14 and report.manifest["accounting"] == {"inputs": 14, "ok": 8, "quarantined": 6}
    shard_of = {key: f"shard-00000{i // 5}.tar" for i, key in enumerate(ZOO)}
    shard_of.update({"s0010": "shard-000002.tar", "s0011": "shard-000003.tar"})
    for key, reason in EXPECTED.items():
        row = by_ref[f"{shard_of[key]}[{key}]"]
        assert (row["status"], row["reason"]) == (("ok", None) if reason is None else ("quarantined", reason)), row
    assert by_ref["shard-000002.tar[s0000]"]["reason"] == "duplicate key of shard-000000.tar"
    cut = by_ref["shard-000003.tar[s0012]"]["reason"]
    assert cut.startswith("shard-000003.tar: member 's0012.jpg': truncated: the tar header says"), cut
    assert read_manifest(location(str(tmp_path / "a")))["class_names"] == ["0", "1", "2"]
    for key, kind in (("s0000", "jpg"), ("s0001", "png"), ("s0002", "webp")):  # stored byte for byte
        row = by_ref[f"shard-000000.tar[{key}]"]
        stored = read_example(str(tmp_path / "a"), row["key"]).image
        source = ZOO[key][0][1]
        assert (row["image_ext"], hashlib.sha256(stored).hexdigest()) == (kind, hashlib.sha256(source).hexdigest())
    dotted = by_ref["shard-000000.tar[photos.v2/s0003]"]
    assert dotted["key"].startswith("shard-000000-s0003-") and dotted["label"] == 0
    first = by_ref["shard-000000.tar[s0000]"]
    with tarfile.open(tmp_path / "a" / first["shard"]) as tar:
        metadata = json.loads(tar.extractfile(f"{first['key']}.json").read())
    assert metadata["caption"] == "a temple" and metadata["source_json"] == {"origin": "s0000", "n": 1}
    run_ingest(f"wds:{zoo}/shard-{{000000..000003}}.tar", tmp_path / "b")
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


def hostile_tar(kind: str) -> bytes:
    """A tar holding ``<kind>-good``, then the hostile member (sample ``<kind>-victim`` unless named
    otherwise), then ``<kind>-after``."""
    good = [(f"{kind}-good.jpg", photo(1)), (f"{kind}-good.cls", b"0")]
    after = [(f"{kind}-after.jpg", photo(2)), (f"{kind}-after.cls", b"1")]
    plain = tar_bytes(good + [(f"{kind}-victim.jpg", photo(3)), (f"{kind}-victim.cls", b"1")] + after)
    victim = f"{kind}-victim.jpg"
    if kind == "dotdot":
        return tar_bytes(good + [("../evil.jpg", photo(3)), ("../evil.cls", b"1")] + after)
    if kind == "absolute":
        return tar_bytes(good + [("/tmp/onion-evil.jpg", photo(3))] + after)
    if kind == "symlink":
        return tar_bytes(good + [special(victim, tarfile.SYMTYPE, "/etc/passwd")] + after)
    if kind == "hardlink":
        return tar_bytes(good + [special(victim, tarfile.LNKTYPE, f"{kind}-good.jpg")] + after)
    if kind == "device":
        return tar_bytes(good + [special(victim, tarfile.CHRTYPE)] + after)
    if kind == "past-eof":  # a header "of 8 GiB" in a file of a few KB: nothing after it is read
        return with_size(plain, victim, (8 << 30) - 1)
    if kind == "broken-header":  # the victim's .cls header overwritten: the walk stops there
        at = member_offset(plain, f"{kind}-victim.cls")
        return plain[:at] + b"x" * 100 + plain[at + 100:]
    if kind == "pax":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in good + [(victim, photo(3))] + after:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                if name == victim:
                    info.pax_headers = {"path": "../../pax-evil.jpg"}
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()
    return os.urandom(3000)  # junk: not a tar at all


HOSTILE = {  # kind -> (source_ref of its hostile row, words of its reason, whether <kind>-after is read)
    "dotdot": ("dotdot.tar[../evil]", "dotdot.tar: member '../evil.jpg': unsafe member name ('..'", True),
    "absolute": ("absolute.tar[/tmp/onion-evil]", "member '/tmp/onion-evil.jpg': unsafe member name (an abs", True),
    "symlink": ("symlink.tar[symlink-victim]", "not a regular file (symbolic link to /etc/passwd)", True),
    "hardlink": ("hardlink.tar[hardlink-victim]", "not a regular file (hard link to hardlink-good.jpg)", True),
    "device": ("device.tar[device-victim]", "not a regular file (character device)", True),
    "past-eof": ("past-eof.tar[past-eof-victim]", f"truncated: the tar header says {(8 << 30) - 1} bytes", False),
    "broken-header": ("broken-header.tar@", "broken-header.tar: tar headers broken at byte", False),
    "pax": ("pax.tar[../../pax-evil]", "pax.tar: member '../../pax-evil.jpg': unsafe member name", True),
    "junk": ("junk.tar@0", "junk.tar: not a tar file", False),
}


def test_hostile_tars_are_quarantined_and_never_extracted(ray_local, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    for kind in HOSTILE:
        (folder / f"{kind}.tar").write_bytes(hostile_tar(kind))
    before = set(os.listdir(tmp_path.parent))
    records = {r.source_ref: r for r in open_source(f"wds:{folder}/*.tar").records()}
    for kind, (ref, words, after_read) in HOSTILE.items():
        hostile = next(r for name, r in records.items() if name.startswith(ref))
        assert hostile.quarantine and words in hostile.quarantine, (kind, hostile.quarantine)
        if kind != "junk":
            assert records[f"{kind}.tar[{kind}-good]"].quarantine is None
        assert (f"{kind}.tar[{kind}-after]" in records) == after_read, kind
    report = run_ingest(f"wds:{folder}/*.tar", tmp_path / "out")
    ok = sum(r.quarantine is None for r in records.values())
    assert report.manifest["accounting"] == {"inputs": len(records), "ok": ok, "quarantined": len(records) - ok}
    assert set(os.listdir(tmp_path.parent)) == before and set(os.listdir(tmp_path)) == {"hostile", "out"}
    assert not any(os.path.exists(p) for p in ("/tmp/onion-evil.jpg", "/pax-evil.jpg", tmp_path / "evil.jpg"))


def test_cli_names_a_pattern_that_matches_nothing_in_one_line(tmp_path):
    result = onion("ingest", f"wds:{tmp_path}/nothing-{{00000..00003}}.tar", tmp_path / "out", timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "names 4 files that do not exist" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_copied_shards_train(ray_local, zoo, tmp_path):
    run_ingest(f"wds:{zoo}/*.tar", tmp_path / "data", resize_mode="center-crop", max_side=32)
    result = onion("train", tmp_path / "data", "--out", tmp_path / "run", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_the_way_in_that_a_folder_of_foreign_shards_names_works(zoo):
    with pytest.raises(SourceError, match="plain WebDataset shards") as raised:
        open_source(str(zoo))
    suggested = re.search(r"onion ingest (wds:'[^']+') OUT", str(raised.value)).group(1)
    assert len(open_source(suggested.replace("'", "")).records()) == 14


def test_remote_shards_are_listed_as_local_ones(zoo):
    """Through fsspec as an object store is read (memory:// here; onion ingest runs the Ray tasks
    elsewhere, so the store itself is tried in test_shards_on_s3_ingest_as_local_ones)."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in sorted(zoo.glob("*.tar")):
        memory.pipe_file(f"/wds-zoo/{path.name}", path.read_bytes())
    remote = open_source("wds:memory://wds-zoo/shard-{000000..000003}.tar").records()
    local = open_source(f"wds:{zoo}/shard-{{000000..000003}}.tar").records()
    assert remote == local and len(remote) == 14


@pytest.mark.slow
def test_shards_on_s3_ingest_as_local_ones(ray_local, zoo, tmp_path):
    import fsspec

    from loopback import aws_environment, environment, moto_server

    with moto_server() as endpoint, environment(aws_environment(endpoint)):
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        store = fsspec.filesystem("s3")
        store.mkdir("onion-wds")
        for path in sorted(zoo.glob("*.tar")):
            store.pipe_file(f"onion-wds/zoo/{path.name}", path.read_bytes())
        result = onion("ingest", "wds:s3://onion-wds/zoo/shard-{000000..000003}.tar", tmp_path / "remote",
                       "--shard-size", "4", timeout=300, env={**os.environ, **aws_environment(endpoint)})
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    assert result.returncode == 0, result.stderr[-3000:]
    run_ingest(f"wds:{zoo}/shard-{{000000..000003}}.tar", tmp_path / "local")
    remote, local = (files_of(tmp_path / name) for name in ("remote", "local"))
    assert remote.pop("manifest.json") != local.pop("manifest.json")  # the source's spec and the command differ
    assert remote == local  # shards and index byte for byte


def tar_in_format(tar_format: int, members: list[tuple[str, bytes]], **pax: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1234567890.5  # a fractional mtime: a PAX record of its own
            info.pax_headers = dict(pax)
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def tar_shapes(zoo_folder) -> dict[str, bytes]:
    """Tars of every shape the walk meets: webdataset's writer, each tarfile format, USTAR prefix names,
    PAX long and non-ASCII names, directories, an old-style directory, signed checksums, every hostile
    kind, the zoo's cut shard."""
    long = "a.b/" + "c" * 120 + ".d/000001.jpg"
    members = [("dir.v1/", b""), ("dir.v1/s0.jpg", photo(0)), ("dir.v1/s0.cls", b"1"), ("ünï/s1.png", photo(1, "PNG")),
               (long, photo(2)), ("p" * 90 + "/" + "q" * 90 + ".jpg", photo(3)), ("s4.txt", b"")]
    shapes = {"gnu": tar_in_format(tarfile.GNU_FORMAT, members), "pax": tar_in_format(tarfile.PAX_FORMAT, members),
              "ustar": tar_in_format(tarfile.USTAR_FORMAT, [m for m in members if m[0] != long and "ü" not in m[0]])}
    shapes["pax-comment-and-charset"] = tar_in_format(tarfile.PAX_FORMAT, members[:3], comment="hi",
                                                      hdrcharset="BINARY")
    old_dir = bytearray(tar_bytes([("olddir/", b""), ("olddir/x.jpg", photo(4))]))
    old_dir[156:157] = b"\0"  # a v7 directory: a regular file whose name ends in "/"
    old_dir[148:156] = b" " * 8
    old_dir[148:156] = b"%06o\0 " % sum(old_dir[:512])
    shapes["v7-directory"] = bytes(old_dir)
    signed = bytearray(tar_bytes([("first.jpg", photo(4)), ("s\xe9.jpg", photo(5))]))
    at = member_offset(bytes(signed), "s\xe9.jpg")  # a header byte > 127, its checksum summed as signed bytes
    signed[at + 148:at + 156] = b" " * 8
    header = signed[at:at + 512]
    signed[at + 148:at + 156] = b"%06o\0 " % (sum(header) - 256 * sum(b > 127 for b in header))
    shapes["signed-checksum"] = bytes(signed)
    shapes.update({f"hostile-{kind}": hostile_tar(kind) for kind in HOSTILE})
    shapes.update({path.name: path.read_bytes() for path in sorted(zoo_folder.glob("*.tar"))})
    return shapes


def test_the_plain_header_parse_walks_every_tar_as_tarfile_does(zoo):
    """walk_tar parses plain headers itself (tarfile's parse was most of a walk's time) and leaves the rest to
    tarfile: every member, offset, size, problem and break is what a walk by tarfile alone gives."""
    shapes = tar_shapes(zoo)
    assert len(shapes) > 15
    for name, data in shapes.items():
        walks = [list(walk_tar(io.BytesIO(data), len(data), read=lambda n: n.endswith((".cls", ".txt")),
                               parse_plain=plain)) for plain in (True, False)]
        assert walks[0] == walks[1], name
    pax = [m.name for m in walk_tar(io.BytesIO(shapes["pax"]), len(shapes["pax"]))]
    assert pax[:2] == ["dir.v1/s0.jpg", "dir.v1/s0.cls"] and any(name.startswith("a.b/") for name in pax)
