#!/usr/bin/env bash
# SFT on the GPU machine, in one call of under 10 minutes (gpu/ from benches/sft/prepare.sh):
# a d12 pretrained briefly on the corpus shards, then fine-tuned on the bug-fix examples of
# gpu/sft; prints SFT tokens/s against pretraining tokens/s at the same shapes (d12, rows of
# 2048, 32 rows per pass), the share of SFT tokens that is padding and learned, the
# held-out loss and exact answers before and after, and MBPP-C++ pass@1 before and after.
# With gpu/tasks (`cxxlm tasks bugs` parts, TASKS= of prepare.sh), the fine-tuning data are
# those tasks (their train split; the test split is left out by `train sft`), and bug-fix
# pass@1 on the test split is scored before and after.
# With PRETRAINED set to a pretraining run on this machine (benches/tok/judged.sh leaves
# one in /tmp/cxxlm-judged/d12), that run is fine-tuned instead of a fresh brief one.
# Results (metrics, logs, sft-data.json, summary) land in $OUT (or gpu-out/).
#
#   [PRETRAINED=RUN] benches/sft/gpu.sh [PRETRAIN_SECONDS] [MBPP_PROBLEMS]     # defaults: 180, 150
set -euo pipefail
pretrain_seconds=${1:-180}
problems=${2:-150}
out=${OUT:-gpu-out}
work=/tmp/cxxlm-sft
mkdir -p "$out" "$work"
source "$(dirname "$0")/../gpu-env.sh"
cxxlm=$work/cxxlm

# The same shapes in both stages: d12, 32 rows of 2048 per pass, 65,536 tokens per step.
shapes=(--set train.device_batch=32 --set train.total_batch_tokens=65536 --set checkpoint.every=0 --log-every 20)
rm -rf "$work/sft"
pretrained_d12 "$pretrain_seconds"
# nanochat's recipe (the pretraining optimizer, its moments carried over, a 1-sqrt
# warmdown): the seeds' AdamW at 1e-5 barely moves a model this small in 2 epochs.
sft_data=gpu/sft/bugfix.jsonl.gz
[ -d gpu/tasks ] && sft_data=gpu/tasks
"$cxxlm" train sft --init "$work/pre" --data "$sft_data" -o "$work/sft" "${shapes[@]}" \
    --set sft.recipe=nanochat --set sft.epochs=2 --set sft.val_fraction=0.02 \
    --set eval.every=100 --set eval.exact_match=64 --set eval.samples=2 >"$out/sft.log" 2>&1 \
    || { tail -20 "$out/sft.log"; exit 1; }
cp "$work/pre/metrics.jsonl" "$out/metrics-pretrain.jsonl"
cp "$work/sft/metrics.jsonl" "$out/metrics-sft.jsonl"
cp "$work/sft/sft-data.json" "$work/sft/samples.jsonl" "$out/"
for run in pre sft; do
    "$cxxlm" eval mbpp --checkpoint "$work/$run" --limit "$problems" --max-tokens 192 --batch 128 \
        --json "$out/mbpp-$run.json" >"$out/mbpp-$run.log" 2>&1 || tail -5 "$out/mbpp-$run.log"
    [ -d gpu/tasks ] && { "$cxxlm" eval bugfix --tasks gpu/tasks --split test --checkpoint "$work/$run" \
        --limit "$problems" --max-tokens 512 --batch 64 --json "$out/bugfix-$run.json" \
        >"$out/bugfix-$run.log" 2>&1 || tail -5 "$out/bugfix-$run.log"; }
done
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys
out = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{out}/metrics-{name}.jsonl")]
def steady(rs):  # training records after the first 5 steps (compilation, warm-up)
    rs = [r for r in rs if "loss" in r]
    return rs[5:] or rs
pre, sft = rows("pretrain"), rows("sft")
tp = statistics.median(r["tok_s"] for r in steady(pre))
ts = statistics.median(r["tok_s"] for r in steady(sft))
pad = statistics.median(r["padding_share"] for r in steady(sft))
learned = statistics.median(r["supervised_share"] for r in steady(sft))
print(f"RESULT pretrain_tok_s={tp:.0f} sft_tok_s={ts:.0f} ratio={ts / tp:.3f} "
      f"sft_padding_share={pad:.4f} sft_learned_share={learned:.4f} (d12, 32 x 2048 per pass)")
val = [(r["step"], r["val_loss"]) for r in sft if "val_loss" in r]
em = [(r["step"], r["val_exact_match"]) for r in sft if "val_exact_match" in r]
print(f"RESULT sft_steps={steady(sft)[-1]['step']} held_out_loss {val[0][1]:.4f} -> {val[-1][1]:.4f}, "
      f"exact answers {em[0][1]:.3f} -> {em[-1][1]:.3f} (of 64 held-out bug fixes)")
for run, label in (("pre", "before"), ("sft", "after")):
    try:
        m = json.load(open(f"{out}/mbpp-{run}.json"))
        print(f"RESULT mbpp_{label} pass@1={m['pass_at_k']['pass@1']:.3f} compiled={m['compiled']} of {m['problems']}")
    except (OSError, KeyError, ValueError) as e:
        print(f"RESULT mbpp_{label} missing ({e})")
    try:
        b = json.load(open(f"{out}/bugfix-{run}.json"))
        print(f"RESULT bugfix_{label} pass@1={b['pass@1']:.3f} compiled={b['compiled']} of {b['tasks']}")
    except OSError:
        pass
data = json.load(open(f"{out}/sft-data.json"))
print("SFT data:", json.dumps({k: data["stats"][k] for k in ("records", "train_examples", "val_examples", "train_tokens", "learned_tokens", "truncated")}),
      f"padding over the epochs {data['padding_share']:.4f}")
PY
