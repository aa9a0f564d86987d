#!/usr/bin/env bash
# RL's decoding loop against the judges beside it, on the GPU machine, in one call of under
# 10 minutes (gpu/ from benches/rl/prepare.sh): benches/rl/gpu.sh for a d12 and its SFT
# (short), then from that SFT checkpoint `cxxlm sample --benchmark-batch 256` on an idle
# host and beside 16 busy loops at niceness 10, and `train rl` for 70 s with 2 and with 16
# reward workers: decoding ms a step, the sampled log-probabilities' seconds, reward wait.
# Results land in $OUT (or gpu-out/).
#
#   benches/rl/judges.sh
set -uo pipefail
out=${OUT:-gpu-out}
work=/tmp/cxxlm-rl
mkdir -p "$out/rl"
EVAL_EVERY=0 OUT=$out/rl timeout 300 "$(dirname "$0")/gpu.sh" 90 80 16 >"$out/rl.txt" 2>&1
source "$(dirname "$0")/../gpu-env.sh"
source "$(dirname "$0")/settings.sh"
x=$work/cxxlm
sample() {
    "$x" sample --checkpoint "$work/sft" --benchmark-batch 256 --benchmark-prompt 700 --max-tokens 256 2>&1 | grep RESULT
}
echo "== sample, idle host"
sample
for _ in $(seq 16); do nice -n 10 sh -c 'while :; do :; done' & done
echo "== sample, 16 busy loops at niceness 10"
sample
kill $(jobs -p) 2>/dev/null
wait 2>/dev/null
for workers in 2 16; do
    timeout 95 "$x" train rl --init "$work/sft" --tasks gpu/tasks -o "$work/rl-$workers" "${rl_settings[@]}" \
        --set rl.sample_ahead=true --set rl.reward_workers="$workers" --set train.time_budget=70 \
        --set eval.every=0 >"$out/rl-$workers.log" 2>&1
    cp "$work/rl-$workers/metrics.jsonl" "$out/metrics-$workers.jsonl"
    echo "== train rl, rl.reward_workers=$workers"
    python3 - "$out/metrics-$workers.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "decode_seconds" in r:
        print(f"batch {r['step']}: decoding {r['decode_seconds']:.1f} s / {r['decode_steps']} steps = "
              f"{1000 * r['decode_seconds'] / max(1, r['decode_steps']):.1f} ms a step; sampled log-probabilities "
              f"{r['sampled_logprob_seconds']:.2f} s; rollouts/s {r['rollouts_s']:.1f}; reward wait {r['reward_wait_share']:.3f}")
PY
done
