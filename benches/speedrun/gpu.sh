#!/usr/bin/env bash
# The gpu-10min speedrun on the GPU machine, from the corpus shards in gpu/data (see
# benches/train/prepare.sh: its binaries, and gpu/DejaVuSans.ttf for the plots). With
# gpu/tasks (`cxxlm tasks bugs` parts and function bodies, benches/prepare.sh), the run goes on: SFT on the
# tasks' train split, RL with the compiler as judge, and the held-out bug fixes of their
# test split answered by each model. The report card, the stages' JSON, logs and metrics
# (not checkpoints or tokens) land in $OUT (or gpu-out/).
#
#   benches/speedrun/gpu.sh [TIME_BUDGET_SECONDS] [LIMIT_SECONDS] [SPEEDRUN OPTION...]
#
# A run longer than one call of the machine: `START=1 benches/speedrun/gpu.sh ...` starts it
# in a session of its own and returns; then, on the same warm machine, each
# `WAIT=SECONDS benches/speedrun/gpu.sh` waits for it at most that long and collects the
# results once it has ended.
# A budget below the preset's 420 s leaves room when the whole call has a hard limit.
# With the spread sample of benches/prepare.sh, gpu/data, gpu/tasks, the binary and the tree
# are more than one call carries: stage gpu/data first (`benches/stage.sh gpu/data` in a call
# that carries only it), then START without it, on the same warm machine.
set -uo pipefail
budget=${1:-420}
limit=${2:-900}
shift 2 2>/dev/null || shift $#
out=${OUT:-gpu-out}
work=/tmp/cxxlm-speedrun
mkdir -p "$out" "$work"
out=$(realpath "$out")
trap : EXIT # the results are few files: no bundling
source "$(dirname "$0")/../gpu-env.sh"
export CXXLM_FONT=$PWD/gpu/DejaVuSans.ttf
run=$work/gpu-10min

collect() {
    cp "$work/exit.txt" "$out/" 2>/dev/null
    "$work/cxxlm" report "$run" >/dev/null
    cp "$run/report.md" "$out/"
    # Of the checkpoints, only what the report card reads (the model's config, the step).
    (cd "$run" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.html' -o -name '*.png' -o -name '*.log' -o -name '*.toml' \) \
        \( -not -path '*/checkpoints/*' -o -name config.json -o -name trainer.json \) -size -8M | tar -czf "$out/run.tar.gz" -T -)
    tail -5 "$work/speedrun.err"
}

if [ -n "${WAIT:-}" ]; then
    for _ in $(seq "$WAIT"); do [ -f "$work/exit.txt" ] && break; sleep 1; done
    if [ -f "$work/exit.txt" ]; then collect; else grep '^==' "$work/speedrun.err" | tail -3; fi
    exit 0
fi

tasks=()
# Function-body tasks (`cxxlm tasks bodies`, gpu/tasks/bodies.jsonl.zst) join both.
[ -d gpu/tasks ] && tasks=(--sft-data gpu/tasks --rl-tasks gpu/tasks)
rm -f "$work/exit.txt"
speedrun() {
    local start=$(date +%s)
    timeout -s INT "$limit" "$work/cxxlm" speedrun --preset gpu-10min --sources gpu/data -o "$run" \
        "${tasks[@]}" --set pretrain.train.time_budget="$budget" "$@" >"$work/speedrun.out" 2>"$work/speedrun.err"
    echo "speedrun exit $? after $(( $(date +%s) - start )) s" >"$work/exit.txt"
}
if [ -n "${START:-}" ]; then
    export -f speedrun
    export work run limit budget
    export tasks_line="${tasks[*]}"
    setsid bash -c 'tasks=($tasks_line); speedrun "$@"' speedrun "$@" </dev/null >/dev/null 2>&1 &
    sleep 5
    grep '^==' "$work/speedrun.err" | tail -3
    exit 0
fi
speedrun "$@"
cat "$work/exit.txt"
collect
