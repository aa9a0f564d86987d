#!/usr/bin/env bash
# Fills gpu/ for benches/sft/gpu.sh: what benches/train/prepare.sh puts there (binaries,
# tokenizer, corpus shards; same arguments), and gpu/sft/bugfix.jsonl.gz, bug-fix examples
# cut from the C++ headers of this machine (/usr/include, cleaned as `cxxlm data run` cleans
# the corpus), which the pretraining shards do not hold. With TASKS set to the output of
# `cxxlm tasks bugs` (e.g. runs/tasks/bugs), its parts go to gpu/tasks as well: gpu.sh then
# fine-tunes on their train split and scores bug-fix pass@1 on their test split.
#
# Usage: [TASKS=DIR] benches/sft/prepare.sh [TOKENIZER] [SHARD...]
set -euo pipefail
cd "$(dirname "$0")/../.."
benches/train/prepare.sh "$@"
work=$(mktemp -d)
target/release/cxxlm data run -i /usr/include -o "$work/data" >/dev/null
mkdir -p gpu/sft
zstd -dc "$work"/data/*.jsonl.zst | python3 benches/sft/bugfix.py --out gpu/sft/bugfix.jsonl.gz --max 20000
rm -rf "$work"
if [ -n "${TASKS:-}" ]; then
    rm -rf gpu/tasks && mkdir -p gpu/tasks
    cp "$TASKS"/*.jsonl.zst gpu/tasks/
fi
du -sh gpu gpu/sft
