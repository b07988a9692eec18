import io
import tarfile

import pytest

from shards.tarwriter import ShardExample, build_shard, check_key


def examples():
    return [ShardExample(f"k{i}", bytes([i]) * (100 + 700 * i), "png", i % 3, {"key": f"k{i}"}) for i in range(4)]


def test_spans_point_at_member_data():
    data, written = build_shard(examples())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for example, spans in zip(examples(), written, strict=True):
            member = tar.extractfile(f"{example.key}.png").read()
            assert member == example.image
            assert data[spans.image.offset : spans.image.offset + spans.image.size] == example.image
            assert data[spans.cls.offset : spans.cls.offset + spans.cls.size] == str(example.label).encode()
            json_bytes = data[spans.json.offset : spans.json.offset + spans.json.size]
            assert tar.extractfile(f"{example.key}.json").read() == json_bytes


def test_same_input_gives_identical_bytes_and_fixed_headers():
    first, _ = build_shard(examples())
    second, _ = build_shard(examples())
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["k0.png", "k0.cls", "k0.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "x" * 91, "é"])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValueError, match="invalid example key"):
        check_key(key)
