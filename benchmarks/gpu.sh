#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one prepared command, sized for a few minutes on one card:
#
#   bash benchmarks/gpu.sh [OUT]            on a CUDA machine (default OUT: benchmarks/results/gpu)
#   bash benchmarks/gpu.sh --dry-run [OUT]  the same stages at toy sizes on the CPU (checks the script)
#
# Stages, each timed, each one's output under OUT:
#   1. the card (nvidia-smi) and the no-sync test of the training step (torch.cuda.set_sync_debug_mode);
#   2. Ray starts and runs a task (within 2 minutes; stages 3 and 5 need it);
#   3. profile.md: torch.profiler per arm (dense, token 0.7, token 0.7 + block attention 0.3) at
#      224 px / patch 16: s/step, host vs device time, syncs per step, top ops;
#   4. training-gpu.md: the step benchmark, eager (measured vs FLOPs-predicted speed-up, attention
#      cost by length incl. block mode at 577 tokens, and whether a pruning block should reuse
#      explicit attention's probabilities for the map on a GPU too);
#   5. bench-gpu/results.md: `onion bench train --preset gpu`, every arm end to end (goal <= 6 min);
#   6. training-gpu-compiled.md: the step benchmark's main table, compiled.
# A stage that fails is logged in stages.log and the next one still runs; the exit status is 1 then.
# Uses the interpreter in .venv when there is one, else python3 (a machine that has torch and timm).
# A lent GPU machine's python3 lacks Ray and pyspng and cannot download them: run
# `bash benchmarks/gpu_pack.sh` here first and carry .gpu-pack with the call; it is installed into a
# temporary site folder when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-benchmarks/results/$([ $dry = 1 ] && echo gpu-dry-run || echo gpu)}
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
pack=${ONION_GPU_PACK:-.gpu-pack}
if ! $py -c "import ray, pyspng" 2>/dev/null; then
    if [ ! -d "$pack" ]; then
        echo "error: $py cannot import ray and pyspng and there is no $pack/ to install them from:" \
             "run bash benchmarks/gpu_pack.sh on a machine with PyPI and carry .gpu-pack" >&2
        exit 1
    fi
    site=${TMPDIR:-/tmp}/onion-gpu-site
    rm -rf "$site" && mkdir -p "$site"
    $py -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$pack"/wheels/*.whl
    # Python's tarfile rather than tar: the image need not have xz; it keeps Ray's binaries executable.
    $py -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" "$pack/ray.tar.xz" "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    $py -c "import ray, pyspng; print('installed from $pack: ray', ray.__version__)"
fi
# The project itself, for the scripts under benchmarks/ where onion is not installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
data="$out/data/synthetic"
stage() { echo "== $(date +%T) $*" | tee -a "$out/stages.log"; }

if [ $dry = 1 ]; then
    device=cpu; count=600; ingest_size=16; train=(--img-size 32 --patch-size 8 --depth 2 --embed-dim 64 --num-heads 2
        --batch-size 32 --loader-workers 1 --attn-block 16)
    step=(--device cpu --batch 4 --repeats 1 --steps 1 --img-size 32 --patch 8)
    preset=(--preset smoke --seeds 1 --only token,attention-block --arms benchmarks/block_arms.yaml)
    echo "CPU dry run ($(nproc) CPUs): toy sizes, figures meaningless" > "$out/gpu.txt"
else
    device=cuda; count=20000; ingest_size=32; train=(--img-size 224 --patch-size 16 --batch-size 256
        --loader-workers 8)
    step=(--device cuda --batch 256 --repeats 5 --steps 10 --img-size 224 --patch 16)
    preset=(--preset gpu)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
fi

no_sync_test() {
    $py -m pytest -q -p no:cacheprovider tests/test_training_step.py -k "reads_nothing or never_synchronises" \
        2>&1 | tail -3 | tee "$out/no-sync-test.txt"
}
ray_starts() {
    # Bounded: a Ray that cannot start in the lent machine's sandbox costs two minutes, not the run.
    timeout 120 $py -c "import ray; from pipeline.ray_runtime import init_ray; init_ray(); \
print('ray', ray.__version__, 'ran a task:', ray.get(ray.remote(lambda: 42).remote()) == 42)"
}
needs_ray() {
    [ "$ray_rc" = 0 ] || { echo "skipped: Ray did not start (stage 2)" >&2; return 1; }
}
profile() {
    needs_ray
    [ -f "$data/manifest.json" ] || $py -m pipeline ingest synthetic "$data" --count $count --image-size $ingest_size
    $py benchmarks/profile_step.py "$data" --out "$out" --name profile --device $device "${train[@]}"
}
step_benchmark() { $py benchmarks/training.py "${step[@]}" --out "$out" --name training-gpu; }
bench() {
    needs_ray
    local started; started=$(date +%s)
    $py -m pipeline bench train "${preset[@]}" --out "$out/bench-gpu"
    echo "bench wall clock: $(( $(date +%s) - started )) s" | tee -a "$out/stages.log"
}
step_benchmark_compiled() {
    $py benchmarks/training.py "${step[@]}" --out "$out" --name training-gpu-compiled --compile --skip-extras
}

# Each stage runs with errexit inside; a failed one is logged and the next still runs, so one broken
# stage (say Ray in the lent machine's sandbox) costs its own figures only. Most needed first.
failed=()
attempt() {  # sets last_rc
    local title=$1; shift
    stage "$title"
    set +e; ( set -e; "$@" ); last_rc=$?; set -e
    if [ $last_rc != 0 ]; then
        echo "!! failed (rc $last_rc): $title" | tee -a "$out/stages.log"; failed+=("$title")
    fi
}
attempt "1. the training step makes no host-device sync" no_sync_test
attempt "2. Ray starts" ray_starts; ray_rc=$last_rc
attempt "3. profile: dense vs token vs token+block attention" profile
attempt "4. step benchmark, eager" step_benchmark
attempt "5. onion bench train ${preset[*]}" bench
attempt "6. step benchmark, compiled" step_benchmark_compiled
rm -rf "$out/bench-gpu/data" "$out/bench-gpu/runs" "$out/data"  # keep the figures, not the data
if [ ${#failed[@]} != 0 ]; then
    stage "done: $out, ${#failed[@]} stage(s) failed: ${failed[*]}"
    exit 1
fi
stage "done: $out"
