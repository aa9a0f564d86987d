#!/usr/bin/env bash
# Fills gpu/ (ignored by git; carried to the GPU machine, at most 64 MiB) for
# benches/train/gpu.sh: the stripped release binaries, in an xz-compressed tar; a tokenizer; the
# PyTorch reference; a font for the report card's plots; and Debian C++ shards recompressed to fit.
#
# Usage: benches/train/prepare.sh [TOKENIZER] [SHARD...]
# Defaults: bench-out/tok/tokenizer-605mb.json and the first three shards of
# runs/debian-data (scripts/corpus/debian-cpp.sh, then `cxxlm data run -i corpus/debian
# -o runs/debian-data`).
set -euo pipefail
cd "$(dirname "$0")/../.."
tokenizer=${1:-bench-out/tok/tokenizer-605mb.json}
shift || true
shards=("$@")
[ ${#shards[@]} -gt 0 ] || shards=(runs/debian-data/part-00000-0000{0,1,2}.jsonl.zst)
mkdir -p gpu/data
cargo build --release -q -p cxxlm
# cxxlm-torch alone: it runs every command, those without a model too, and stands in for
# cxxlm there (benches/gpu-env.sh links it), 4 MB of the 64 MiB a call carries saved.
bins=$(mktemp -d)
strip -o "$bins/cxxlm-torch" target/release/cxxlm-torch
XZ_OPT=${XZ_OPT:--9e -T2} tar -cJf gpu/cxxlm.tar.xz -C "$bins" cxxlm-torch
rm -rf "$bins" gpu/cxxlm.xz
cp "$tokenizer" gpu/tokenizer.json
cp ../shared/bench/ref_gpt.py gpu/
# The report card's plots need a TrueType font (benches/speedrun/gpu.sh).
cp /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf gpu/
# The sandbox's bubblewrap and the libraries it links, and make (the agent's tasks build
# with it), for machines without them.
mkdir -p gpu/bin gpu/lib
cp "$(command -v bwrap)" /usr/bin/make gpu/bin/
ldd "$(command -v bwrap)" | awk '$3 ~ /^\// && $1 !~ /^(libc|ld-linux)/ {print $3}' | xargs -r cp -L -t gpu/lib
# The trainer's zstd reader accepts windows up to 2^27.
for s in "${shards[@]}"; do zstd -dc "$s"; done | zstd -16 --long=27 -T0 -q -f -o gpu/data/part-00000-00000.jsonl.zst
du -sh gpu
