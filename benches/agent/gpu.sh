#!/usr/bin/env bash
# `cxxlm agent eval` on the GPU machine: a trained model's success on held-out bug tasks
# (gpu/tasks, `cxxlm tasks bugs` parts) and function-body tasks (gpu/bodies.jsonl), their
# test split, with the index's tools and without. CHECKPOINT: a run or checkpoint on that
# machine (default: the speedrun's reinforced model, else its fine-tuned one, from
# benches/speedrun/gpu.sh). The evaluation resumes: a call stopped at LIMIT_SECONDS (540)
# is continued by the next call on the same warm machine. Summaries land in $OUT
# (or gpu-out/): agent-bugs.txt/.json, agent-bodies.txt/.json.
#
#   [CHECKPOINT=RUN] benches/agent/gpu.sh [TASKS_PER_KIND] [STEPS] [MAX_TOKENS]   # defaults: 25, 12, 512
set -uo pipefail
per_kind=${1:-25}
steps=${2:-12}
max_tokens=${3:-512}
out=${OUT:-gpu-out}
work=/tmp/cxxlm-agent
mkdir -p "$out" "$work"
trap : EXIT # the results are few files: no bundling
source "$(dirname "$0")/../gpu-env.sh"
checkpoint=${CHECKPOINT:-}
for c in /tmp/cxxlm-speedrun/gpu-10min/rl /tmp/cxxlm-speedrun/gpu-10min/sft; do
    [ -z "$checkpoint" ] && [ -d "$c" ] && checkpoint=$c
done
[ -n "$checkpoint" ] || { echo "no checkpoint: set CHECKPOINT=RUN, or run benches/speedrun/gpu.sh first" >&2; exit 1; }
echo "checkpoint: $checkpoint"
deadline=$(( $(date +%s) + ${LIMIT_SECONDS:-540} ))
for kind in bugs bodies; do
    tasks=gpu/tasks
    [ "$kind" = bodies ] && tasks=gpu/bodies.jsonl
    [ -e "$tasks" ] || continue
    left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 10 ] || break
    timeout -s INT "$left" "$work/cxxlm" agent eval --tasks "$tasks" --checkpoint "$checkpoint" \
        --limit "$per_kind" --steps "$steps" --max-tokens "$max_tokens" -o "$work/eval-$kind" \
        >"$out/agent-$kind.txt" 2>"$out/agent-$kind.log"
    echo "$kind: exit $?"
    cp "$work/eval-$kind/summary.json" "$out/agent-$kind.json" 2>/dev/null
    cat "$out/agent-$kind.txt"
done
