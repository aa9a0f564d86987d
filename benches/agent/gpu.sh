#!/usr/bin/env bash
# `cxxlm agent eval` on the GPU machine: a trained model's success on held-out bug tasks
# (gpu/tasks, `cxxlm tasks bugs` parts) and function-body tasks (gpu/bodies.jsonl), their
# test split, with the index's tools and without. CHECKPOINT: a run or checkpoint on that
# machine (default: the speedrun's reinforced model, else its fine-tuned one, from
# benches/speedrun/gpu.sh). The evaluation resumes: a call stopped at LIMIT_SECONDS (540)
# is continued by the next call on the same warm machine. Summaries land in $OUT
# (or gpu-out/): agent-bugs.txt/.json, agent-bodies.txt/.json.
# With TOOL_SFT=N, the model is first fine-tuned on the tool-use trajectories of N bug
# tasks (`cxxlm tasks trajectories`, spread over gpu/tasks; `train sft` leaves their test
# split out), so that it has seen the call format: that model is then evaluated.
#
# JOBS (8): runs at once, their turns decoded together.
#
#   [CHECKPOINT=RUN] [TOOL_SFT=N] [JOBS=N] benches/agent/gpu.sh [TASKS_PER_KIND] [STEPS] [MAX_TOKENS]   # defaults: 25, 12, 512
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
deadline=$(( $(date +%s) + ${LIMIT_SECONDS:-540} ))
if [ -n "${TOOL_SFT:-}" ]; then
    tuned=$work/tool-sft
    if [ ! -f "$tuned/done" ]; then
        [ -f "$work/tool-use.jsonl" ] || "$work/cxxlm" tasks trajectories -i gpu/tasks -o "$work/tool-use.jsonl" \
            --limit "$TOOL_SFT" | tee "$out/trajectories.txt"
        timeout -s INT $(( deadline - $(date +%s) )) "$work/cxxlm" train sft --init "$checkpoint" \
            --data "$work/tool-use.jsonl" -o "$tuned" --resume --set sft.recipe=nanochat \
            --set sft.epochs=2 --set sft.val_fraction=0.05 --set checkpoint.every=0 --log-every 20 \
            >"$out/tool-sft.log" 2>&1 && touch "$tuned/done"
        tail -3 "$out/tool-sft.log"
        [ -f "$tuned/done" ] || exit 0 # the next call goes on
    fi
    checkpoint=$tuned
fi
echo "checkpoint: $checkpoint"
for kind in bugs bodies; do
    tasks=gpu/tasks
    [ "$kind" = bodies ] && tasks=gpu/bodies.jsonl
    [ -e "$tasks" ] || continue
    left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 10 ] || break
    timeout -s INT "$left" "$work/cxxlm" agent eval --tasks "$tasks" --checkpoint "$checkpoint" \
        --limit "$per_kind" --steps "$steps" --max-tokens "$max_tokens" --jobs "${JOBS:-8}" -o "$work/eval-$kind" \
        >"$out/agent-$kind.txt" 2>"$out/agent-$kind.log"
    echo "$kind: exit $?"
    cp "$work/eval-$kind/summary.json" "$out/agent-$kind.json" 2>/dev/null
    cat "$out/agent-$kind.txt"
done
