"""The README's walk through your own images runs as printed: its commands are parsed out of
README.md and run one by one, with the installed ``onion``, in a folder holding ``photos/``: real
photographs (scikit-learn's two sample images) cut into crops of many sizes, shapes and modes, one
class per photo (tests/photos.py)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from photos import photo_folder

ROOT = Path(__file__).resolve().parent.parent
WALK_MARKER = "<!-- walk"
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
    assert script.exists(), f"no onion console script next to {sys.executable} (./run.sh test installs it)"
    return script


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
    written = photo_folder(tmp_path / "photos", {".": PER_CLASS})  # photos/<class>/<image>, 24-400 px
    assert len(written) == 2 * PER_CLASS
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
    kept = json.loads((tmp_path / "runs" / "photos-kept" / "summary.json").read_text())
    assert kept["model_kwargs"]["img_size"] == 224 and kept["model_kwargs"]["patch_size"] == 16  # photos: 224 px
    curated = json.loads((tmp_path / "runs" / "photos" / "summary.json").read_text())
    assert curated["config"]["token_keep"] < 1 and curated["config"]["attn_keep"] < 1  # all three levels
    thumbnails = list((tmp_path / "runs" / "photos" / "report" / "thumbs").iterdir())
    assert thumbnails and all(max(Image.open(path).size) <= 64 for path in thumbnails)  # not the photos themselves
