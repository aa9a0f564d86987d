#!/usr/bin/env bash
# Fills gpu/ for benches/tok/judged.sh: a fixed sample of MIB (default 355) MiB of the
# documents of TRAIN_DATA (`cxxlm data sample`: chosen by a hash of their id, so the same
# shards give the same sample; SPREAD=1 takes from each project all of its documents or an
# equal share, whichever is smaller), the default tokenizer trained on it (TOKENIZER_ARGS
# adds `tok train` flags, e.g. `--second-stage-mib 512` for the superword variant), the
# binaries (benches/train/prepare.sh), the shards of HELD_OUT_DATA in gpu/held-out, and the
# sample without files of repeated lines and without copies of held-out files (`data
# run`'s decontamination with the held-out shards: packages vendor each other's sources) in
# gpu/data-norepeat (the default pipeline's filters since the shards of BENCHMARKS.md were
# made: judge today's default with DATA=gpu/data-norepeat). Documents whose id contains
# EXCLUDE are left out of the sample (the bug-fix tasks' source, whose test split the SFT
# run scores). TRAIN_DATA (one or more, separated by `:`) and HELD_OUT_DATA are `cxxlm data
# run` outputs of different projects; the figures in BENCHMARKS.md used the LLVM 15, Boost
# 1.81, OpenCV 4.6 (with contrib), Qt 5 base and GCC 12 tarballs of
# scripts/corpus/debian-cpp.sh with EXCLUDE=gcc-12 (the tasks of `cxxlm tasks bugs` come
# from GCC's), then with SPREAD=1 and 56 more of its packages, and abseil, eigen3, fmtlib,
# grpc, ninja-build, protobuf and spdlog held out. KEEP_INDENTATION=1 for shards of `data run
# --keep-indentation` (raw text): the filtering run keeps it too, and the same documents are
# also written normalized.
#
# Usage: benches/tok/judged-prepare.sh TRAIN_DATA HELD_OUT_DATA [MIB]
set -euo pipefail
cd "$(dirname "$0")/../.."
train=$1 held_out=$2 mib=${3:-355}
cargo build --release -q -p cxxlm
sample=bench-out/judged/sample
inputs=()
for dir in ${train//:/ }; do inputs+=(-i "$dir"); done
rm -rf "$sample"
target/release/cxxlm data sample "${inputs[@]}" -o "$sample" --mib "$mib" ${EXCLUDE:+--exclude "$EXCLUDE"} \
    $([ "${SPREAD:-}" = 1 ] && echo --spread) | tail -1
target/release/cxxlm tok train -i "$sample" --vocab 32768 ${TOKENIZER_ARGS:-} -o bench-out/judged/tokenizer.json
benches/train/prepare.sh bench-out/judged/tokenizer.json "$sample"/*.jsonl.zst
# Within the 64 MiB a call carries: the sample compressed harder, a quarter of the held-out
# documents (by a hash of their id) and no tasks.
zstd -dc gpu/data/part-00000-00000.jsonl.zst | zstd -19 --long=27 -T0 -q -o gpu/data/sample.zst
mv gpu/data/sample.zst gpu/data/part-00000-00000.jsonl.zst
rm -rf gpu/held-out gpu/tasks gpu/sft && mkdir -p gpu/held-out
for s in "$held_out"/*.jsonl.zst; do zstd -dc "$s"; done | python3 -c '
import hashlib, json, sys
for line in sys.stdin.buffer:
    if hashlib.sha256(json.loads(line)["id"].encode()).digest()[0] < 64:
        sys.stdout.buffer.write(line)
' | zstd -19 --long=27 -T0 -q -o gpu/held-out/part-00000-00000.jsonl.zst
# The sample without files of repeated lines and held-out text (`DATA=gpu/data-norepeat` in
# judged.sh).
printf '[quality]\nmax_repeated_line_fraction = 0.5\n[decontaminate]\nheld_out = ["%s"]\n' \
    "$(realpath "$held_out")" >bench-out/judged/norepeat.toml
rm -rf bench-out/judged/sample-norepeat gpu/data-norepeat && mkdir -p gpu/data-norepeat
target/release/cxxlm data run --config bench-out/judged/norepeat.toml -i "$sample" -o bench-out/judged/sample-norepeat \
    $([ "${KEEP_INDENTATION:-}" = 1 ] && echo --keep-indentation) | tail -4
zstd -dc bench-out/judged/sample-norepeat/*.jsonl.zst | zstd -19 --long=27 -T0 -q -o gpu/data-norepeat/part-00000-00000.jsonl.zst
# Raw text: the same documents normalized too (gpu/data-normalized, gpu/held-out-normalized),
# so that the two layouts are compared on the same documents.
if [ "${KEEP_INDENTATION:-}" = 1 ]; then
    for pair in bench-out/judged/sample-norepeat:data-normalized gpu/held-out:held-out-normalized; do
        raw=${pair%%:*} name=${pair#*:}
        rm -rf "bench-out/judged/$name" "gpu/$name" && mkdir -p "gpu/$name"
        target/release/cxxlm data run -i "$raw" -o "bench-out/judged/$name" | tail -1
        zstd -dc "bench-out/judged/$name"/*.jsonl.zst | zstd -19 --long=27 -T0 -q -o "gpu/$name/part-00000-00000.jsonl.zst"
    done
fi
du -sh gpu gpu/data gpu/data-norepeat gpu/held-out
# Last, as it takes minutes: the tokenizer's compression on the sample.
target/release/cxxlm tok eval --tokenizer bench-out/judged/tokenizer.json "$sample" | tail -3
