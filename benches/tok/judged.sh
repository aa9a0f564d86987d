#!/usr/bin/env bash
# A tokenizer judged by the model it produces, on the GPU machine: d12 trained on the
# default pipeline's pack (normalized text, FIM 0.5) of gpu/data with gpu/tokenizer.json
# for STEPS steps of 32 x 2,048 tokens (3,045 = 2.0e8 tokens), then bits per byte on the
# held-out projects of gpu/held-out (shards of projects the training sample lacks; whole, and
# the files that today's data filters keep and drop, apart), and
# MBPP-C++: the first 100 problems with 5 samples at T 0.2, and all 398 greedy, with the
# compile rate and the share of completions that ran to the 384-token limit (GREEDY=0 leaves
# out the 398-problem greedy pass, so that training and the first 100 fit one 10-minute call
# with TRAIN_SECONDS=440). FIM_RATE sets the pack's FIM rate (default the pipeline's 0.5);
# TRAIN_SET one more `--set KEY=VALUE` of the pretraining (schedule.warmdown_frac=0.4, say);
# KEEP_INDENTATION=1 for raw text (`data run --keep-indentation` shards in DATA and
# gpu/held-out: the held-out split keeps it); TOKENIZER another tokenizer of the same sample (a variant: `tok train` on
# bench-out/judged/sample with other flags, carried in gpu/); DATA other shards (default
# gpu/data; a variant: the sample through `cxxlm data run` with another filter). gpu/ comes from
# benches/tok/judged-prepare.sh. The checkpoint stays in WORK/d12 (default
# /tmp/cxxlm-judged; a variant needs its own) for a later call on the same machine
# (PRETRAINED= of benches/sft/gpu.sh); results land in $OUT (or gpu-out/). When the data,
# gpu/held-out, the binary and the tree are more than one call carries, stage the data first
# (`benches/stage.sh gpu/data-norepeat gpu/held-out` in a call that carries those two), then
# call this carrying the rest, on the same warm machine.
#
#   benches/tok/judged.sh [STEPS]
set -euo pipefail
steps=${1:-3045}
out=${OUT:-gpu-out}
work=${WORK:-/tmp/cxxlm-judged}
tokenizer=${TOKENIZER:-gpu/tokenizer.json}
mkdir -p "$out" "$work"
source "$(dirname "$0")/../gpu-env.sh"
x=$work/cxxlm
# Each stage is skipped when its result exists, so a call cut short is continued by the next
# call on the same machine: training runs at most TRAIN_SECONDS (default 480) per call and
# resumes from its newest checkpoint.
[ -f "$work/pack/pack.json" ] || /usr/bin/time -f "pack: %e s, %M KB" "$x" pack --tokenizer "$tokenizer" \
    -i "${DATA:-gpu/data}" -o "$work/pack" --val-fraction 0.005 ${FIM_RATE:+--fim-rate "$FIM_RATE"} >"$out/pack.log" 2>&1
[ -f "$work/held-out/pack.json" ] || "$x" pack --tokenizer "$tokenizer" -i gpu/held-out -o "$work/held-out" \
    --fim-rate 0 --val-fraction 1 >"$out/pack-held-out.log" 2>&1
# The held-out files split by today's data filters (gpu/held-out may predate one): what the
# default pipeline keeps and what it drops (if any) are scored apart.
if [ ! -f "$work/held-out-kept/pack.json" ]; then
    printf '[output]\nwrite_removed = true\n' >"$work/held-out.toml"
    "$x" data run --config "$work/held-out.toml" -i gpu/held-out -o "$work/held-out-data" \
        $([ "${KEEP_INDENTATION:-}" = 1 ] && echo --keep-indentation) >"$out/held-out-data.log" 2>&1
    for part in kept:. dropped:removed; do
        [ -d "$work/held-out-data/${part#*:}" ] || continue
        "$x" pack --tokenizer "$tokenizer" -i "$work/held-out-data/${part#*:}" -o "$work/held-out-${part%%:*}" \
            --fim-rate 0 --val-fraction 1 >>"$out/pack-held-out.log" 2>&1
    done
fi
final=$work/d12/checkpoints/step-$(printf %06d "$steps")
if [ ! -f "$final/trainer.json" ]; then
    resume=()
    [ -d "$work/d12/checkpoints" ] && resume=(--resume)
    timeout -s KILL "${TRAIN_SECONDS:-480}" "$x" train pretrain --pack "$work/pack" --out "$work/d12" "${resume[@]}" \
        --set model.preset=d12 --set train.device_batch=32 --set train.total_batch_tokens=65536 \
        --set train.steps="$steps" --set eval.every=0 --set checkpoint.every=250 --set checkpoint.keep=1 \
        ${TRAIN_SET:+--set "$TRAIN_SET"} --log-every 100 >>"$work/train.log" 2>&1 || true
    cp "$work/train.log" "$work/d12/metrics.jsonl" "$out/"
    [ -f "$final/trainer.json" ] || { echo "RESUME pretraining stopped before step $steps: $(ls "$work/d12/checkpoints")"; exit 0; }
fi
cp "$work/train.log" "$work/d12/metrics.jsonl" "$out/"
mkdir -p "$work/results"
for set in held-out held-out-kept held-out-dropped; do
    [ -f "$work/$set/pack.json" ] || continue
    [ -f "$work/results/bpb-$set.json" ] || "$x" eval bpb --checkpoint "$work/d12" --pack "$work/$set" \
        --json "$work/results/bpb-$set.json" | tee -a "$out/eval.txt"
done
[ -f "$work/results/mbpp-100x5.json" ] || "$x" eval mbpp --checkpoint "$work/d12" --limit 100 --samples 5 \
    --temperature 0.2 --max-tokens 384 --batch 128 --json "$work/results/mbpp-100x5.json" \
    --completions-out "$work/results/mbpp-100x5.jsonl" 2>&1 | tail -4 | tee -a "$out/eval.txt"
cp "$work"/results/* "$out/"
[ "${GREEDY:-1}" = 0 ] || [ -f "$work/results/mbpp-greedy.json" ] || "$x" eval mbpp --checkpoint "$work/d12" --max-tokens 384 --batch 128 \
    --json "$work/results/mbpp-greedy.json" --completions-out "$work/results/mbpp-greedy.jsonl" 2>&1 | tail -4 | tee -a "$out/eval.txt"
cp "$work"/results/* "$out/"
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, statistics, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"loss"' in l]
tok_s = statistics.median(r["tok_s"] for r in rows[5:])
bpb = {s: json.load(open(f"{out}/bpb-{s}.json"))["bits_per_byte"] if os.path.exists(f"{out}/bpb-{s}.json") else float("nan")
       for s in ("held-out", "held-out-kept", "held-out-dropped")}
print(f"RESULT steps={rows[-1]['step']} tokens={rows[-1]['step'] * 65536:.3g} tok_s={tok_s:.0f} "
      f"held_out_bpb={bpb['held-out']:.4f} kept_by_the_filters={bpb['held-out-kept']:.4f} "
      f"dropped_by_them={bpb['held-out-dropped']:.4f}")
for name in ("mbpp-100x5", "mbpp-greedy"):
    if not os.path.exists(f"{out}/{name}.json"):
        continue
    m = json.load(open(f"{out}/{name}.json"))
    n = m["samples"]
    print(f"RESULT {name} compiled={m['compiled']} of {n} ({m['compiled'] / n:.3f} "
          f"± {m['compile_rate_standard_error']:.3f}) "
          f"buildable_compiled={m['buildable_compiled']} of {m['buildable_samples']} "
          f"pass@1={m['pass_at_k']['pass@1']:.3f} length_limited_share={m['length_limited_share']:.3f}")
PY
