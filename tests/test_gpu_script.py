"""benchmarks/gpu.sh on a lent GPU machine: without Ray (its image) and without a pack it must say
what to do before any stage runs; a stage that fails (Ray that cannot start in the machine's
sandbox, say) must cost that stage's figures only, not the stages after it."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A sitecustomize that makes importing the named modules fail in every process started with its
# folder on PYTHONPATH (the second set: in `python -c` processes only).
BLOCKING = '''
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name in {names!r} or (sys.argv[:1] == ["-c"] and name in {inline_names!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocked())
'''


def gpu_script(tmp_path: Path, blocked: set[str], blocked_inline: frozenset[str] = frozenset(),
               **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BLOCKING.format(names=blocked, inline_names=set(blocked_inline)))
    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(hook), **env}, capture_output=True, text=True,
                            timeout=300)
    return result, out


def test_gpu_script_without_ray_and_without_a_pack_names_the_pack_step(tmp_path):
    result, out = gpu_script(tmp_path, {"ray"}, ONION_GPU_PACK=str(tmp_path / "no-pack"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"cannot import ray and pyspng and there is no {tmp_path / 'no-pack'}/" in result.stderr
    assert "bash benchmarks/gpu_pack.sh" in result.stderr
    assert not (out / "stages.log").exists()  # refused before the first stage


@pytest.mark.slow  # runs the no-sync test and starts each stage: half a minute
def test_a_failing_stage_does_not_stop_the_stages_after_it(tmp_path):
    # The step benchmark's report writer fails to import, and so does Ray's starter in stage 2's
    # `python -c` (the no-sync test's fixtures need it): stage 1 passes, 2 fails, 3 and 5 are
    # skipped for want of Ray, 4 and 6 fail on their own.
    result, out = gpu_script(tmp_path, {"report_files"}, frozenset({"pipeline.ray_runtime"}))
    assert result.returncode == 1, result.stderr[-3000:]
    log = (out / "stages.log").read_text()
    failed = [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("!! failed")]
    assert [title[:2] for title in failed] == ["2.", "3.", "4.", "5.", "6."], log
    assert "1. the training step makes no host-device sync" in log
    assert "passed" in (out / "no-sync-test.txt").read_text()
    assert log.splitlines()[-1].endswith("5 stage(s) failed: " + " ".join(failed))
    assert result.stderr.count("skipped: Ray did not start (stage 2)") == 2  # stages 3 and 5 did not try
