"""``onion select`` on a partitioned dataset: decided on Ray actors, stored one part per index part.

The decisions must be those of the single-process functions (``select``, ``initial_round``,
``next_round``) on the same rows, whatever the number of actors, and the stored bytes the same.
The dataset has quarantined examples, exact duplicates across shards and scores with many ties,
stored one part per index part as ``onion score`` stores them."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from helpers import files_of, onion, onion_ok
from pipeline.curation.scoring import ScoreContext, compute_scores, read_scores, write_scores
from pipeline.curation.selection import (
    SelectOptions,
    SelectRequest,
    duplicate_drops,
    initial_round,
    make_selection,
    next_round,
    select,
)
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import open_source
from shards import DatasetDamaged, location
from shards.index import index_parts
from shards.manifest import read_manifest
from shards.reader import ShardDataset
from shards.selections import SourceExamples, partitioned_version, read_selection

COLUMNS = ["key", "label", "kept", "score", "rank", "reason", "round", "parent", "strategy"]


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory) -> str:
    """150 digits in 3 class folders, 6 of them copied into other names (exact duplicates, some in other
    shards), 4 files that are not images (quarantined); ingested in shards of 16 examples."""
    folder = tmp_path_factory.mktemp("photos") / "digits"
    digits = load_digits()
    for i in range(150):
        label = int(digits.target[i]) % 3
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 15).astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16)).save(folder / f"c{label}" / f"img{i:03d}.png")
    for i in range(6):
        shutil.copy(sorted((folder / "c0").glob("img*.png"))[i * 5], folder / "c0" / f"zcopy{i}.png")
    for i in range(4):
        (folder / "c1" / f"broken{i}.png").write_bytes(b"not an image " + bytes([i]))
    out = tmp_path_factory.mktemp("data") / "ds"
    ingest(open_source(f"imagefolder:{folder}"), str(out), IngestOptions(shard_size=16), command=["test"],
           progress=False)
    dataset = location(str(out))
    assert index_parts(read_manifest(dataset)) is not None and len(index_parts(read_manifest(dataset))) >= 8
    source = SourceExamples.of(dataset)
    assert (~source.ok).sum() >= 1  # quarantined train rows are part of the picture
    scores = compute_scores("random", ScoreContext(str(out), seed=5))
    tied = np.round(scores["score"].to_numpy(), 1)  # about ten distinct values: ties everywhere
    keep = np.arange(scores.num_rows) % 7 != 3  # and some examples without a score
    write_scores(dataset, "tied", scores.set_column(1, "score", pa.array(tied)).filter(pa.array(keep))
                 .replace_schema_metadata(scores.schema.metadata))
    onion_ok("score", out, "exact", "--ray-cpus", "1")
    return str(out)


def single_process(dataset, request: SelectRequest) -> pa.Table:
    """The rows the single-process functions give for ``request``."""
    data = location(dataset)
    source = SourceExamples.of(data)
    scores = read_scores(data, request.scores) if request.scores else None
    groups = read_scores(data, request.dedup) if request.dedup else None
    o = request.options
    if request.round_number is None:
        return select(source, scores, o, groups, request.then_strategy)
    if request.round_number == 0:
        return initial_round(source, o.keep, o.seed,
                             duplicate_drops(source, groups, o.dedup_rule) if groups is not None else None)
    return next_round(source, read_selection(data, request.parent), request.parent, scores, request.remove_n,
                      request.round_number, o.seed)


REQUESTS = {
    "drop-easy": SelectRequest("tied", SelectOptions(keep=0.7)),
    "drop-hard, class-balanced": SelectRequest("tied", SelectOptions(keep=0.6, strategy="drop-hard",
                                                                     class_balanced=True)),
    "random": SelectRequest(None, SelectOptions(keep=0.5, strategy="random", seed=3)),
    "stratified (CCS), class-balanced": SelectRequest("tied", SelectOptions(keep=0.5, strategy="stratified",
                                                                            class_balanced=True, bins=4, seed=2)),
    "dedup, then drop-easy": SelectRequest("tied", SelectOptions(keep=0.8), dedup="exact"),
    "dedup (typical), then random": SelectRequest(None, SelectOptions(keep=0.75, strategy="random",
                                                                      dedup_rule="typical"), dedup="exact"),
    "dedup only": SelectRequest(None, SelectOptions(keep=0.8, strategy="drop-easy"), dedup="exact"),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_each_strategy_decides_as_one_process_does_with_1_and_3_actors(dataset, name):
    request = REQUESTS[name]
    expected = single_process(dataset, request)
    data = location(dataset)
    made = make_selection(data, request, workers=3)
    assert partitioned_version(data, made.version) is not None  # stored as parts, not as one file
    got = read_selection(data, made.version)
    assert got.select(COLUMNS).to_pylist() == expected.select(COLUMNS).to_pylist()
    assert (made.kept, made.rows) == (sum(expected["kept"].to_pylist()), expected.num_rows)
    if name.startswith("dedup"):
        assert any(r.startswith("duplicate-of:") for r in got["reason"].to_pylist())
    # one actor finds the same rows: its fingerprint names the version already stored
    assert make_selection(data, request, workers=1).version == made.version


def test_rounds_decide_as_one_process_does(dataset):
    data = location(dataset)
    first = SelectRequest(None, SelectOptions(keep=0.6, seed=4), dedup="exact", round_number=0)
    made = make_selection(data, first, workers=2)
    assert read_selection(data, made.version).select(COLUMNS).to_pylist() == \
        single_process(dataset, first).select(COLUMNS).to_pylist()
    later = SelectRequest("tied", SelectOptions(seed=4), round_number=1, parent=made.version, remove_n=9)
    second = make_selection(data, later, workers=3)
    got = read_selection(data, second.version)
    assert got.select(COLUMNS).to_pylist() == single_process(dataset, later).select(COLUMNS).to_pylist()
    assert sum(r.startswith("restored@r1") for r in got["reason"].to_pylist()) == 9


def test_the_stored_bytes_do_not_depend_on_the_number_of_actors(dataset, tmp_path):
    copies = []
    for workers in (1, 3):
        copy = tmp_path / f"w{workers}"
        shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("selections"))
        made = make_selection(location(str(copy)), REQUESTS["stratified (CCS), class-balanced"], workers=workers)
        assert made.version == "v0001"
        copies.append(files_of(copy / "selections"))
    assert copies[0] == copies[1]
    layout = json.loads(copies[0]["v0001.json"])
    assert len(layout["parts"]) == len(index_parts(read_manifest(location(dataset))))
    assert sum(p["rows"] for p in layout["parts"]) == layout["rows"] == SourceExamples.of(location(dataset)).keys.size


def test_the_command_line_prints_the_version_file_and_a_reader_reads_only_the_kept(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("selections"))
    printed = onion_ok("select", copy, "--scores", "tied", "--keep", "0.7", "--ray-cpus", "2").stdout
    assert f"{copy}/selections/v0001.json: kept " in printed.replace("\n", "")
    table = read_selection(location(str(copy)), "v0001")
    kept = set(table.filter(table["kept"])["key"].to_pylist())
    assert set(ShardDataset(str(copy), selection="v0001").keys()) == kept
    read = [key for _, _, keys in ShardDataset(str(copy), selection="v0001", batch_size=8) for key in keys]
    assert sorted(read) == sorted(kept)  # each kept example once, no other


def test_a_missing_or_changed_part_is_named(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("selections"))
    version = make_selection(location(str(copy)), REQUESTS["random"], workers=2).version
    layout = json.loads((copy / "selections" / f"{version}.json").read_text())
    part = copy / "selections" / layout["folder"] / layout["parts"][2]["name"]
    data = part.read_bytes()
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DatasetDamaged, match=f"{part}: sha256 does not match selection {version}"):
        read_selection(location(str(copy)), version)
    part.unlink()
    with pytest.raises(DatasetDamaged, match=f"{part}: missing"):
        read_selection(location(str(copy)), version)
    assert hashlib.sha256(data).hexdigest() == layout["parts"][2]["sha256"]


def test_quarantined_rows_are_accounted_in_every_part(dataset):
    data = location(dataset)
    made = make_selection(data, REQUESTS["drop-easy"], workers=2)
    table = read_selection(data, made.version)
    reasons = table["reason"].to_pylist()
    quarantined = reasons.count("quarantined")
    assert quarantined == int((~SourceExamples.of(data).ok).sum()) >= 1
    assert made.kept + sum(r not in ("kept", "quarantined") for r in reasons) + quarantined == made.rows
    assert pc.sum(table["kept"]).as_py() == made.kept



def test_scores_are_stored_per_index_part_and_an_earlier_single_file_still_selects(dataset, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("selections"))
    data = location(str(copy))
    layout = json.loads((copy / "scores" / "tied.json").read_text())
    scored = read_scores(data, "tied")
    assert sum(entry["rows"] for entry in layout["parts"]) == layout["rows"] == scored.num_rows
    assert {entry["name"] for entry in layout["parts"]} <= {part.name for part in index_parts(read_manifest(data))}
    for entry in layout["parts"]:  # each part holds exactly the scored keys of its index part, by key
        part = pq.read_table(copy / "scores" / layout["folder"] / entry["name"])
        index = pq.read_table(copy / "index" / entry["name"], columns=["key"])
        assert part["key"].to_pylist() == sorted(part["key"].to_pylist())
        assert set(part["key"].to_pylist()) <= set(index["key"].to_pylist())
    partitioned = make_selection(data, REQUESTS["drop-easy"], workers=2)
    # the same scores as one file (as an earlier onion wrote them): the actors scan it, the same decisions
    shutil.rmtree(copy / "scores" / "parts")
    (copy / "scores" / "tied.json").unlink()
    pq.write_table(scored, copy / "scores" / "tied.parquet")
    assert make_selection(data, REQUESTS["drop-easy"], workers=3).version == partitioned.version
    # scoring again writes parts in place of the single file, and drops the parts it replaces
    write_scores(data, "tied", scored.slice(0, 20))
    assert not (copy / "scores" / "tied.parquet").exists()
    write_scores(data, "tied", scored)
    assert len(list((copy / "scores" / "parts" / "tied").iterdir())) == 1
    assert read_scores(data, "tied").equals(scored)
    entry = json.loads((copy / "scores" / "tied.json").read_text())["parts"][0]
    (copy / "scores" / json.loads((copy / "scores" / "tied.json").read_text())["folder"] / entry["name"]).unlink()
    with pytest.raises(DatasetDamaged, match=f"{entry['name']}: missing \\(scores/tied.json lists it"):
        read_scores(data, "tied")


def test_the_driver_reads_only_the_copies_of_a_grouping_table(dataset):
    from pipeline.curation.selection import read_grouping

    data = location(dataset)
    whole = read_scores(data, "exact")
    copies = read_grouping(data, "exact", only_copies=True)
    assert 0 < copies.num_rows < whole.num_rows
    expected = whole.filter(pc.greater(whole["group_size"], 1)).sort_by("key")
    assert copies.sort_by("key").to_pylist() == expected.to_pylist()


def test_a_later_round_from_a_single_file_parent_decides_as_one_process_does(dataset, tmp_path):
    from shards.selections import save_selection

    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("selections"))
    data = location(str(copy))
    first = SelectRequest(None, SelectOptions(keep=0.6, seed=6), round_number=0)
    parent = save_selection(data, single_process(str(copy), first), {"round": 0})  # one file, as curate writes
    assert (copy / "selections" / f"{parent}.parquet").exists()
    later = SelectRequest("tied", SelectOptions(seed=6), round_number=1, parent=parent, remove_n=7)
    made = make_selection(data, later, workers=2)
    assert partitioned_version(data, made.version) is not None
    assert read_selection(data, made.version).select(COLUMNS).to_pylist() == \
        single_process(str(copy), later).select(COLUMNS).to_pylist()


@pytest.mark.slow  # ~20 s: a select killed after its first part, then verify
def test_verify_names_a_parts_folder_that_no_version_lists(dataset, tmp_path):
    """A select killed after writing a part but before its JSON leaves a folder no version lists: the
    same select run again reuses it, and ``onion verify`` names the one a select of other inputs left."""
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("selections"))
    select = ["select", copy, "--strategy", "random", "--keep", "0.5", "--ray-cpus", "1"]

    def killed_after_its_first_part(seed: int) -> None:
        fault = {"ONION_FAULT_COUNTER": str(tmp_path / f"boundaries-{seed}"), "ONION_FAULT_AT": "1",
                 "ONION_FAULT_MATCH": f"rename {copy}/selections/parts/"}
        result = onion(*select, "--seed", seed, env={**os.environ, **fault}, start_new_session=True, timeout=300)
        assert result.returncode == -9, result.stderr[-2000:]

    killed_after_its_first_part(1)
    onion_ok(*select, "--seed", 1, timeout=300)  # the same inputs: the same folder, now listed
    assert onion_ok("verify", copy, timeout=120).stdout.count("no version lists") == 0
    killed_after_its_first_part(2)
    left = [name for name in (copy / "selections" / "parts").iterdir()
            if name.name not in (copy / "selections" / "v0001.json").read_text()]
    assert len(left) == 1
    said = onion_ok("verify", copy, timeout=120).stdout
    assert "1 selection parts folder(s) that no version lists" in said
    assert f"selections/parts/{left[0].name}" in said
