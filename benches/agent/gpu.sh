#!/usr/bin/env bash
# `cxxlm agent eval` on the GPU machine: a trained model's success on held-out bug tasks
# (gpu/tasks/part-*, `cxxlm tasks bugs` parts) and function-body tasks
# (gpu/tasks/bodies.jsonl.zst), their test split, with the index's tools and without.
# CHECKPOINT: a run or checkpoint on that machine (default: the speedrun's reinforced model,
# else its fine-tuned one, from benches/speedrun/gpu.sh; else, with PRETRAIN_SECONDS=N, a d12
# pretrained here on gpu/data for N seconds). The evaluation resumes: a call stopped at
# LIMIT_SECONDS (540) is continued by the next call on the same warm machine. Summaries land in $OUT
# (or gpu-out/): agent-bugs.txt/.json, agent-bodies.txt/.json and their transcripts.
# With TOOL_SFT=N, the model is first fine-tuned on the tool-use trajectories of N bug
# tasks (`cxxlm tasks trajectories`, spread over gpu/tasks; `train sft` leaves their test
# split out), so that it has seen the call format: that model is then evaluated.
#
# JOBS (8): runs at once, their turns decoded together.
#
#   [CHECKPOINT=RUN | PRETRAIN_SECONDS=N] [TOOL_SFT=N] [JOBS=N] benches/agent/gpu.sh [TASKS_PER_KIND] [STEPS] [MAX_TOKENS]   # defaults: 25, 12, 512
set -uo pipefail
per_kind=${1:-25}
steps=${2:-12}
max_tokens=${3:-512}
out=${OUT:-gpu-out}
work=/tmp/cxxlm-agent
mkdir -p "$out" "$work"
trap : EXIT # the results are few files: no bundling
source "$(dirname "$0")/../gpu-env.sh"
deadline=$(( $(date +%s) + ${LIMIT_SECONDS:-540} ))
checkpoint=${CHECKPOINT:-}
for c in /tmp/cxxlm-speedrun/gpu-10min/rl /tmp/cxxlm-speedrun/gpu-10min/sft; do
    [ -z "$checkpoint" ] && [ -d "$c" ] && checkpoint=$c
done
if [ -z "$checkpoint" ] && [ -n "${PRETRAIN_SECONDS:-}" ]; then
    if [ ! -f "$work/pre.done" ]; then
        shapes=()
        pretrained_d12 "$PRETRAIN_SECONDS"
        tail -2 "$out/pretrain.log"
        touch "$work/pre.done"
    fi
    checkpoint=$work/pre
fi
[ -n "$checkpoint" ] || { echo "no checkpoint: set CHECKPOINT=RUN or PRETRAIN_SECONDS=N, or run benches/speedrun/gpu.sh first" >&2; exit 1; }
if [ -n "${TOOL_SFT:-}" ]; then
    tuned=$work/tool-sft
    if [ ! -f "$tuned/done" ]; then
        # Made beforehand where the GPU would wait for them (benches/prepare.sh), else here.
        examples=gpu/tool-use.jsonl.zst
        if [ ! -f "$examples" ]; then
            examples=$work/tool-use.jsonl
            [ -f "$examples" ] || "$work/cxxlm" tasks trajectories -i gpu/tasks -o "$examples" \
                --limit "$TOOL_SFT" | tee "$out/trajectories.txt"
        fi
        timeout -s INT $(( deadline - $(date +%s) )) "$work/cxxlm" train sft --init "$checkpoint" \
            --data "$examples" -o "$tuned" --resume --set sft.recipe=nanochat \
            --set sft.epochs=3 --set sft.val_fraction=0.05 --set checkpoint.every=0 --log-every 20 \
            --set train.device_batch=4 --set train.total_batch_tokens=8192 \
            >"$out/tool-sft.log" 2>&1 && touch "$tuned/done"
        tail -3 "$out/tool-sft.log"
        [ -f "$tuned/done" ] || exit 0 # the next call goes on
    fi
    checkpoint=$tuned
fi
echo "checkpoint: $checkpoint"
for kind in bugs bodies; do
    tasks=(gpu/tasks/part-*.jsonl.zst)
    [ "$kind" = bodies ] && tasks=(gpu/tasks/bodies.jsonl.zst)
    [ -e "${tasks[0]}" ] || continue
    left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 10 ] || break
    timeout -s INT "$left" "$work/cxxlm" agent eval --tasks "${tasks[@]}" --checkpoint "$checkpoint" \
        --limit "$per_kind" --steps "$steps" --max-tokens "$max_tokens" --jobs "${JOBS:-8}" -o "$work/eval-$kind" \
        >"$out/agent-$kind.txt" 2>"$out/agent-$kind.log"
    echo "$kind: exit $?"
    cp "$work/eval-$kind/summary.json" "$out/agent-$kind.json" 2>/dev/null
    # What the model wrote, to read its unreadable calls.
    tar -czf "$out/transcripts-$kind.tgz" -C "$work/eval-$kind" transcripts 2>/dev/null
    cat "$out/agent-$kind.txt"
done
