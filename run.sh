#!/usr/bin/env bash
# The two entry points of the README. Each makes (or reuses) the project's virtualenv first.
#   ./run.sh demo   the whole method on the built-in mnist5k digits with an embedded local Ray:
#                   ingest, inspect, curate (3 rounds, token + attention sparsity), inspect the survivors,
#                   and write the report (a static web page) into RUN/report
#   ./run.sh test   lint (ruff) and run the test suite (installs chromium, for the report tests, when missing)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PYTHON=${PYTHON:-python3}

# A new virtualenv holds PyTorch with its CUDA libraries: about 7 GB once installed.
NEEDED_GB=8

check_free_space() {
    # Refuse up front, naming the folder, rather than let pip fail half-way with "No space left on device".
    local free_kb
    free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
    if [ "$free_kb" -lt $((NEEDED_GB * 1024 * 1024)) ]; then
        echo "error: $PWD/$VENV needs about $NEEDED_GB GB free for PyTorch and the other dependencies," \
             "but only $((free_kb / 1024 / 1024)) GB is free there (df -h $PWD): free some space and re-run" >&2
        exit 1
    fi
}

ensure_venv() {
    # Reinstall only when pyproject.toml changed since the last install (idempotent, fast re-runs).
    local stamp="$VENV/.onion-installed"
    local wanted
    wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        return
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        check_free_space
        "$PYTHON" -m venv "$VENV"
    fi
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
        onion=$VENV/bin/onion
        # ONION_DEMO_SOURCE / ONION_DEMO_SETTINGS make a smaller demo for the test suite.
        source_name=${ONION_DEMO_SOURCE:-mnist5k}
        read -r -a settings <<< "${ONION_DEMO_SETTINGS:---rounds 3 --round-epochs 3 --remove-n 300 --depth 6 --patch-size 7 --lr 5e-4}"
        "$onion" ingest "$source_name" "$out" --shard-size 1000
        "$onion" inspect "$out"
        # All three levels: curation rounds of the examples (2 epochs per round, so forgetting can be
        # seen), tokens kept 70%, attention keys 30%. Re-running resumes (or, once finished, only reports).
        "$onion" curate "$out" --out "$run" --token-keep 0.7 --attn-keep 0.3 "${settings[@]}"
        last=$("$VENV/bin/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['selections'][-1])" "$run/curation.json")
        "$onion" inspect "$out" --selection "$last" --plot "$run/scores.png" --grid "$run/extremes.png"
        # The page to browse: every selection, the examples kept and dropped and why, the run's curves.
        "$onion" report "$out" --all-selections --run "$run" --out "$run/report"
        echo "dataset: $out (selections/, scores/)   run: $run (summary.json, metrics.csv, dynamics/, checkpoints/)"
        echo "pictures: $run/scores.png (scores of kept vs dropped) $run/extremes.png (hardest and easiest, in words)"
        echo "report: $run/report/index.html (open it in a browser; it needs no network)"
        ;;
    test)
        ensure_venv
        shift
        # The report tests open the report in a real browser: Debian's chromium, installed once.
        if ! command -v chromium >/dev/null; then
            echo "installing chromium for the report tests (apt-get)..." >&2
            sudo=""
            [ "$(id -u)" -eq 0 ] || sudo=sudo
            $sudo apt-get update -q
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
        fi
        "$VENV/bin/ruff" check --quiet .   # the lint configuration in pyproject.toml, checked first
        "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo [DATASET [RUN]] | ./run.sh test [PYTEST ARGS]" >&2
        exit 2
        ;;
esac
