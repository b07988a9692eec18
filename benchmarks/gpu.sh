#!/usr/bin/env bash
# GPU figures for the README, on a CUDA machine that already has PyTorch, timm and pyarrow:
#   bash benchmarks/gpu.sh OUT_DIR DATASET
# 1. the training-step benchmark (dense / token / token+attention, attention cost, dynamics cost)
#    with bf16 autocast; 2. dense vs tri-level-ready sparse training of DATASET, 5 epochs each.
set -euo pipefail
out=${1:?output folder}; data=${2:?dataset}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/training.py --device cuda --batch 256 --repeats 5 --steps 10 --out "$out" --name training-gpu
common=(--device cuda --epochs 5 --batch-size 256 --loader-workers 4 --lr 2e-3 --warmup-epochs 1)
python3 -m pipeline train "$data" --out /tmp/onion-gpu-dense "${common[@]}"
python3 -m pipeline train "$data" --out /tmp/onion-gpu-sparse "${common[@]}" --token-keep 0.7 --attn-keep 0.3 \
    --keep-warmup-epochs 1 --keep-ramp-epochs 2
cp /tmp/onion-gpu-dense/summary.json "$out/train-dense.json"
cp /tmp/onion-gpu-sparse/summary.json "$out/train-sparse.json"
