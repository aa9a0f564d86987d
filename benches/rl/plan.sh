#!/usr/bin/env bash
# The RL memory plan against the allocator's peak, on the GPU machine, in one call of a few
# minutes: a d12 trained for 2 steps on gpu/held-out (packed with gpu/tokenizer.json), whose
# completions mostly run to rl.max_new_tokens as the plan assumes; then for each setting of
# SETTINGS, `train rl --check` and 3 steps of `train rl` on the tasks of gpu/rltasks (an
# output of `cxxlm tasks bugs`). With BEFORE (another build's gpu/*.tar.xz), its binary runs
# the same steps beside: the peak of each build at each setting. No completion of so young a
# model compiles, so every reward would be equal and nothing learned (the run refused by its
# guard): DAPO's length penalty over the whole completion makes the rewards differ.
# Results (plans, logs, summary) land in $OUT (or gpu-out/). gpu/rltasks as made here:
#   cxxlm tasks bugs --max-candidates 40 -o gpu/rltasks -i corpus/debian/pugixml_1.13.orig.tar.gz ...
# (pugixml, double-conversion, tinyxml2, fmtlib, yaml-cpp, rapidjson, snappy, leveldb, cli11,
# nlohmann-json3, range-v3, re2: 24 train-split tasks).
#
#   [BEFORE=gpu/cxxlm-before.tar.xz] [SETTINGS="PROMPTS:SAMPLES:MAX_NEW:DEVICE_BATCH ..."] benches/rl/plan.sh
set -euo pipefail
out=${OUT:-gpu-out}
work=/tmp/cxxlm-rl-plan
mkdir -p "$out" "$work"
[ -d gpu/rltasks ] || { echo "gpu/rltasks is missing: the output of cxxlm tasks bugs" >&2; exit 1; }
source "$(dirname "$0")/../gpu-env.sh"
builds=("$work/cxxlm-torch")
if [ -n "${BEFORE:-}" ]; then
    mkdir -p "$work/before"
    python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$BEFORE" "$work/before"
    builds+=("$work/before/cxxlm-torch")
fi
x=$work/cxxlm-torch
[ -f "$work/pack/pack.json" ] || "$x" pack --tokenizer gpu/tokenizer.json -i gpu/held-out -o "$work/pack" \
    --val-fraction 0.005 >"$out/pack.log" 2>&1
rm -rf "$work/pre"
"$x" train pretrain --pack "$work/pack" --out "$work/pre" --set model.preset=d12 --set train.device_batch=32 \
    --set train.total_batch_tokens=65536 --set train.steps=2 --set eval.every=0 >"$out/pretrain.log" 2>&1 \
    || { tail -20 "$out/pretrain.log"; exit 1; }
for setting in ${SETTINGS:-16:8:256:32 16:8:1024:32}; do
    IFS=: read -r prompts samples new batch <<<"$setting"
    for build in "${builds[@]}"; do
        name=p$prompts-k$samples-n$new-b$batch-$([ "$build" = "$x" ] && echo this || echo before)
        args=(train rl --init "$work/pre" --tasks gpu/rltasks -o "$work/$name" --set rl.prompts="$prompts"
            --set rl.samples="$samples" --set rl.max_new_tokens="$new" --set train.device_batch="$batch"
            --set train.steps=3 --set checkpoint.every=0 --set eval.every=0 --log-every 1
            --set rl.overlong=\"penalty\" --set rl.overlong_buffer="$new")
        rm -rf "${work:?}/$name"
        "$build" "${args[@]}" --check >"$out/plan-$name.txt" 2>&1 || true
        timeout 150 "$build" "${args[@]}" >"$out/rl-$name.log" 2>&1 || tail -5 "$out/rl-$name.log"
        python3 - "$out/plan-$name.txt" "$work/$name/metrics.jsonl" "$name" <<'PY' | tee -a "$out/summary.txt"
import json, re, sys
plan = open(sys.argv[1]).read()
total = re.search(r"total\s+([\d.]+) GiB", plan)
shape = re.search(r"\((\d+ rank\(s\), [^)]*)\)", plan)
try:
    steps = [json.loads(l) for l in open(sys.argv[2])]
    steps = [r for r in steps if "loss" in r]
except OSError:
    steps = []
peak = max((r.get("gpu_peak_allocated_gib", 0) for r in steps), default=float("nan"))
cut = [r.get("truncated_share") for r in steps]
print(f"RESULT {sys.argv[3]} planned={total.group(1) if total else 'none'} GiB "
      f"measured_peak={peak:.2f} GiB steps={len(steps)} truncated={cut} "
      f"({shape.group(1) if shape else plan.strip().splitlines()[-1:]})")
PY
    done
done
