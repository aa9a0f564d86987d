#!/usr/bin/env bash
# Tokenizer training speed and memory against Python HF `tokenizers` (same shards, same
# vocabulary size, same first-stage split pattern), then compression on held-out projects.
#
# Usage: benches/tok/bench.sh [TRAIN_SHARDS] [HELD_OUT_INPUT...]
# Defaults: shards of `cxxlm data run` on /usr/include (made here if missing), and the
# held-out Debian projects fetched by scripts/corpus/debian-cpp.sh (none of which is under
# /usr/include): abseil, eigen3, fmtlib, googletest, grpc, ninja-build, protobuf, spdlog.
# SECOND_STAGE_MIB (default 512, as recorded in BENCHMARKS.md; 0 = the default tokenizer).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench-out/tok
venv=bench-out/tok-venv
shards=${1:-$out/usr-include-shards}
shift || true
held_out=("$@")
mkdir -p "$out"
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install -q tokenizers zstandard; }
cargo build --release -q -p cxxlm
if [ ! -f "$shards/stats.json" ]; then
    target/release/cxxlm data run -i /usr/include -o "$shards" >/dev/null
fi
if [ ${#held_out[@]} -eq 0 ]; then
    [ -d corpus/debian ] || scripts/corpus/debian-cpp.sh >/dev/null
    for p in abseil eigen3 fmtlib googletest grpc ninja-build protobuf spdlog; do
        held_out+=("$(ls corpus/debian/${p}_*.orig.tar.* | head -n 1)")
    done
fi
pattern=$(grep -o 'PIECE_PATTERN: &str = r".*";' crates/cxxlm-tokenizer/src/lib.rs | sed 's/^PIECE_PATTERN: &str = r"//; s/";$//')
mb=$(python3 -c "import json;print(round(json.load(open('$shards/stats.json'))['stats']['written']['bytes']/1e6,1))")

/usr/bin/time -v -o "$out/hf.time" "$venv/bin/python" benches/tok/hf_train.py "$shards" 32768 "$pattern" "$out/hf-tokenizer.json" >"$out/hf.log" 2>&1
/usr/bin/time -v -o "$out/cxxlm.time" target/release/cxxlm tok train -i "$shards" --vocab 32768 --second-stage-mib "${SECOND_STAGE_MIB:-512}" -o "$out/tokenizer.json" >"$out/cxxlm.log" 2>&1
row() {
    local s rss
    s=$(grep 'Elapsed' "$out/$1.time" | awk '{print $NF}')
    rss=$(grep 'Maximum resident' "$out/$1.time" | awk '{print int($NF/1024)}')
    echo "$1: $s wall, peak RSS $rss MB"
}
echo "training on $mb MB of normalized text, vocabulary 32768, $(nproc) cores"
row hf
row cxxlm
target/release/cxxlm tok eval --tokenizer "$out/tokenizer.json" --json "$out/held-out.json" "${held_out[@]}"
