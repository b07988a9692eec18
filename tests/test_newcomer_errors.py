"""A newcomer's mistakes end in one line and exit 2, never a traceback, and the messages say what is
really there (issue 30, points 3 and 4):

* a model onion cannot train (unknown name, not a ViT, a patch that does not divide the input), or a
  device that is not there, is refused before the run folder is claimed, by every command that
  trains (``onion train``, ``onion curate``); ``onion score`` refuses a --model its scorer ignores;
* a folder of plain WebDataset tars is named as such, not as an interrupted ingest;
* ``inspect --plot`` says why it draws fewer examples than the selection holds;
* the report names a curation run's rounds, not its first selection.
"""
import io
import json
from dataclasses import asdict

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from helpers import onion, write_direct_dataset
from pipeline.curation.rounds import CurationPlan
from pipeline.curation.scoring import ScoreContext, compute_scores, write_scores
from pipeline.curation.selection import SelectOptions, SelectRequest, make_selection
from pipeline.ingest.job import IngestOptions, check_output
from pipeline.ingest.sources import SourceError, open_source
from pipeline.inspection.plots import histogram_figure
from pipeline.report.gather import read_run
from shards import DatasetError, UsageError, location, read_manifest
from shards.selections import read_selection
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.model import check_model
from trainer.preflight import check_device
from trainer.run_folder import CURATION

TINY = ["--epochs", "1", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "8",
        "--loader-workers", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 train examples of 8x8 pixels in 3 classes (no Ray, no val split: the checks come first)."""
    url = str(tmp_path_factory.mktemp("data") / "tiny")
    write_direct_dataset(url, [20, 20])
    return url


def one_line_exit_2(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# --- point 3: no tracebacks from the model or the device -------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--model", "not_a_model"], ["--model not_a_model", "timm has no model", "deit_tiny_patch16_224",
                                  "timm.list_models"]),
    (["--model", "resnet18"], ["--model resnet18 is not a timm VisionTransformer", "deit_tiny_patch16_224",
                               "timm.list_models"]),
    (["--patch-size", "3"], ["--patch-size 3 does not divide", "8 is not a multiple of 3"]),
    (["--device", "cuda:64" if torch.cuda.is_available() else "cuda"], ["--device cuda", "CUDA device"]),
])
def test_train_refuses_a_model_or_device_in_one_line_before_claiming(dataset, tmp_path, flags, words):
    run = tmp_path / "run"
    line = one_line_exit_2(onion("train", dataset, "--out", run, *TINY, *flags))
    assert line.startswith("onion train: error:") and all(word in line for word in words), line
    assert not run.exists()  # checked before the folder was claimed


def test_curate_refuses_a_model_that_is_not_a_vit_before_round_0(dataset, tmp_path):
    run = tmp_path / "run"
    line = one_line_exit_2(onion("curate", dataset, "--out", run, *TINY[2:], "--model", "resnet18"))
    assert "--model resnet18 is not a timm VisionTransformer" in line, line
    assert not run.exists() and not (location(dataset).child("selections").exists())


def tiny_config(**settings) -> TrainConfig:
    return TrainConfig(**{"dataset": "DATA", "out": "RUN", "depth": 1, "embed_dim": 32, "num_heads": 2, **settings})


def test_a_patch_that_does_not_divide_the_image_is_refused_naming_both_numbers():
    with pytest.raises(RunError, match=r"--patch-size 7 does not divide the dataset's 64 px images: 64 is not a "
                                       r"multiple of 7.*divides 64 \(2, 4, 8, 16\).*multiple of 7 \(63 or 70\)"):
        check_model(tiny_config(patch_size=7), 64, 10)
    with pytest.raises(RunError, match="the default patch size 4 does not divide the dataset's 18 px images"):
        check_model(tiny_config(), 18, 10)  # 4 for images of 16+ pixels
    with pytest.raises(RunError, match="--patch-size 4 does not divide --img-size 30"):
        check_model(tiny_config(patch_size=4, img_size=30), 30, 10)
    check_model(tiny_config(patch_size=8), 64, 10)  # divides: no error


@pytest.mark.parametrize("settings, words", [
    (dict(model="eva02_tiny_patch14_224"), "is a timm Eva, which onion cannot make sparse"),
    (dict(model="vit_small_patch16_18x2_224"), "ParallelThingsBlock"),  # a ViT whose blocks sparsify refuses
    (dict(embed_dim=30, num_heads=4), "cannot be built with img_size=8, patch_size=2, depth=1, embed_dim=30"),
    (dict(token_blocks=[0, 3]), "--token-blocks 0,3: block 3 is outside the model's 1 blocks"),
])
def test_models_onion_cannot_sparsify_are_named(settings, words):
    with pytest.raises(RunError, match=words):
        check_model(tiny_config(**settings), 8, 10)


def test_a_missing_device_is_named_with_the_way_out():
    check_device("auto")
    check_device("cpu")
    with pytest.raises(RunError, match="--device gpu: not a device torch knows"):
        check_device("gpu")
    if torch.cuda.is_available():
        with pytest.raises(RunError, match=f"this machine has {torch.cuda.device_count()} CUDA device"):
            check_device("cuda:64")
    else:
        with pytest.raises(RunError, match="no CUDA device is available here.*--device cpu.*--device auto"):
            check_device("cuda")


def test_score_refuses_a_model_its_scorer_would_ignore(dataset, tmp_path):
    line = one_line_exit_2(onion("score", dataset, "el2n", "--run", tmp_path / "run", "--model", "resnet18"))
    assert "--model and --weights choose embed's features; el2n scores with the model --run trained" in line, line


def test_embed_names_a_bad_model_or_weights_file(tmp_path):
    from pipeline.curation.scoring.embeddings import timm_model

    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(UsageError, match="--model not_a_model: timm has no model"):
        timm_model("not_a_model", str(junk))
    with pytest.raises(UsageError, match="--weights .*missing.pt: no such file"):
        timm_model("resnet18", str(tmp_path / "missing.pt"))
    with pytest.raises(UsageError, match="--weights .*weights.safetensors: (not safetensors|neither safetensors)"):
        timm_model("resnet18", str(junk))
    import timm
    from safetensors.torch import save_file

    vit = tmp_path / "vit.safetensors"  # sound weights, of another architecture
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).state_dict(), str(vit))
    with pytest.raises(UsageError, match="--model resnet18 --weights .*vit.safetensors: cannot load the file as its"):
        timm_model("resnet18", str(vit))


# --- point 4: messages that say what is really there -----------------------------------------------------------

@pytest.fixture
def webdataset_shards(tmp_path):
    """Two real WebDataset shards (webdataset's own TarWriter), as someone else's pipeline writes them."""
    import webdataset as wds

    folder = tmp_path / "wds"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for shard in range(2):
        with wds.TarWriter(str(folder / f"shard-{shard:06d}.tar")) as sink:
            for i in range(4):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
                sink.write({"__key__": f"s{shard}-{i:04d}", "png": png.getvalue(), "cls": str(i % 2).encode()})
    return folder


FOREIGN = "holds 2 .tar files ('shard-000000.tar', ...) but no manifest.json, index.parquet or _ingest.json: " \
          "plain WebDataset shards that onion did not write, not an onion dataset"


def test_a_folder_of_webdataset_shards_is_named_not_called_an_unfinished_ingest(webdataset_shards, tmp_path):
    url = str(webdataset_shards)
    with pytest.raises(DatasetError, match="plain WebDataset shards") as raised:
        read_manifest(location(url))
    assert FOREIGN in str(raised.value) and f"onion ingest wds:'{url}/*.tar' OUT" in str(raised.value)
    assert "interrupted" not in str(raised.value) and "run the same command again" not in str(raised.value)
    with pytest.raises(SourceError, match="plain WebDataset shards"):  # as ingest's SOURCE
        open_source(url)
    with pytest.raises(DatasetError, match="plain WebDataset shards.*Choose an empty or new output folder"):
        check_output(location(url), "fingerprint", open_source("digits"), IngestOptions())  # as ingest's OUT
    line = one_line_exit_2(onion("train", url, "--out", tmp_path / "run"))
    assert FOREIGN in line and "interrupted" not in line, line


def test_an_unfinished_ingest_is_still_called_one(webdataset_shards):
    (webdataset_shards / "_ingest.json").write_text('{"fingerprint": "x", "source": "digits"}')  # ingest's claim
    with pytest.raises(DatasetError, match="incomplete .an ingest is running or was interrupted"):
        read_manifest(location(str(webdataset_shards)))


def test_ingest_from_a_folder_of_webdataset_shards_says_what_it_is(webdataset_shards, tmp_path):
    line = one_line_exit_2(onion("ingest", webdataset_shards, tmp_path / "out"))
    assert FOREIGN in line and "unknown source" not in line, line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """Round 0 keeps half at random; round 1 (as onion select --round 1 makes it) swaps 5 on scores of
    round 0's kept only, as a curation's dynamics scores are: the restored and the earlier drops have none."""
    url = str(tmp_path_factory.mktemp("rounds") / "data")
    write_direct_dataset(url, [40, 40])
    dataset = location(url)
    first = make_selection(dataset, SelectRequest(round_number=0, options=SelectOptions(keep=0.5, seed=1))).version
    initial = read_selection(dataset, first)
    trained = initial.filter(initial["kept"])["key"]
    scores = compute_scores("random", ScoreContext(url, seed=3))
    write_scores(dataset, "trained", scores.filter(pc.is_in(scores["key"], trained)))
    second = make_selection(dataset, SelectRequest(scores="trained", round_number=1, parent=first, remove_n=5)).version
    table = read_selection(dataset, second)
    return url, second, table


def test_the_plot_says_why_it_draws_fewer_than_the_selection_holds(rounds, tmp_path):
    url, version, table = rounds
    scored = [not np.isnan(score) for score in table["score"].to_numpy(zero_copy_only=False)]
    assert 0 < sum(scored) < table.num_rows  # the situation: some examples of the selection have no score
    figure, note = histogram_figure(url, version)
    texts = [text.get_text().replace("\n", " ") for text in figure.texts]
    plt.close(figure)
    assert note and "v0002 keeps 40 and drops 40; the plot draws only the 40 with a score (35 kept, 5 dropped)" in note
    assert "Not drawn, having no score: 5 kept (restored@r1 5) and 35 dropped (random-initial 35)" in note
    assert "a round scores only the examples its parent kept" in note
    assert note in texts  # the caption on the figure itself
    result = onion("inspect", url, "--selection", version, "--plot", tmp_path / "plot.png")
    assert result.returncode == 0, result.stderr
    assert note in " ".join(result.stdout.split()), result.stdout[-2000:]  # and printed
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_the_report_names_a_curation_runs_rounds(tmp_path):
    """A run folder as onion curate leaves it (here with a config.json naming a selection, as a plain run's
    would): curation.json lists every round's selection, and the report names them."""
    run = tmp_path / "run"
    run.mkdir()
    plan = CurationPlan(rounds=3, round_epochs=2, keep=0.8, remove_n=60, scorer="forgetting")
    config = TrainConfig(dataset="DATA", out=str(run), epochs=6, selection="v0001")
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    (run / CURATION).write_text(json.dumps({"dataset": "DATA", "plan": asdict(plan),
                                                 "selections": ["v0001", "v0002", "v0003"]}))
    (run / "summary.json").write_text('{"val_top1": 71.5, "epochs": 6, "images_per_second": 803.0}')
    assert read_run(str(run))["examples"] == "curation: 3 rounds (v0001 … v0003)"
    (run / CURATION).write_text(json.dumps({"dataset": "DATA", "plan": asdict(plan), "selections": ["v0001"]}))
    assert read_run(str(run))["examples"] == "curation: 1 of 3 rounds (v0001)"  # stopped after round 0
    (run / CURATION).unlink()
    assert read_run(str(run))["examples"] == "v0001"  # a plain run on a selection
