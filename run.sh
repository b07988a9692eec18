#!/usr/bin/env bash
# The two entry points of the README. Each makes (or reuses) the project's virtualenv first.
#   ./run.sh demo   ingest the built-in mnist5k digits with an embedded local Ray, inspect them,
#                   then train a token- and attention-sparse ViT on them for 2 epochs
#   ./run.sh test   run the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PYTHON=${PYTHON:-python3}

ensure_venv() {
    # Reinstall only when pyproject.toml changed since the last install (idempotent, fast re-runs).
    local stamp="$VENV/.onion-installed"
    local wanted
    wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        return
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    echo "installing onion and its dependencies into $VENV (a few minutes the first time)..." >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    echo "$wanted" > "$stamp"
}

case "${1:-}" in
    demo)
        ensure_venv
        out=${2:-data/mnist5k}
        run=${3:-runs/mnist5k}
        "$VENV/bin/onion" ingest mnist5k "$out" --shard-size 1000
        "$VENV/bin/onion" inspect "$out"
        if [ -f "$run/summary.json" ]; then
            echo "$run already finished (delete it to train again)"
        elif [ -f "$run/config.json" ]; then
            "$VENV/bin/onion" train --resume "$run"
        else
            "$VENV/bin/onion" train "$out" --out "$run" --epochs 2 --depth 6 --token-keep 0.7 --attn-keep 0.3
        fi
        echo "dataset: $out   run: $run (summary.json, metrics.csv, dynamics/, checkpoints/, tensorboard/)"
        ;;
    test)
        ensure_venv
        shift
        "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo [DATASET [RUN]] | ./run.sh test [PYTEST ARGS]" >&2
        exit 2
        ;;
esac
