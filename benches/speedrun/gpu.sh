#!/usr/bin/env bash
# The gpu-10min speedrun on the GPU machine, from the corpus shards in gpu/data (see
# benches/train/prepare.sh; its binary, plus gpu/DejaVuSans.ttf for the plots). The
# report card, the stages' JSON, logs and metrics (not checkpoints or tokens) land in
# $OUT (or gpu-out/).
#
#   benches/speedrun/gpu.sh [TIME_BUDGET_SECONDS] [LIMIT_SECONDS]
# A budget below the preset's 420 s leaves room when the whole call has a hard limit.
set -uo pipefail
budget=${1:-420}
limit=${2:-900}
out=${OUT:-gpu-out}
work=/tmp/cxxlm-speedrun
mkdir -p "$out" "$work"
out=$(realpath "$out")
source "$(dirname "$0")/../gpu-env.sh"
export CXXLM_FONT=$PWD/gpu/DejaVuSans.ttf
run=$work/gpu-10min
start=$(date +%s)
timeout -s INT "$limit" "$work/cxxlm" speedrun --preset gpu-10min --sources gpu/data -o "$run" \
    --set pretrain.train.time_budget="$budget" >"$out/speedrun.out" 2>"$out/speedrun.err"
echo "speedrun exit $? after $(( $(date +%s) - start )) s" | tee "$out/exit.txt"
"$work/cxxlm" report "$run" >/dev/null
cp "$run/report.md" "$out/"
cd "$run" && find . \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.html' -o -name '*.png' -o -name '*.log' -o -name '*.toml' \) \
    -not -path './train/checkpoints/*' -size -8M | tar -czf "$out/run.tar.gz" -T -
tail -5 "$out/speedrun.err"
