#!/usr/bin/env bash
# Fills gpu/ (ignored; carried to the GPU machine, at most 64 MiB) for every GPU bench, from
# a fresh checkout, in about 50 minutes on 2 cores: the Debian corpus
# (scripts/corpus/debian-cpp.sh), `cxxlm data run` of the training projects (LLVM 15, Boost
# 1.81, OpenCV 4.6 with contrib, Qt 5 base in runs/train-data, 56 more in runs/broad-data)
# and of the held-out ones (abseil, eigen3, fmtlib, grpc, ninja-build, protobuf, spdlog),
# the default pipeline's 355 MiB sample spread over the 60 training projects with its
# tokenizer and the held-out quarter (benches/tok/judged-prepare.sh), bug-fix tasks
# from GCC's tests (`cxxlm tasks bugs` for TASK_MINUTES, default 30; it resumes where a
# run stopped) with their function-body tasks in gpu/tasks, the agent's tool-use examples
# (gpu/tool-use.jsonl.zst), abseil's sources (gpu/absl.tar.xz) and the superwords-within-lines
# tokenizer as gpu/tokenizer-super-lines.json.xz.
#
# Usage: [TASK_MINUTES=30] benches/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/corpus/debian-cpp.sh
cargo build --release -q -p cxxlm
x=target/release/cxxlm
data_run() { # out package...
    local out=$1 args=()
    shift
    for p in "$@"; do
        for f in corpus/debian/"${p}"_*.tar.*; do [[ $f == *.asc ]] || args+=(-i "$f"); done
    done
    [ -f "$out/stats.json" ] || "$x" data run "${args[@]}" -o "$out" | tail -1
}
data_run runs/train-data llvm-toolchain-15 boost1.81 opencv qtbase-opensource-src
# The other training projects: what debian-cpp.sh fetched, less the above, the held-out
# projects and GCC (the bug-fix tasks' source).
mapfile -t broad < <(ls corpus/debian/*.orig.tar.* | grep -v '\.asc$' | xargs -n1 basename | cut -d_ -f1 | sort -u |
    grep -vxE 'llvm-toolchain-15|boost1.81|opencv|qtbase-opensource-src|abseil|eigen3|fmtlib|grpc|ninja-build|protobuf|spdlog|gcc-12')
data_run runs/broad-data "${broad[@]}"
data_run runs/held-out-data abseil eigen3 fmtlib grpc ninja-build protobuf spdlog
SPREAD=1 EXCLUDE=gcc-12 benches/tok/judged-prepare.sh runs/train-data:runs/broad-data runs/held-out-data 355
# Stopped at its time limit (exit 124), `tasks bugs` keeps every finished part.
rc=0
timeout "$((${TASK_MINUTES:-30} * 60))" nice -n 10 "$x" tasks bugs \
    -i corpus/debian/gcc-12_12.2.0.orig-gcc-12.2.0-dfsg.tar.xz -o runs/tasks/bugs \
    --test-projects gcc-12/libstdc++-v3,llvm-toolchain-15/lldb --threads "$(nproc)" || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 124 ] || exit "$rc"
"$x" tasks bodies -i runs/tasks/bugs -o runs/tasks/bodies.jsonl | tail -1
rm -rf gpu/tasks && mkdir -p gpu/tasks
cp runs/tasks/bugs/*.jsonl.zst gpu/tasks/
zstd -q -19 -f runs/tasks/bodies.jsonl -o gpu/tasks/bodies.jsonl.zst
# The agent's tool-use examples (their sandboxed replays would keep the GPU waiting).
[ -f runs/tasks/tool-use.jsonl ] || "$x" tasks trajectories -i gpu/tasks -o runs/tasks/tool-use.jsonl --limit 300 | head -1
zstd -q -19 -f runs/tasks/tool-use.jsonl -o gpu/tool-use.jsonl.zst
# A held-out project's C/C++ files for the embeddings' retrieval (benches/index/gpu.sh).
abseil=$(mktemp -d)
tar -xzf corpus/debian/abseil_*.orig.tar.gz -C "$abseil"
(cd "$abseil"/abseil-* && find absl -type f \( -name '*.h' -o -name '*.cc' -o -name '*.inc' \) | sort \
    | XZ_OPT=-9e tar -cJf - -T -) >gpu/absl.tar.xz
rm -rf "$abseil"
"$x" tok train -i bench-out/judged/sample --vocab 32768 --second-stage-mib 512 \
    --superwords-within-lines -o bench-out/judged/tokenizer-super-lines.json | tail -1
xz -9e -c bench-out/judged/tokenizer-super-lines.json >gpu/tokenizer-super-lines.json.xz
# A call carries at most 64 MiB with the tree, counted in disk blocks: what every bench
# reads, plus its own (judged.sh: gpu/held-out and a variant tokenizer; the agent's and the
# index's: gpu/tasks, gpu/tool-use.jsonl.zst, gpu/absl.tar.xz; RL and the speedrun: gpu/tasks).
# A bench over it stages its data in a call of its own first (benches/stage.sh).
common=$(du -sc --block-size=1 gpu/data gpu/cxxlm.tar.xz gpu/bin gpu/lib gpu/tokenizer.json | tail -1 | cut -f1)
tree=$(git ls-files -z | du -c --block-size=1 --files0-from=- | tail -1 | cut -f1)
own=$(du -sc --block-size=1 gpu/tasks gpu/tool-use.jsonl.zst gpu/absl.tar.xz | tail -1 | cut -f1)
echo "gpu/: $(du -s --block-size=1 gpu | cut -f1) bytes on disk; the tree $tree; every bench's part $common; the agent's own $own"
[ $((tree + common + own)) -le $((64 << 20)) ] ||
    echo "over the 64 MiB a call carries by $(((tree + common + own - (64 << 20)) >> 10)) KiB: stage gpu/data (or gpu/data-norepeat) first, \`benches/stage.sh gpu/data\` in a call that carries it"
