#!/usr/bin/env bash
# Fills gpu/ for benches/rl/gpu.sh: what benches/sft/prepare.sh puts there (binaries,
# tokenizer, corpus shards, bug-fix examples), with the parts of `cxxlm tasks bugs` (TASKS,
# required) in gpu/tasks: their train split is what SFT and RL learn from, their test split
# (other projects) what bug-fix pass@1 is scored on.
#
# Usage: TASKS=DIR benches/rl/prepare.sh [TOKENIZER] [SHARD...]
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${TASKS:?set TASKS to the output of cxxlm tasks bugs (e.g. runs/tasks/bugs)}"
TASKS=$TASKS benches/sft/prepare.sh "$@"
