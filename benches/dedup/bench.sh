#!/usr/bin/env bash
# `cxxlm data dedup` (all four stages) against datasketch's MinHash LSH, same settings,
# same documents, one run.
#
# Usage: benches/dedup/bench.sh [CORPUS_DIR]
# Default corpus: every C/C++ file under /usr/include after `apt-get install
# libboost1.81-dev`, taken raw (no filtering) into shards by `cxxlm data run`.
set -euo pipefail
cd "$(dirname "$0")/../.."
corpus=${1:-/usr/include}
out=bench-out/dedup
venv=bench-out/datasketch-venv

if [ "$corpus" = /usr/include ] && [ ! -d /usr/include/boost ]; then
    apt-get install -y -qq libboost1.81-dev >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q datasketch==2.0.0 zstandard
fi
cargo build --release -q -p cxxlm
mkdir -p "$out"
rm -rf "$out/shards" "$out/cxxlm"
target/release/cxxlm data run --config benches/dedup/raw.toml -i "$corpus" -o "$out/shards" >/dev/null

timed() {
    local name=$1
    shift
    /usr/bin/time -v -o "$out/$name.time" "$@" >"$out/$name.log" 2>&1 ||
        { tail -n 30 "$out/$name.log"; echo "$name failed (log: $out/$name.log)" >&2; exit 1; }
}
timed datasketch "$venv/bin/python" benches/dedup/datasketch_dedup.py "$out/shards" "$out/datasketch-removed.txt"
timed cxxlm target/release/cxxlm data dedup -i "$out/shards" -o "$out/cxxlm" --write-removed

echo "corpus: $corpus ($(cat "$out/datasketch.log")), $(nproc) cores"
"$venv/bin/python" benches/dedup/compare.py "$out/cxxlm" "$out/cxxlm.time" "$out/datasketch-removed.txt" "$out/datasketch.time"
