#!/usr/bin/env bash
# `cxxlm data run` against the equivalent DataTrove pipeline on the same files, in one run.
#
# Usage: benches/data/bench.sh [CORPUS_DIR]
# Default corpus: every file under /usr/include after `apt-get install libboost1.81-dev`
# (about 23,400 C/C++ files, 255 MB). Outputs and the DataTrove venv go to bench-out/.
set -euo pipefail
cd "$(dirname "$0")/../.."
corpus=${1:-/usr/include}
out=bench-out/data
venv=bench-out/datatrove-venv
workers=$(nproc)

if [ "$corpus" = /usr/include ] && [ ! -d /usr/include/boost ]; then
    apt-get install -y -qq libboost1.81-dev >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q datatrove==0.10.1 regex zstandard orjson
fi
cargo build --release -q -p cxxlm
mkdir -p "$out"
rm -rf "$out/cxxlm" "$out/cxxlm-shared" "$out/datatrove"

# Both sides read from the page cache.
find "$corpus" -type f -print0 | xargs -0 cat >/dev/null 2>&1 || true
corpus_mb=$(find "$corpus" -type f -size -1000001c -printf '%s\n' | awk '{s+=$1} END {printf "%.1f", s/1e6}')

timed() {
    local name=$1
    shift
    /usr/bin/time -v -o "$out/$name.time" "$@" >"$out/$name.log" 2>&1 ||
        { tail -n 30 "$out/$name.log"; echo "$name failed (log: $out/$name.log)" >&2; exit 1; }
}
timed datatrove "$venv/bin/python" benches/data/datatrove_pipeline.py "$corpus" "$out/datatrove" --workers "$workers"
timed cxxlm target/release/cxxlm data run -i "$corpus" -o "$out/cxxlm" --write-removed
timed cxxlm-shared target/release/cxxlm data run --config benches/data/shared-steps.toml \
    -i "$corpus" -o "$out/cxxlm-shared" --write-removed

echo "corpus: $corpus ($corpus_mb MB of files <= 1 MB), $workers cores"
"$venv/bin/python" benches/data/compare.py "$out/cxxlm" "$out/cxxlm.time" \
    "$out/datatrove" "$out/datatrove.time" "$corpus_mb" "cxxlm (shared steps only)" "$out/cxxlm-shared.time"
