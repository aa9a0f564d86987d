#!/usr/bin/env bash
# A trained checkpoint's embeddings as a retriever, on the GPU machine: recall@10 of the
# definition a call site, doc comment or declaration names (`cxxlm index recall`) on the
# held-out files of a repository the model never trained on (gpu/absl.tar.xz: abseil's
# C/C++ files, a held-out project of the default pipeline; benches/prepare.sh), against
# BM25 on the same pairs; then the same model tuned contrastively (`cxxlm train embed`,
# InfoNCE on the other files' pairs) and judged again.
#
#   CHECKPOINT=RUN [EPOCHS=N] benches/index/gpu.sh      # results in $OUT (or gpu-out/): recall.txt
set -euo pipefail
out=${OUT:-gpu-out}
work=/tmp/cxxlm-index
mkdir -p "$out" "$work"
trap : EXIT # the results are few files: no bundling
source "$(dirname "$0")/../gpu-env.sh"
checkpoint=${CHECKPOINT:?CHECKPOINT=RUN: the model to judge}
repo=$work/absl
[ -d "$repo" ] || { mkdir -p "$repo" && tar -xJf gpu/absl.tar.xz -C "$repo"; }
"$work/cxxlm" index build "$repo" -o "$work/absl.idx" | tee "$out/recall.txt"
recall() { # label checkpoint
    echo "== $1" | tee -a "$out/recall.txt"
    "$work/cxxlm" index recall "$work/absl.idx" --checkpoint "$2" --pairs-out "$work/pairs.jsonl" | tee -a "$out/recall.txt"
}
recall pretrained "$checkpoint"
rm -rf "$work/tuned"
"$work/cxxlm" train embed --init "$checkpoint" --pairs "$work/pairs.jsonl" -o "$work/tuned" \
    --set embed.epochs="${EPOCHS:-2}" --set checkpoint.every=0 --log-every 50 2>&1 | tail -4 | tee -a "$out/recall.txt"
recall "tuned for ${EPOCHS:-2} epochs" "$work/tuned"
