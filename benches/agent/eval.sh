#!/usr/bin/env bash
# The agent's success on runnable tasks (`cxxlm agent eval`), with the index's tools and
# without them: each task a small repository, the loop within its budget, the final
# program judged by the task's own verifier in the sandbox.
# With CHECKPOINT unset, a tiny model (`model.preset=tiny`) is pretrained here on the CPU
# for 200 steps on libstdc++'s bits/ (into bench-out/agent/tiny, once): a check of the
# harness end to end, not of the method.
#
#   [CHECKPOINT=RUN] [PROFILE=dev] benches/agent/eval.sh TASKS...   # outputs of tasks bugs/bodies
#   env: LIMIT (20), STEPS (8), MAX_TOKENS (128), OUT (bench-out/agent/eval), SPLIT (test)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || { echo "usage: $0 TASKS... (outputs of cxxlm tasks bugs / tasks bodies)" >&2; exit 1; }
profile=${PROFILE:-release}
cargo build --profile "$profile" -p cxxlm --bins
bin=target/$([ "$profile" = dev ] && echo debug || echo "$profile")/cxxlm
work=bench-out/agent
if [ -z "${CHECKPOINT:-}" ]; then
    tiny=$work/tiny
    if [ ! -d "$tiny/pre" ]; then
        bits=$(ls -d /usr/include/c++/*/bits | sort -V | tail -1)
        rm -rf "$tiny" && mkdir -p "$tiny"
        "$bin" data run -i "$bits" -o "$tiny/data"
        "$bin" tok train -i "$tiny/data" --vocab 2048 -o "$tiny/tokenizer.json"
        "$bin" pack --tokenizer "$tiny/tokenizer.json" -i "$tiny/data" -o "$tiny/pack" --val-fraction 0.1
        "$bin" train pretrain --pack "$tiny/pack" --out "$tiny/pre" --set model.preset=tiny \
            --set train.device_batch=4 --set train.total_batch_tokens=1024 --set train.steps=200 \
            --set eval.every=0 --set train.device=cpu
    fi
    CHECKPOINT=$tiny/pre
fi
"$bin" agent eval --tasks "$@" --split "${SPLIT:-test}" --checkpoint "$CHECKPOINT" \
    --limit "${LIMIT:-20}" --steps "${STEPS:-8}" --max-tokens "${MAX_TOKENS:-128}" \
    -o "${OUT:-$work/eval}"
