"""The oldest timm that pyproject.toml admits really runs the sparse ViT: its tests pass against it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def declared_minimum() -> str:
    match = re.search(r'"timm>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml must pin timm>=X.Y.Z"
    return match.group(1)


@pytest.mark.slow
def test_oldest_timm_runs_the_sparse_tests(tmp_path):
    """Installs only timm (no dependencies: this venv's torch is reused) into a folder placed first
    on the path, then runs tests/test_sparse_vit.py against it in a subprocess."""
    version = declared_minimum()
    target = tmp_path / f"timm-{version}"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    f"timm=={version}"], check=True, timeout=600)
    probe = subprocess.run([sys.executable, "-c", "import timm; print(timm.__version__)"], capture_output=True,
                           text=True, env={"PYTHONPATH": str(target)}, check=True)
    assert probe.stdout.strip() == version
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                             str(ROOT / "tests" / "test_sparse_vit.py")], capture_output=True, text=True,
                            cwd=ROOT, env={"PYTHONPATH": f"{target}:{ROOT}", "PATH": "/usr/bin:/bin"}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout)
