"""The hostile-shard catalogue: shards damaged or crafted after they were written. The reader stops
with an error naming the shard and member (never yields wrong samples, never hangs), ``onion
verify`` lists every problem, and nothing is ever written outside the dataset (nothing is extracted)."""
import hashlib
import io
import json
import os
import tarfile

import pytest

from helpers import onion, write_direct_dataset
from shards import DatasetError, ShardDataset
from shards.verify import verify_dataset

SHARD = "train-000001.tar"  # holds ex-00005 .. ex-00009
VICTIM = "ex-00006"


def members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(info, data[info.offset_data:info.offset_data + info.size]) for info in tar]


def rebuild(pairs: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, payload in pairs:
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def edit_header(data: bytes, member: str, **fields: bytes) -> bytes:
    """Overwrite raw header fields of ``member`` in place (offsets stay) and fix the header checksum."""
    places = {"name": (0, 100), "size": (124, 136), "type": (156, 157), "linkname": (157, 257)}
    info = next(info for info, _ in members(data) if info.name == member)
    header = bytearray(data[info.offset:info.offset + 512])
    for field, value in fields.items():
        start, stop = places[field]
        header[start:stop] = value.ljust(stop - start, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:info.offset] + bytes(header) + data[info.offset + 512:]


def truncated(data):
    return data[: len(data) // 2]


def flipped(data):
    info = next(info for info, _ in members(data) if info.name == f"{VICTIM}.png")
    damaged = bytearray(data)
    damaged[info.offset_data + 40] ^= 0xFF
    return bytes(damaged)


def member_missing(data):
    return rebuild([(i, p) for i, p in members(data) if i.name != f"{VICTIM}.png"])


def out_of_order(data):
    pairs = members(data)
    return rebuild(pairs[3:6] + pairs[:3] + pairs[6:])  # ex-00006's members before ex-00005's


def duplicate_key(data):
    return edit_header(data, "ex-00007.png", name=f"{VICTIM}.png".encode())


HUGE = (8 << 30) - 1  # a member "of 8 GiB" in a shard of a few KB
SIZE_8_GIB = b"%011o\0" % HUGE
HOSTILE = {
    "truncated tar": (truncated, "ex-0000", "truncated"),
    "flipped bytes in a member": (flipped, VICTIM, "do not match the sha256"),
    "member missing": (member_missing, VICTIM, "the tar header says 1 bytes"),  # its .cls member is there now
    "keys out of order": (out_of_order, "ex-00005", f"names '{VICTIM}.png'"),
    "duplicate keys": (duplicate_key, "ex-00007", f"names '{VICTIM}.png'"),
    "'..' in a member name": (lambda d: edit_header(d, f"{VICTIM}.png", name=b"../evil.png"), VICTIM,
                              "'../evil.png'"),
    "absolute member name": (lambda d: edit_header(d, f"{VICTIM}.png", name=b"/etc/evil.png"), VICTIM,
                             "'/etc/evil.png'"),
    "symbolic-link member": (lambda d: edit_header(d, f"{VICTIM}.png", type=b"2", linkname=b"/etc/passwd"), VICTIM,
                             "not a regular file"),
    "hard-link member": (lambda d: edit_header(d, f"{VICTIM}.png", type=b"1", linkname=b"ex-00005.png"), VICTIM,
                         "not a regular file"),
    "gigantic member header": (lambda d: edit_header(d, f"{VICTIM}.png", size=SIZE_8_GIB), VICTIM,
                               "the tar header says"),
}
VERIFY_FINDS = {  # what onion verify says about each (besides the shard's checksum)
    "truncated tar": "truncated or replaced",
    "flipped bytes in a member": f"{VICTIM}.png: bytes do not match",
    "member missing": f"{VICTIM}.png: listed in the index but missing",
    "keys out of order": "not in the index's order",
    "duplicate keys": f"{VICTIM}.png: appears twice",
    "'..' in a member name": "../evil.png: unsafe member name",
    "absolute member name": "/etc/evil.png: unsafe member name",
    "symbolic-link member": "not a regular file (symbolic link to /etc/passwd)",
    "hard-link member": "not a regular file (hard link to ex-00005.png)",
    "gigantic member header": f"{VICTIM}.png: header claims {HUGE} bytes",
}


@pytest.fixture
def dataset(tmp_path):
    url = tmp_path / "ds"
    write_direct_dataset(str(url), [5, 5, 5])
    return url


def read_all(url, verify="members"):
    return [key for _, _, key in ShardDataset(str(url), shuffle=False, verify=verify)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_shard_gives_an_error_naming_shard_and_member(dataset, kind):
    damage, member, message = HOSTILE[kind]
    before = set(os.listdir(dataset.parent))
    (dataset / SHARD).write_bytes(damage((dataset / SHARD).read_bytes()))
    with pytest.raises(DatasetError) as raised:
        read_all(dataset)
    error = str(raised.value)
    assert f"{SHARD}: " in error and member in error and message in error, error
    checked, problems = verify_dataset(str(dataset))
    found = [str(problem) for problem in problems]
    assert checked == 3 and all(text.startswith(SHARD) for text in found), found
    assert any("does not match the manifest" in text for text in found), found
    assert any(VERIFY_FINDS[kind] in text for text in found), found
    assert set(os.listdir(dataset.parent)) == before and not os.path.exists("/etc/evil.png")  # nothing extracted


def test_manifest_checksum_mismatch_is_caught_in_whole_shard_mode(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=f"{SHARD}: sha256 .* does not match the manifest"):
        read_all(dataset, verify="shards")
    actual = hashlib.sha256((dataset / SHARD).read_bytes()).hexdigest()[:16]
    assert [str(p) for p in verify_dataset(str(dataset))[1]] == [
        f"{SHARD}: sha256 {actual}... does not match the manifest's {'0' * 16}..."]


def test_missing_shard_file_is_named(dataset):
    (dataset / SHARD).unlink()
    with pytest.raises(DatasetError, match=f"{SHARD}: missing"):
        read_all(dataset)
    assert [str(p) for p in verify_dataset(str(dataset))[1]] == [f"{SHARD}: missing from storage"]


def test_onion_verify_command(dataset):
    healthy = onion("verify", dataset, timeout=120)
    assert healthy.returncode == 0 and "3 shards verified, no problems" in healthy.stdout
    (dataset / SHARD).write_bytes(out_of_order((dataset / SHARD).read_bytes()))
    damaged = onion("verify", dataset, timeout=120)
    assert damaged.returncode == 1
    assert "not in the index's order" in damaged.stderr and f"{SHARD}: member ex-00005.png" in damaged.stderr
