#!/usr/bin/env bash
# Packs what benchmarks/gpu.sh needs on the lent GPU machine but its image lacks, into .gpu-pack/
# (git-ignored), to be carried with the run:
#
#   bash benchmarks/gpu_pack.sh [PYTHON_VERSION]     on this machine, before the device call
#                                                    (default 3.12, the device image's python3)
#
# The device image has torch, timm, pyarrow, fsspec, scipy, matplotlib and the rest of the stack, but
# not Ray, pyspng or jsonschema (Ray's one missing requirement), and it cannot reach a registry. A
# call carries at most 64 MiB and Ray's wheel is 79 MB, so Ray travels as a tar.xz of the installed
# package without its Java jars, its web dashboard's static files and RLlib (none of which onion
# runs: it starts Ray with include_dashboard=False and uses its core tasks and actors only), 28 MB.
# gpu.sh unpacks .gpu-pack/ into a site folder when its python cannot import ray and pyspng.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
pack=.gpu-pack
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
# The versions this project is tested with here, so the device runs the same Ray and pyspng.
installed() { $py -c "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))" "$1"; }
pins=("ray==$(installed ray)" "pyspng==$(installed pyspng)" jsonschema jsonschema-specifications referencing rpds-py)
rm -rf "$pack" && mkdir -p "$pack/wheels" "$pack/ray-site"
tag=${version//./}
$py -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --abi "cp$tag" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$pack/wheels" "${pins[@]}"
ray_wheel=$(ls "$pack"/wheels/ray-*.whl)
unzip -q "$ray_wheel" -d "$pack/ray-site"  # unzip, not python's zipfile: Ray's binaries keep their executable bits
rm "$ray_wheel"
rm -rf "$pack/ray-site/ray/jars" "$pack/ray-site/ray/dashboard/client/build" "$pack/ray-site/ray/rllib"
tar -C "$pack/ray-site" -cJf "$pack/ray.tar.xz" .
rm -rf "$pack/ray-site"
du -sh "$pack/ray.tar.xz" "$pack"/wheels/*
echo "carry .gpu-pack with the run (python $version); gpu.sh installs it when its python lacks ray or pyspng"
