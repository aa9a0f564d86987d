#!/usr/bin/env bash
# Compression on the held-out Debian projects (none in the training shards) of a
# tokenizer trained on the given shard directories.
#
# Usage: benches/tok/held-out.sh OUT_JSON SHARDS...
# The 606 MB row of BENCHMARKS.md: benches/tok/held-out.sh bench-out/tok/held-out-605mb.json
#   bench-out/tok/usr-include-shards runs/tok-train-extra
# (runs/tok-train-extra: `cxxlm data run` of the LLVM 15, Qt 5 base and OpenCV tarballs
# that scripts/corpus/debian-cpp.sh fetches.) SECOND_STAGE_MIB as in bench.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1
shift
cargo build --release -q -p cxxlm
inputs=()
for s in "$@"; do inputs+=(-i "$s"); done
tokenizer=${out%.json}-tokenizer.json
target/release/cxxlm tok train "${inputs[@]}" --vocab 32768 --second-stage-mib "${SECOND_STAGE_MIB:-512}" -o "$tokenizer"
[ -d corpus/debian ] || scripts/corpus/debian-cpp.sh >/dev/null
held_out=()
for p in abseil eigen3 fmtlib googletest grpc ninja-build protobuf spdlog; do
    held_out+=("$(ls corpus/debian/${p}_*.orig.tar.* | head -n 1)")
done
target/release/cxxlm tok eval --tokenizer "$tokenizer" --json "$out" "${held_out[@]}"
