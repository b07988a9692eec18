"""The README's walk through your own images runs as printed: its commands are parsed out of
README.md and run one by one, with the installed ``onion``, in a folder holding ``photos/``: real
photographs (scikit-learn's two sample images) cut into same-size crops, one class per photo, PNG
and JPEG mixed."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WALK_MARKER = "<!-- walk"
CROP = 32  # every image the same size: training needs that today (the README says so)
PER_CLASS = 30


def walk_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """The command lines of the fenced block that follows the walk marker (comments and blanks left out)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(WALK_MARKER))
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    assert fence == start + 1, "the walk marker must sit right above its fenced block"
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    return [line for line in lines[fence + 1:end] if line.strip() and not line.lstrip().startswith("#")]


def installed_onion() -> Path:
    """The ``onion`` console script next to this interpreter (the project's .venv/bin/onion under ./run.sh)."""
    script = Path(sys.executable).parent / "onion"
    if not script.exists():
        pytest.skip(f"no onion console script next to {sys.executable}")
    return script


def make_photos(folder: Path) -> dict[str, int]:
    """``folder/<class>/<crop>``: CROP x CROP crops of each sample photograph, alternately PNG and JPEG."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    counts = {}
    for name, pixels in zip(photos.filenames, photos.images, strict=True):
        label = Path(name).stem  # china, flower
        (folder / label).mkdir(parents=True)
        height, width = pixels.shape[:2]
        rows, columns = height // CROP, width // CROP
        step = max(1, rows * columns // PER_CLASS)
        cells = [(r, c) for r in range(rows) for c in range(columns)][::step][:PER_CLASS]
        for number, (r, c) in enumerate(cells):
            crop = Image.fromarray(pixels[r * CROP:(r + 1) * CROP, c * CROP:(c + 1) * CROP])
            crop.save(folder / label / f"{label}_{number:03d}.{'png' if number % 2 else 'jpg'}")
        counts[label] = len(cells)
    return counts


def test_the_walk_is_the_five_steps_with_the_installed_onion():
    commands = walk_commands()
    assert all(command.startswith(".venv/bin/onion ") for command in commands), commands
    steps = [shlex.split(command)[1] for command in commands]
    order = [step for step in steps if step in ("ingest", "inspect", "curate", "report", "train")]
    assert order[0] == "ingest" and order.index("inspect") < order.index("curate") < order.index("report") \
        < order.index("train"), steps
    assert "imagefolder:photos" in commands[0]


@pytest.mark.slow
def test_every_command_of_the_readme_walk_runs_as_printed(tmp_path):
    counts = make_photos(tmp_path / "photos")
    assert counts == {"china": PER_CLASS, "flower": PER_CLASS}
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "onion").symlink_to(installed_onion())
    env = {**os.environ, "RAY_ADDRESS": ""}  # an embedded Ray, as on a user's machine without a cluster
    for command in walk_commands():
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\nexited {result.returncode}:\n{result.stderr[-3000:]}"
    assert (tmp_path / "data" / "photos" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "photos" / "summary.json").is_file()
    assert (tmp_path / "runs" / "photos" / "report" / "index.html").is_file()
    assert (tmp_path / "runs" / "photos-kept" / "summary.json").is_file()
