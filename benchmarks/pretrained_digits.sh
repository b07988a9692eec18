#!/usr/bin/env bash
# Issue 32's goal on digits: a 6-epoch run (depth 4, batch 32), then 1 epoch from its weights at lr 1e-4
# with no warm-up; the fine-tuned run's val top-1 next to the source's, per seed.
# Usage: benchmarks/pretrained_digits.sh [OUT_DIR] [SEEDS...]   (default runs/pretrained-digits, seeds 0 1 2)
set -euo pipefail
out=${1:-runs/pretrained-digits}
shift || true
seeds=("${@:-0 1 2}")
onion=${ONION:-.venv/bin/onion}
mkdir -p "$out"
[ -f "$out/digits/manifest.json" ] || "$onion" ingest digits "$out/digits" >/dev/null 2>&1
printf '| seed | source run (6 epochs) | from its weights (+1 epoch, lr 1e-4, no warm-up) | difference |\n|---|---|---|---|\n'
for seed in ${seeds[@]}; do
  src="$out/source-s$seed" ft="$out/finetune-s$seed"
  rm -rf "$src" "$ft"
  "$onion" train "$out/digits" --out "$src" --epochs 6 --depth 4 --batch-size 32 --seed "$seed" >/dev/null 2>&1
  weights=$(ls -d "$src"/checkpoints/step-*/ | tail -1)model.safetensors
  "$onion" train "$out/digits" --out "$ft" --pretrained "$weights" --epochs 1 --depth 4 --batch-size 32 \
    --lr 1e-4 --warmup-epochs 0 --seed "$seed" >/dev/null 2>&1
  python3 - "$src" "$ft" "$seed" <<'PY'
import json, sys
src, ft = (json.load(open(f"{run}/summary.json"))["val_top1"] for run in sys.argv[1:3])
print(f"| {sys.argv[3]} | {src:.2f}% | {ft:.2f}% | {ft - src:+.2f} |")
PY
done
