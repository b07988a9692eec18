"""benchmarks/gpu.sh on a machine whose python lacks Ray (a lent GPU machine's image): it must say
what to do, before any stage runs, rather than fail inside the first import."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Makes `import ray` fail in every process that starts with this folder on PYTHONPATH.
WITHOUT_RAY = '''
import sys
class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray":
            raise ModuleNotFoundError("No module named 'ray'", name=name)
sys.meta_path.insert(0, NoRay())
'''


def test_gpu_script_without_ray_and_without_a_pack_names_the_pack_step(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WITHOUT_RAY)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(hook), "ONION_GPU_PACK": str(tmp_path / "no-pack")}
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"cannot import ray and pyspng and there is no {tmp_path / 'no-pack'}/" in result.stderr
    assert "bash benchmarks/gpu_pack.sh" in result.stderr
    assert not (out / "stages.log").exists()  # refused before the first stage
