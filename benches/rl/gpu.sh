#!/usr/bin/env bash
# RL on the GPU machine, in one call of under 9 minutes (gpu/ from benches/rl/prepare.sh):
# a d12 pretrained briefly on the corpus shards, fine-tuned on the train split of the
# bug-fix tasks in gpu/tasks, then trained with GRPO on the same tasks (K = 8 completions
# of up to 256 tokens per prompt, rewards judged in the sandbox pool). Prints rollouts/s
# including the update (against nanochat's ~5.8 per GPU), the share of step time spent
# waiting for rewards, the time split, the reward curve, and bug-fix pass@1 and compile
# rate on the held-out (test split) tasks before and after RL.
# With PRETRAINED set to a pretraining run on this machine (benches/tok/judged.sh leaves
# one in /tmp/cxxlm-judged/d12), that run is fine-tuned instead of a fresh brief one.
# Every EVAL_EVERY (5) steps, RL answers its 64 held-out tasks greedily: the same prompts
# each time, so their mean reward is the curve to read for a trend.
# RL samples each rollout batch while the last rewards of the one before come in
# (rl.sample_ahead; SAMPLE_AHEAD=false for on-policy batches that wait for their rewards).
# Results (metrics, logs, summary) land in $OUT (or gpu-out/).
#
#   [PRETRAINED=RUN] benches/rl/gpu.sh [PRETRAIN_SECONDS] [RL_SECONDS] [HELD_OUT_TASKS]   # defaults: 150, 150, 100
set -euo pipefail
pretrain_seconds=${1:-150}
rl_seconds=${2:-150}
held_out=${3:-100}
out=${OUT:-gpu-out}
work=/tmp/cxxlm-rl
mkdir -p "$out" "$work"
[ -d gpu/tasks ] || { echo "gpu/tasks is missing: run TASKS=... benches/rl/prepare.sh first" >&2; exit 1; }
source "$(dirname "$0")/../gpu-env.sh"
cxxlm=$work/cxxlm

shapes=(--set train.device_batch=32 --set train.total_batch_tokens=65536 --set checkpoint.every=0 --log-every 20)
rm -rf "$work/sft" "$work/rl"
pretrained_d12 "$pretrain_seconds"
# The train split of the tasks, nanochat's recipe, at most SFT_SECONDS (60).
"$cxxlm" train sft --init "$work/pre" --data gpu/tasks -o "$work/sft" "${shapes[@]}" \
    --set sft.recipe=nanochat --set sft.epochs=2 --set sft.val_fraction=0.02 --set eval.every=0 \
    --set train.time_budget="${SFT_SECONDS:-60}" >"$out/sft.log" 2>&1 || { tail -20 "$out/sft.log"; exit 1; }
source "$(dirname "$0")/settings.sh"
"$cxxlm" train rl --init "$work/sft" --tasks gpu/tasks -o "$work/rl" "${rl_settings[@]}" \
    --set rl.sample_ahead="${SAMPLE_AHEAD:-true}" --set train.time_budget="$rl_seconds" \
    --set eval.every="${EVAL_EVERY:-5}" >"$out/rl.log" 2>&1 || { tail -30 "$out/rl.log"; exit 1; }
cp "$work/rl/metrics.jsonl" "$out/metrics-rl.jsonl"
cp "$work/rl/samples.jsonl" "$out/samples-rl.jsonl" 2>/dev/null || true
gzip -c "$work/rl/rollouts.jsonl" >"$out/rollouts-rl.jsonl.gz"
for run in sft rl; do
    "$cxxlm" eval bugfix --tasks gpu/tasks --split test --checkpoint "$work/$run" \
        --limit "$held_out" --max-tokens 256 --batch 128 --json "$out/bugfix-$run.json" \
        >"$out/bugfix-$run.log" 2>&1 || tail -5 "$out/bugfix-$run.log"
done
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys
out = sys.argv[1]
rs = [json.loads(l) for l in open(f"{out}/metrics-rl.jsonl")]
steps = [r for r in rs if "loss" in r]
batches = [r for r in steps if "reward_mean" in r]
steady = batches[2:] or batches  # the first steps warm up kernels and the sampler's graphs
rps = statistics.median(r["rollouts_s"] for r in steady)
wait = statistics.median(r["reward_wait_share"] for r in steady)
gen = statistics.median(r["generation_seconds"] for r in steady)
rwait = statistics.median(r["reward_wait_seconds"] for r in steady)
step = statistics.median(r["rollouts"] / r["rollouts_s"] for r in steady)
print(f"RESULT rollouts_s={rps:.1f} vs_nanochat_5.8={rps / 5.8:.1f}x reward_wait_share={wait:.4f} "
      f"(d12, K=8, 256 prompts x tokens, {len(batches)} rollout batches)")
print(f"RESULT time split per batch: {step:.1f}s = generation {gen:.1f}s + reward wait {rwait:.2f}s "
      f"+ update and the rest {step - gen - rwait:.1f}s")
med = lambda k: statistics.median(r[k] for r in steady)
if "padding_share" in steady[0]:
    print(f"RESULT padding in the update's micro-batches (median): {100 * med('padding_share'):.1f}%")
if "gpu_peak_reserved_gib" in steady[0]:
    # The kept decoder's KV cache stays through the update: the peaks include it.
    print(f"RESULT GPU memory (peak over the run): {max(r['gpu_peak_allocated_gib'] for r in steps):.2f} GiB "
          f"handed out, {max(r['gpu_peak_reserved_gib'] for r in steps):.2f} GiB held by torch's allocator")
if "gpu_alloc_retries" in steady[0]:
    print(f"RESULT torch's allocator per batch (median): {med('gpu_alloc_retries'):.0f} retries, "
          f"{med('gpu_device_allocs'):.0f} cudaMallocs")
if "prefill_seconds" in steady[0]:
    dec, n = med("decode_seconds"), med("decode_steps")
    print(f"RESULT generation split: prefill {med('prefill_seconds'):.2f}s + decoding {dec:.2f}s "
          f"({n:.0f} steps, {1000 * dec / max(n, 1):.1f} ms a step) + sampled log-probabilities "
          f"{med('sampled_logprob_seconds'):.2f}s")
print("RESULT reward curve (step mean compile pass zero_std_groups truncated kl):")
for r in batches:
    print(f"  {r['step']:4d} {r['reward_mean']:+.3f} {r['compile_rate']:.3f} {r['test_pass_rate']:.3f} "
          f"{r['zero_std_groups']:.2f} {r['truncated_share']:.2f} {r.get('kl', 0.0):.5f}")
evals = [r for r in rs if "val_reward" in r]
if evals:
    print("RESULT held-out tasks during RL, greedy (step reward compile pass): " + ", ".join(
        f"{r['step']} {r['val_reward']:+.3f} {r['val_compile_rate']:.3f} {r['val_pass_at_1']:.3f}" for r in evals))
third = max(1, len(batches) // 3)
first = statistics.mean(r["reward_mean"] for r in batches[:third])
last = statistics.mean(r["reward_mean"] for r in batches[-third:])
print(f"RESULT mean reward, first third {first:+.3f} -> last third {last:+.3f}")
# The trend as a least-squares slope per batch with its standard error: batches draw
# different prompts, so one batch against another says little.
if len(batches) >= 3:
    xs = [float(r["step"]) for r in batches]
    ys = [r["reward_mean"] for r in batches]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = [y - my - slope * (x - mx) for x, y in zip(xs, ys)]
    se = (sum(e * e for e in resid) / (len(xs) - 2) / sxx) ** 0.5
    print(f"RESULT reward slope {slope:+.4f} per step (standard error {se:.4f}, t = {slope / se if se else float('inf'):.2f})")
for run, label in (("sft", "before"), ("rl", "after")):
    try:
        b = json.load(open(f"{out}/bugfix-{run}.json"))
        print(f"RESULT bugfix_{label} pass@1={b['pass@1']:.3f} compile_rate={b['compiled'] / b['answers']:.3f} over the {b['answers']} answered of {b['tasks']} held-out tasks (the rest leave no room to answer)")
    except (OSError, KeyError, ValueError) as e:
        print(f"RESULT bugfix_{label} missing ({e})")
PY
