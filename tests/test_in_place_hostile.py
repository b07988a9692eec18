"""Hostile WebDataset tars indexed in place (``onion ingest wds:PATTERN OUT --in-place``), as
test_ingest_wds.py tries them copied: every hostile sample is a quarantined row whose reason names its
shard and member, nothing is written outside OUT, the source tars stay byte for byte, and the reader
serves exactly the source members' bytes. Then what only reading in place meets: members and headers
claiming gigabytes (in sparse files, which take no disk), PAX headers with odd paths, and shards on an
S3 store that change under the index."""
import hashlib
import io
import os
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from helpers import files_of, onion, top_level
from pipeline.ingest.in_place import InPlaceOptions, ingest_in_place
from pipeline.ingest.sources import SourceOptions, open_source
from shards import DatasetDamaged, ShardDataset, location, read_example, read_index, read_manifest
from shards.tar_members import HEADER_LIMIT, MEMBER_LIMIT, walk_tar
from shards.verify import verify_dataset
from test_ingest_wds import HOSTILE, hostile_tar, photo, run_ingest, tar_bytes

GIB = 1 << 30
BIG = MEMBER_LIMIT + GIB // 2  # over every limit, yet hashed in about a second
HUGE = 64 * GIB
MEMORY_LIMIT = 300 << 20  # peak resident memory any process may add while a sparse shard is indexed
GOOD = {"good": 0, "after": 1}  # the sound samples around every hostile one, and their labels


def index_in_place(pattern, out, check="header"):
    return ingest_in_place(open_source(f"wds:{pattern}", SourceOptions()), str(out), InPlaceOptions(check=check),
                           command=["test"], progress=False)


def rows_of(out) -> list[dict]:
    return read_index(location(str(out))).to_pylist()


def source_member(source: Path, row: dict) -> bytes:
    with open(source / row["shard"], "rb") as handle:
        handle.seek(row["image_offset"])
        return handle.read(row["image_size"])


def assert_accounted(out, rows) -> None:
    accounting = read_manifest(location(str(out)))["accounting"]
    ok = sum(row["status"] == "ok" for row in rows)
    assert accounting == {"inputs": len(rows), "ok": ok, "quarantined": len(rows) - ok}, accounting


def assert_served_as_stored(source: Path, out) -> None:
    """Every ok row, through read_example and the streaming reader, is its source member byte for byte."""
    rows = [row for row in rows_of(out) if row["status"] == "ok"]
    streamed = {key: label for _, label, key in ShardDataset(str(out), shuffle=False)}
    assert set(streamed) == {row["key"] for row in rows if row["split"] == "train"}
    for row in rows:
        assert read_example(str(out), row["key"]).image == source_member(source, row), row
        assert hashlib.sha256(source_member(source, row)).hexdigest() == row["sha256"]


# ---------------------------------------------------------------- the hostile tars of test_ingest_wds


def test_hostile_tars_in_place_are_quarantined_and_never_extracted(ray_local, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    for kind in HOSTILE:
        (folder / f"{kind}.tar").write_bytes(hostile_tar(kind))
    before, neighbours = files_of(folder), set(os.listdir(tmp_path.parent))
    index_in_place(f"{folder}/*.tar", tmp_path / "out")
    assert files_of(folder) == before  # the source tars, byte for byte
    assert set(os.listdir(tmp_path.parent)) == neighbours and set(os.listdir(tmp_path)) == {"hostile", "out"}
    assert top_level(files_of(tmp_path / "out")) == ["index/", "manifest.json"]
    assert not any(os.path.exists(p) for p in ("/tmp/onion-evil.jpg", "/pax-evil.jpg", tmp_path / "evil.jpg"))
    rows = rows_of(tmp_path / "out")
    by_ref = {row["source_ref"]: row for row in rows}
    assert_accounted(tmp_path / "out", rows)
    for kind, (ref, words, after_read) in HOSTILE.items():
        hostile = next(row for name, row in by_ref.items() if name.startswith(ref))
        assert hostile["status"] == "quarantined" and words in hostile["reason"], (kind, hostile)
        assert hostile["reason"].startswith(f"{kind}.tar: "), hostile  # names the shard
        if kind in ("symlink", "hardlink", "device"):  # and the member (the others' words name it)
            assert f"member '{kind}-victim.jpg'" in hostile["reason"], hostile
        for sample, label in GOOD.items():
            row = by_ref.get(f"{kind}.tar[{kind}-{sample}]")
            if kind == "junk" or sample == "after" and not after_read:
                assert row is None, row
            else:
                assert (row["status"], row["label"]) == ("ok", label), row
    copied = {row["source_ref"]: (row["status"], row["reason"]) for row in rows_of(run_ingest(
        f"wds:{folder}/*.tar", tmp_path / "copy").url)}
    assert {ref: (row["status"], row["reason"]) for ref, row in by_ref.items()} == copied  # as a copy says
    assert_served_as_stored(folder, tmp_path / "out")
    entries = read_manifest(location(str(tmp_path / "out")))["shards"]
    assert {e["name"]: (e["bytes"], e["sha256"]) for e in entries} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in before.items()}
    assert verify_dataset(str(tmp_path / "out")) == (len(HOSTILE), [])


# ---------------------------------------------------------------- members and headers of gigabytes


def write_sparse_tar(path: Path, members: list) -> None:
    """A tar with holes: ``members`` are ``(name, data)``, ``(name, head, size)`` (``head`` then zeros up
    to ``size`` bytes, left as a hole) or raw header blocks (bytes) followed by ``size`` bytes of hole,
    as ``(header, size)``."""
    with open(path, "wb") as handle:
        for member in members:
            if isinstance(member[0], bytes):  # a raw header, then its data as a hole
                handle.write(member[0])
                handle.seek(member[1], 1)
                continue
            name, head, size = member if len(member) == 3 else (*member, len(member[1]))
            info = tarfile.TarInfo(name)
            info.size = size
            handle.write(info.tobuf(tarfile.GNU_FORMAT))
            handle.write(head)
            handle.seek(size - len(head) + (-size % 512), 1)
        handle.write(b"\0" * 1024)


def with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def pax_header(size: int) -> bytes:
    """A PAX extended header claiming ``size`` bytes of records."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def gnu_sparse_header(name: str, stored: int, real: int, extended: bool = False) -> bytes:
    """A GNU sparse member ('S'): ``stored`` bytes of data in the tar stand for a file of ``real`` bytes."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, stored
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(stored, 12, tarfile.GNU_FORMAT)
    header[482] = int(extended)
    header[483:495] = tarfile.itn(real, 12, tarfile.GNU_FORMAT)
    return with_checksum(header)


def around(kind: str, hostile: list) -> list:
    return ([(f"{kind}-good.jpg", photo(1)), (f"{kind}-good.cls", b"0")] + hostile
            + [(f"{kind}-after.jpg", photo(2)), (f"{kind}-after.cls", b"1")])


def members_length(members: list[tuple[str, bytes]]) -> int:
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


VICTIM = [("pax-victim.jpg", photo(3)), ("pax-victim.cls", b"1")]
PAX_AT = members_length(around("pax", VICTIM)[:4])  # the PAX header: after pax-good and pax-victim
SPARSE = {  # shard -> (its members, the starts of its quarantined rows' reasons, whether <kind>-after is read)
    "member": (around("member", [("member-victim.jpg", photo(3), BIG), ("member-victim.cls", b"1")]),
               [f"member.tar: member 'member-victim.jpg': {BIG} bytes, over the {MEMBER_LIMIT}-byte limit"], True),
    "pax": (around("pax", [*VICTIM, (pax_header(BIG), BIG)]),  # the victim may go on past the header: cut short
            [f"pax.tar: cut short: the tar breaks after it (at byte {PAX_AT})",
             f"pax.tar: tar headers broken at byte {PAX_AT} (a header asks for {BIG} bytes of extended data, "
             f"over the {HEADER_LIMIT}-byte limit); the rest of the shard is unreadable"], False),
    "gnu-sparse": (around("gnu-sparse", [(gnu_sparse_header("gnu-sparse-victim.jpg", 512, HUGE), 512)]),
                   ["gnu-sparse.tar: member 'gnu-sparse-victim.jpg': not a regular file (GNU sparse file)"], True),
    "huge": (around("huge", [("huge-victim.jpg", photo(3), HUGE), ("huge-victim.cls", b"1")]),
             [f"huge.tar: member 'huge-victim.jpg': {HUGE} bytes, over the {MEMBER_LIMIT}-byte limit"], True),
}


@pytest.fixture(scope="module")
def sparse_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sparse")
    for kind, (members, _, _) in SPARSE.items():
        write_sparse_tar(folder / f"{kind}.tar", members)
    assert (folder / "huge.tar").stat().st_size > HUGE
    assert sum(path.stat().st_blocks for path in folder.iterdir()) * 512 < 64 << 20  # holes: no disk taken
    return folder


def vm_kib(process: psutil.Process, field: str) -> int:
    with open(f"/proc/{process.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


@contextmanager
def peak_memory():
    """Yields a dict that, once the block ends, maps each process of this test (itself, its Ray
    workers and daemons) to the resident memory it added at its peak, in bytes: each peak is reset
    (``/proc/PID/clear_refs``) when the block starts and measured from the memory then; a process that
    started inside the block (a new Ray worker, its imports) is measured from its memory at the end,
    which is what it needs to run: a shard held whole in a task is freed when the task ends."""
    me = psutil.Process()
    start = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            with open(f"/proc/{process.pid}/clear_refs", "w") as refs:
                refs.write("5")
            start[process.pid] = vm_kib(process, "VmRSS")
        except (OSError, psutil.Error):
            continue
    added: dict[str, int] = {}
    yield added
    for process in [me, *me.children(recursive=True)]:
        try:
            name = f"{process.pid} {' '.join(process.cmdline())[:60]}"
            base = start.get(process.pid) or vm_kib(process, "VmRSS")
            added[name] = (vm_kib(process, "VmHWM") - base) << 10
        except (OSError, psutil.Error, StopIteration):
            continue


def warm_workers() -> None:
    """Every Ray worker busy at once, importing what ingest tasks import (torch among it: hundreds of MB
    that peak_memory must not count as what reading a shard took)."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> None:
        import pipeline.ingest.in_place  # noqa: F401 - the import is the point
        time.sleep(0.5)

    ray.get([warm.remote() for _ in range(int(ray.cluster_resources()["CPU"]))])


def assert_sparse_rows(rows: list[dict], kinds) -> None:
    by_ref = {row["source_ref"]: row for row in rows}
    for kind in kinds:
        _, reasons, after_read = SPARSE[kind]
        hostile = sorted(row["reason"] for row in rows if row["source_ref"].startswith(f"{kind}.tar")
                         and row["status"] != "ok")
        assert len(hostile) == len(reasons), (kind, hostile)
        assert all(found.startswith(reason) for found, reason in zip(hostile, sorted(reasons))), (kind, hostile)
        assert by_ref[f"{kind}.tar[{kind}-good]"]["status"] == "ok"
        after = by_ref.get(f"{kind}.tar[{kind}-after]")
        assert (after["status"] == "ok") if after_read else after is None, (kind, after)


@pytest.mark.timeout(120)
def test_members_of_gigabytes_are_quarantined_unread_when_copied(ray_local, sparse_shards, tmp_path):
    """A member a header says is 1.5 or 64 GiB (really there, as a hole of a sparse file), a PAX header
    of 1.5 GiB, a GNU sparse member standing for 64 GiB: each is quarantined with its reason, never
    read. Right, rather than indexing the member: an image member over ``MEMBER_LIMIT`` (1 GiB) is
    far beyond any image onion accepts (--max-pixels), and reading it whole, as images are read, is
    what a hostile tar wants; a PAX header has no business holding megabytes; a GNU sparse member is no
    regular file, but the members after it are read as usual (its 64 GiB are not in the tar)."""
    warm_workers()
    with peak_memory() as added:
        started = time.monotonic()
        report = run_ingest(f"wds:{sparse_shards}/*.tar", tmp_path / "copy")
        took = time.monotonic() - started
    assert took < 60, took  # reading the 64 GiB member alone would take minutes
    assert max(added.values()) < MEMORY_LIMIT, added
    rows = rows_of(report.url)
    assert_accounted(report.url, rows)
    assert_sparse_rows(rows, SPARSE)


@pytest.mark.timeout(120)
def test_members_of_gigabytes_in_place_keep_memory_flat(ray_local, sparse_shards, tmp_path):
    """The same shards (but huge.tar) indexed in place: the same quarantined rows as a copy, with
    memory as flat. In place, a shard is hashed whole (``onion verify`` checks that sha256), so indexing
    time grows with a file's real size, not with what a header claims: the 1.5 GiB member takes a second
    or two, the 64 GiB one about a minute (test_a_64_gib_member_in_place_takes_no_memory, slow)."""
    kinds = ("member", "pax", "gnu-sparse")
    pattern = f"{sparse_shards}/{{{','.join(kinds)}}}.tar"
    before = {kind: (sparse_shards / f"{kind}.tar").stat() for kind in kinds}
    warm_workers()
    with peak_memory() as added:
        index_in_place(pattern, tmp_path / "out")
    assert max(added.values()) < MEMORY_LIMIT, added
    rows = rows_of(tmp_path / "out")
    assert_accounted(tmp_path / "out", rows)
    assert_sparse_rows(rows, kinds)
    copied = rows_of(run_ingest(f"wds:{pattern}", tmp_path / "copy").url)
    assert {(r["source_ref"], r["status"], r["reason"]) for r in rows} == {
        (r["source_ref"], r["status"], r["reason"]) for r in copied}
    entries = {entry["name"]: entry for entry in read_manifest(location(str(tmp_path / "out")))["shards"]}
    assert {name: entry["bytes"] for name, entry in entries.items()} == {
        f"{kind}.tar": stat.st_size for kind, stat in before.items()}
    for name in ("member.tar", "gnu-sparse.tar"):  # the whole file's sha256, holes and all
        with open(sparse_shards / name, "rb") as handle:
            assert entries[name]["sha256"] == hashlib.file_digest(handle, "sha256").hexdigest(), name
    with peak_memory() as added:
        assert verify_dataset(str(tmp_path / "out")) == (3, [])  # reads the 3 GiB of shards as a stream
    assert max(added.values()) < MEMORY_LIMIT, added
    assert_served_as_stored(sparse_shards, tmp_path / "out")
    assert {kind: (sparse_shards / f"{kind}.tar").stat().st_mtime for kind in kinds} == {
        kind: stat.st_mtime for kind, stat in before.items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_64_gib_member_in_place_takes_no_memory(ray_local, sparse_shards, tmp_path):
    warm_workers()
    with peak_memory() as added:
        index_in_place(f"{sparse_shards}/huge.tar", tmp_path / "out")
    assert max(added.values()) < MEMORY_LIMIT, added
    assert_sparse_rows(rows_of(tmp_path / "out"), ["huge"])


def test_a_gnu_sparse_header_cut_at_the_end_of_the_file_is_reported():
    """tarfile reads a GNU sparse header's extension blocks and indexes into them: cut off, that was
    an IndexError out of the walk instead of a reported break."""
    body = tar_bytes([("a.jpg", photo(1)), ("a.cls", b"0")])
    end = list(walk_tar(io.BytesIO(body), len(body)))[-1].offset + 512  # after a.cls's one block of data
    data = body[:end] + gnu_sparse_header("b.jpg", 0, 1 << 40, extended=True)
    members = list(walk_tar(io.BytesIO(data), len(data)))
    assert [m.name for m in members] == ["a.jpg", "a.cls", None]
    assert members[-1].problem.startswith(f"tar headers broken at byte {end} ("), members[-1]


# ---------------------------------------------------------------- PAX headers with odd paths


NON_UTF8 = "caf\udce9/000003.jpg"  # bytes 'caf\xe9': Latin-1, not UTF-8 (tarfile's surrogateescape)
DOTTED = "a.b/c.d/" + "e.f-long-folder/" * 7 + "000001.jpg"  # over USTAR's 100 bytes, dots in folders
ODD = {NON_UTF8: 3, DOTTED: 1, "slash/000002.jpg/": 2}


def odd_paths_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tar:
        for name, number in ODD.items():
            for member, data in ((name, photo(number)), (name.rstrip("/").replace(".jpg", ".cls"), b"1")):
                info = tarfile.TarInfo(member)
                info.size, info.pax_headers = len(data), {"path": member}  # the path in a PAX header, always
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_odd_pax_paths_are_indexed_as_webdataset_reads_them(ray_local, tmp_path):
    """Three PAX paths: one that is not UTF-8 (``hdrcharset=BINARY``), one of over 100 bytes with dots in
    its folders, one ending in ``/`` on a regular file. Each is indexed, not quarantined: they are sound
    names of sound members, and tarfile (so webdataset) reads them all, the last without its ``/``; the
    key is webdataset's (up to the first dot of the base name), the bytes are the member's, and the
    reader finds each member by the name its USTAR header holds (``member_name``: ASCII with ``?`` for
    the Latin-1 byte, the first 100 bytes of the long one, the one with the ``/``)."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "odd.tar").write_bytes(odd_paths_tar())
    before = files_of(source)
    index_in_place(f"{source}/odd.tar", tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert_accounted(tmp_path / "out", rows)
    assert len(rows) == 3 and all(row["status"] == "ok" and row["label"] == 1 for row in rows), rows
    data = (source / "odd.tar").read_bytes()
    names = {m.offset: m.name for m in walk_tar(io.BytesIO(data), len(data))}
    headers = {"caf?/000003.jpg": NON_UTF8, DOTTED[:100]: DOTTED, "slash/000002.jpg/": "slash/000002.jpg/"}
    assert sorted(row["member_name"] for row in rows) == sorted(headers)
    for row in rows:
        name = headers[row["member_name"]]
        assert names[row["image_offset"]] == name.rstrip("/") and source_member(source, row) == photo(ODD[name])
        shown = name.rstrip("/").removesuffix(".jpg").replace("\udce9", "\\xe9")  # the byte, escaped
        assert row["source_ref"] == f"odd.tar[{shown}]", row
    copied = rows_of(run_ingest(f"wds:{source}/odd.tar", tmp_path / "copy").url)
    assert {(r["key"], r["status"], r["reason"]) for r in rows} == {
        (r["key"], r["status"], r["reason"]) for r in copied}
    assert_served_as_stored(source, tmp_path / "out")
    assert verify_dataset(str(tmp_path / "out")) == (1, [])
    assert files_of(source) == before


# ---------------------------------------------------------------- shards on S3, changed under the index


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_shards_in_place_record_etags_and_a_changed_shard_is_named(ray_local, tmp_path):
    import fsspec

    from loopback import aws_environment, environment, moto_server

    shards = {f"part-{n}.tar": tar_bytes([member for i in range(2) for member in (
        (f"s{n}{i}.jpg", photo(n * 2 + i)), (f"s{n}{i}.cls", b"%d" % i))]) for n in range(2)}
    out = tmp_path / "out"
    with moto_server() as endpoint, environment(aws_environment(endpoint)):
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        store = fsspec.filesystem("s3")
        store.mkdir("onion-in-place")
        for name, data in shards.items():
            store.pipe_file(f"onion-in-place/wds/{name}", data)
        result = onion("ingest", "wds:s3://onion-in-place/wds/part-{0..1}.tar", out, "--in-place",
                       timeout=240, env={**os.environ, **aws_environment(endpoint)})
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = read_manifest(location(str(out)))
        assert manifest["shard_root"] == "s3://onion-in-place/wds"
        assert {e["name"]: e["etag"] for e in manifest["shards"]} == {
            name: hashlib.md5(data).hexdigest() for name, data in shards.items()}  # S3's ETag of one PUT
        rows = [row for row in rows_of(out) if row["status"] == "ok"]
        assert len(rows) == 4
        for row in rows:
            member = shards[row["shard"]][row["image_offset"]:row["image_offset"] + row["image_size"]]
            assert read_example(str(out), row["key"]).image == member
        streamed = {key: image for image, _, key in ShardDataset(str(out), shuffle=False)}
        assert set(streamed) == {row["key"] for row in rows if row["split"] == "train"}
        assert onion("verify", out, timeout=120, env={**os.environ, **aws_environment(endpoint)}).returncode == 0

        victim = next(row for row in rows if row["shard"] == "part-1.tar" and row["split"] == "train")
        changed = bytearray(shards["part-1.tar"])
        changed[victim["image_offset"] + 64:victim["image_offset"] + 96] = os.urandom(32)  # same size, header intact
        store.pipe_file("onion-in-place/wds/part-1.tar", bytes(changed))
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        result = onion("verify", out, timeout=120, env={**os.environ, **aws_environment(endpoint)})
        assert result.returncode == 1, result.stdout + result.stderr
        named = [line for line in result.stderr.splitlines() if "part-1.tar" in line]
        assert any("sha256" in line and "etag" in line for line in named), result.stderr
        assert any(victim["member_name"] in line and "sha256" in line for line in named), result.stderr
        assert "part-0.tar" not in result.stderr
        with pytest.raises(DatasetDamaged, match=rf"s3://onion-in-place/wds/part-1.tar: member "
                                                 rf"'{victim['member_name']}' \(key {victim['key']}\): its bytes"):
            read_example(str(out), victim["key"])
        with pytest.raises(DatasetDamaged, match=r"s3://onion-in-place/wds/part-1.tar: member .* its bytes do not"):
            list(ShardDataset(str(out), shards=["part-1.tar"], shuffle=False))
        kept = next(row for row in rows if row["shard"] == "part-0.tar")
        assert read_example(str(out), kept["key"]).image == shards["part-0.tar"][
            kept["image_offset"]:kept["image_offset"] + kept["image_size"]]  # the unchanged shard still serves
    fsspec.get_filesystem_class("s3").clear_instance_cache()
