"""``onion report`` in a real browser: headless Chromium opens the static site from file:// and the
test reads what a person sees (counts, filtered galleries, lineage, comparisons) and checks it
against the Parquet files, with no network request and no console error. Also: hostile names stay
text, two builds give the same bytes, a missing or damaged dataset gives one line and no site.

The browser is Debian's ``chromium`` (``./run.sh test`` installs it when missing), driven by the
``playwright`` package. Without it these tests fail, saying how to install it: a report nobody has
opened in a browser is not tested.
"""
import csv
import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from helpers import files_of, onion, png_bytes, random_pixels, write_direct_dataset
from pipeline.curation.scoring import ScoreContext, compute_scores, read_scores, write_scores
from pipeline.curation.selection import SelectOptions, SelectRequest, make_selection
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from pipeline.inspection.selections import describe_key, selection_diff
from pipeline.report import ReportOptions, build_report
from pipeline.report.thumbnails import ThumbnailLimits
from shards import location, read_index
from shards.selections import read_selection

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "report.png"  # written only with ONION_SAVE_SCREENSHOT=1 (the README's picture)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no browser at {CHROMIUM}: the report tests need Debian's chromium "
                    "(./run.sh test installs it; or: sudo apt-get install -y chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the report tests need the playwright package: pip install -e '.[test]'", pytrace=False)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """One report page in the browser, recording console errors, page errors, dialogs and every
    request that is not to a file:// URL."""

    def __init__(self, browser, site: Path, fragment: str = "", height: int = 900) -> None:
        self.problems: list[str] = []
        self.context = browser.new_context(viewport={"width": 1360, "height": height})
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.on("request", lambda r: r.url.startswith("file://") or self.problems.append(f"request: {r.url}"))
        self.page.goto((site / "index.html").as_uri() + fragment)
        self.page.wait_for_function("window.ONION_READY === true")

    def tab(self, name: str) -> None:
        self.page.click(f"#tabs a[data-tab={name}]")
        self.page.wait_for_selector(f"#tab-{name}:not([hidden])")  # hashchange is handled after the click

    def js(self, expression: str, argument=None):
        return self.page.evaluate(expression, argument)

    def close(self) -> None:
        self.context.close()
        assert not self.problems, self.problems


@pytest.fixture(scope="module")
def curated(ray_local, tmp_path_factory):
    """Synthetic data with planted copies: exact groups, a dedup selection and two curation rounds,
    and a small training run folder, so every part of the page has something to show."""
    root = tmp_path_factory.mktemp("report")
    url = str(root / "syn")
    source = open_source("synthetic", SourceOptions(count=600, image_size=16, dup_rate=0.1, near_dup_rate=0.05,
                                                    flip_rate=0.05))
    ingest(source, url, IngestOptions(shard_size=100), command=["test"], progress=False)
    dataset = location(url)
    write_scores(dataset, "exact", compute_scores("exact", ScoreContext(url, progress=False)))
    write_scores(dataset, "random", compute_scores("random", ScoreContext(url, seed=3)))
    make_selection(dataset, SelectRequest(dedup="exact", options=SelectOptions(keep=0.8, strategy="random")))
    first = make_selection(dataset, SelectRequest(round_number=0, options=SelectOptions(keep=0.8, seed=1))).version
    make_selection(dataset, SelectRequest(scores="random", round_number=1, parent=first, remove_n=40))
    run = root / "run"
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train_loss", "train_top1", "val_top1", "val_loss", "lr", "token_keep",
                         "attn_keep", "images_per_second", "epoch_seconds"])
        for epoch in range(1, 5):
            writer.writerow([epoch, epoch * 10, 2.3 / epoch, 20 * epoch, "nan" if epoch < 4 else 71.5,
                             "nan" if epoch < 4 else 0.9, 1e-3, 1.0 if epoch == 1 else 0.7, 0.3, 800 + epoch, 1.5])
    (run / "summary.json").write_text('{"val_top1": 71.5, "epochs": 4, "images_per_second": 803.0}')
    site = root / "site"
    build_report(ReportOptions(url, str(site), all_selections=True, runs=(str(run),), progress=False))
    return url, site


def test_the_page_shows_what_the_parquet_files_hold(curated, browser):
    url, site = curated
    dataset = location(url)
    page = Page(browser, site)
    index = read_index(dataset, columns=["split", "status"]).to_pylist()
    for (split, status), count in Counter((r["split"], r["status"]) for r in index).items():
        cell = page.js("([sp, st]) => document.querySelector(`#split-status tr[data-split='${sp}'] "
                       "td[data-status='${st}']`).textContent", [split, status])
        assert int(cell.replace(",", "")) == count

    page.tab("selection")
    page.page.select_option("#version", "v0001")
    table = read_selection(dataset, "v0001")
    rows = table.to_pylist()
    names = dict(enumerate(["class0", "class1", "class2", "class3", "class4", "class5", "class6", "class7", "class8",
                            "class9"]))
    state = ["kept" if r["kept"] else "quarantined" if r["reason"] == "quarantined" else "dropped" for r in rows]
    shown = page.js("""() => Object.fromEntries([...document.querySelectorAll('#selection-classes tbody tr')].map(
        (tr) => [tr.dataset.class, Object.fromEntries([...tr.querySelectorAll('td[data-status]')].map(
            (td) => [td.dataset.status, Number(td.textContent.replace(/,/g, ''))]))]))""")
    expected = {}
    for row, st in zip(rows, state):
        expected.setdefault(names[row["label"]], Counter())[st] += 1
    assert shown == {c: {s: n.get(s, 0) for s in ("kept", "dropped", "quarantined")} for c, n in expected.items()}
    reasons = Counter("duplicate-of" if r["reason"].startswith("duplicate-of:") else r["reason"] for r in rows)
    shown_reasons = page.js("""() => Object.fromEntries([...document.querySelectorAll('#selection-reasons tbody tr')]
        .map((tr) => [tr.dataset.reason, Number(tr.lastChild.textContent.replace(/,/g, ''))]))""")
    assert shown_reasons == dict(reasons) and reasons["duplicate-of"] > 0

    # A class and a reason filter: the gallery holds exactly the matching examples.
    page.page.select_option("#f-size", "240")
    page.page.select_option("#f-class", "3")
    page.page.select_option("#f-reason", "duplicate-of")
    matching = sorted(r["key"] for r in rows if r["label"] == 3 and r["reason"].startswith("duplicate-of:"))
    assert 0 < len(matching) <= 240
    assert page.js("() => Number(document.getElementById('gallery-count').dataset.total)") == len(matching)
    assert sorted(page.js("() => [...document.querySelectorAll('#gallery .card')].map((c) => c.dataset.key)")) \
        == matching
    page.page.select_option("#f-reason", "random:random")
    page.page.select_option("#f-status", "dropped")
    matching = sorted(r["key"] for r in rows if r["label"] == 3 and r["reason"] == "random:random")
    assert sorted(page.js("() => [...document.querySelectorAll('#gallery .card')].map((c) => c.dataset.key)")) \
        == matching

    # Searching a key shows its lineage across every version, as onion inspect --key gives it.
    last = read_selection(dataset, "v0003")
    restored = last.filter(pc.equal(last["reason"], "restored@r1"))["key"][0].as_py()
    page.tab("example")
    page.page.fill("#key-input", restored)
    page.page.press("#key-input", "Enter")
    page.page.wait_for_selector("#lineage")
    lineage = page.js("""() => [...document.querySelectorAll('#lineage tbody tr')].map(
        (tr) => [tr.dataset.version, tr.dataset.kept === 'true', tr.dataset.reason])""")
    assert lineage == [[r["version"], r["kept"], r["reason"]] for r in describe_key(url, restored)["lineage"]]
    assert lineage[-1] == ["v0003", True, "restored@r1"]
    assert page.js("() => document.querySelector('#example-panel img.thumb') !== null")  # its image

    # Two selections compared: who left, who came back, as onion inspect --diff gives them.
    page.tab("diff")
    page.page.select_option("#diff-from", "v0002")
    page.page.select_option("#diff-to", "v0003")
    diff = selection_diff(url, "v0002", "v0003")
    assert page.js("() => Number(document.getElementById('diff-left').dataset.total)") == len(diff["newly_dropped"])
    assert page.js("() => Number(document.getElementById('diff-back').dataset.total)") == len(diff["newly_kept"]) == 40

    page.tab("duplicates")
    table = read_scores(location(url), "exact")
    copies = table.filter(pc.greater(table["group_size"], 1))
    sizes = page.js("() => [...document.querySelectorAll('.group')].map((g) => Number(g.dataset.size))")
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == len(set(copies["group"].to_pylist()))

    page.tab("training")
    assert page.js("() => document.querySelectorAll('#tab-training svg polyline').length") >= 4

    page.close()

    # What a person sees first of a selection: the counts, the histogram and the gallery's top rows.
    fresh = Page(browser, site, "#selection", height=1500)
    picture = fresh.page.screenshot(full_page=False)
    with Image.open(io.BytesIO(picture)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200, "the screenshot is blank"
    if os.environ.get("ONION_SAVE_SCREENSHOT"):
        SCREENSHOT.write_bytes(picture)
    fresh.close()


# Class folder names (no "/": a folder name cannot hold one); the second is not UTF-8.
HOSTILE_CLASSES = ['<b class="pwn">bold<\\b> & "quoted"', "caf\udce9-\udcff", "<img src=x onerror=alert(1)>"]


@pytest.fixture(scope="module")
def hostile(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-report")
    folder = root / "images"
    rng = np.random.default_rng(0)
    for name in HOSTILE_CLASSES:
        path = os.path.join(os.fsencode(folder), os.fsencode(name))
        os.makedirs(path)
        for i in range(3):
            with open(os.path.join(path, f"img{i}.png".encode()), "wb") as handle:
                handle.write(png_bytes(random_pixels(rng, 8)))
    first = os.path.join(os.fsencode(folder), os.fsencode(HOSTILE_CLASSES[0]))
    with open(os.path.join(first, b'<img src=x onerror="alert(2)"> \xff.png'), "wb") as handle:
        handle.write(png_bytes(random_pixels(rng, 8)))
    with open(os.path.join(first, b"broken & <truncated>.png"), "wb") as handle:
        handle.write(png_bytes(random_pixels(rng, 64))[:100])
    url = str(root / "data")
    ingest(open_source(f"imagefolder:{folder}"), url, IngestOptions(shard_size=4), command=["test"], progress=False)
    make_selection(location(url), SelectRequest(options=SelectOptions(keep=0.5, strategy="random")))
    site = root / "site"
    build_report(ReportOptions(url, str(site), progress=False))
    return url, site


def test_hostile_names_are_shown_as_text_and_never_run(hostile, browser):
    url, site = hostile
    page = Page(browser, site)
    expected = [name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                for name in HOSTILE_CLASSES]
    shown = page.js("() => [...document.querySelectorAll('#classes tbody tr')].map((tr) => tr.firstChild.textContent)")
    assert sorted(shown) == sorted(expected) and "caf\\xe9-\\xff" in shown
    sources = page.js("() => [...document.querySelectorAll('#quarantined td.mono')].map((td) => td.textContent)")
    assert any("broken & <truncated>.png" in s for s in sources), sources
    page.tab("selection")
    options = page.js("() => [...document.querySelectorAll('#f-class option')].map((o) => o.textContent)")
    assert sorted(options[1:]) == sorted(expected)
    index = read_index(location(url), columns=["key", "source_ref"]).to_pylist()
    key = next(r["key"] for r in index if "onerror" in r["source_ref"])
    page.page.goto((site / "index.html").as_uri() + "#example=" + key)
    page.page.wait_for_selector("#facts")
    facts = page.js("() => document.getElementById('facts').textContent")
    assert '<img src=x onerror="alert(2)"> \\xff.png' in facts
    assert page.js("() => document.querySelectorAll('.pwn, img[src=x], script:not([src])').length") == 0
    page.close()


def test_two_builds_give_the_same_files_and_limits_hold(curated, tmp_path):
    url, site = curated
    again = tmp_path / "again"
    build_report(ReportOptions(url, str(again), all_selections=True,
                               runs=(str(Path(site).parent / "run"),), progress=False))
    assert files_of(site) == files_of(again)
    small = tmp_path / "small"
    build_report(ReportOptions(url, str(small), limits=ThumbnailLimits(count=12), progress=False))
    assert len(list((small / "thumbs").iterdir())) == 12
    assert b'"limit_count":12' in (small / "data" / "report.js").read_bytes()
    build_report(ReportOptions(url, str(small), limits=ThumbnailLimits(count=12), progress=False))  # replaces itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "small"]  # no temporaries left


def test_a_fresh_dataset_without_selections_or_scores_gives_a_page(browser, tmp_path):
    url = str(tmp_path / "fresh")
    write_direct_dataset(url, [5, 4])
    site = build_report(ReportOptions(url, str(tmp_path / "site"), progress=False))
    page = Page(browser, site)
    for tab in ("selection", "example", "diff", "duplicates", "training", "dataset"):
        page.tab(tab)
    assert page.js("() => document.querySelector('#split-status td[data-status=ok]').textContent") == "9"
    page.page.goto(site.joinpath("index.html").as_uri() + "#example=ex-00003")
    page.page.wait_for_selector("#facts")
    page.page.goto(site.joinpath("index.html").as_uri() + "#example=no-such-key")
    page.page.wait_for_selector("#not-found")
    page.close()


def one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onion report: error: "), result.stderr
    return lines[0]


def test_missing_or_damaged_dataset_gives_one_line_and_no_site(curated, tmp_path):
    url, _ = curated
    out = tmp_path / "site"
    one_line_error(onion("report", tmp_path / "nowhere", "--out", out), 2)
    assert not out.exists()
    copy = tmp_path / "copy"
    shutil.copytree(url, copy)
    onion_result = onion("report", copy, "--out", out)
    assert onion_result.returncode == 0, onion_result.stderr
    before = files_of(out)
    row = read_index(location(str(copy))).to_pylist()[0]
    shard = copy / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["image_offset"] + row["image_size"] // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_line_error(onion("report", copy, "--out", out), 1)
    assert row["key"] in line and row["shard"] in line
    assert files_of(out) == before  # the earlier report is untouched
    part = sorted((copy / "index").iterdir())[0]
    part.write_bytes(b"PAR1 not really")
    assert f"index/{part.name}" in one_line_error(onion("report", copy, "--out", out), 1)
    assert files_of(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["copy", "site"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "not an onion report" in one_line_error(onion("report", url, "--out", tmp_path / "other"), 2)


def test_help_explains_the_report():
    result = subprocess.run([sys.executable, "-m", "pipeline", "report", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "file://" in result.stdout and "--all-selections" in result.stdout
