#!/usr/bin/env bash
# Data-parallel training on a 2-GPU machine (nvidia-h200-x2), in one call:
#   A: 1 GPU, d20, 2 micro-batches of B=16 x 2048 per step, 50 steps   (reference)
#   B: 2 GPUs (`cxxlm launch --gpus 2`), B=16 per GPU, same 50 steps    (must match A)
#   C: 1 GPU, B=16, one micro-batch per step, 30 steps                 (scaling baseline)
#   D: B with full sharding (train.sharding = "full")                  (must match A)
# Prints per-step loss agreement of A with B and D, B's tok/s over C's (same per-GPU
# batch), and D's over B's.
#
# Run from the repository root with gpu/ carried (benches/train/prepare.sh):
#   benches/train/multi-gpu.sh [DEPTH] [BATCH] [STEPS]
# $OUT (or gpu-out/) receives summary.txt and multi-gpu.tar.gz (logs, metrics, topology).
set -euo pipefail
depth=${1:-20}
batch=${2:-16}
steps=${3:-50}
final=${OUT:-gpu-out}
work=/tmp/cxxlm-gpu
out=$work/multi-gpu
mkdir -p "$final" "$out"
trap 'tar -czf "$final/multi-gpu.tar.gz" -C "$work" multi-gpu; cp "$out/summary.txt" "$final/" 2>/dev/null || true' EXIT
source "$(dirname "$0")/../gpu-env.sh"
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
if [ ! -f "$work/pack/pack.json" ]; then
    "$work/cxxlm" pack --tokenizer gpu/tokenizer.json -i gpu/data -o "$work/pack" --val-fraction 0.005 >"$out/pack.log" 2>&1
fi
nvidia-smi topo -m | tee "$out/topo.txt"

train() { # name ranks total_batch_rows steps [extra --set options]
    local name=$1 ranks=$2 rows=$3 n=$4
    shift 4
    rm -rf "$work/$name"
    local cmd=("$work/cxxlm")
    [ "$ranks" -gt 1 ] && cmd+=(launch --gpus "$ranks" --)
    cmd+=(train pretrain --pack "$work/pack" --out "$work/$name"
        --set model.preset=d$depth --set train.device_batch=$batch
        --set train.total_batch_tokens=$((rows * 2048)) --set train.steps=$n
        --set eval.every=0 --set checkpoint.every=0 --log-every 10 "$@")
    echo "== $name: ${cmd[*]}" | tee -a "$out/commands.txt"
    timeout 240 "${cmd[@]}" >"$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; exit 1; }
    cp "$work/$name/metrics.jsonl" "$out/metrics-$name.jsonl"
}

train one-gpu-accum2 1 $((2 * batch)) "$steps"
train two-gpus 2 $((2 * batch)) "$steps"
train one-gpu 1 "$batch" 30
train two-gpus-full 2 $((2 * batch)) "$steps" --set train.sharding=full

python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, statistics, sys
out = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{out}/metrics-{name}.jsonl") if '"loss"' in l]
a, b, c = rows("one-gpu-accum2"), rows("two-gpus"), rows("one-gpu")
d = rows("two-gpus-full")
for name, other in (("2 GPUs", b), ("2 GPUs fully sharded", d)):
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, other)]
    print(f"{name}: loss agreement with 1 GPU over {len(diffs)} steps: max |diff| {max(diffs):.4f}, "
          f"mean {statistics.mean(diffs):.4f}; final loss 1 GPU x2 micro {a[-1]['loss']:.4f}, "
          f"{name} {other[-1]['loss']:.4f}")
    for s in (1, 10, 25, len(a)):
        print(f"  step {s}: {a[s-1]['loss']:.4f} vs {other[s-1]['loss']:.4f}")
def speed(r):
    r = r[5:]
    return (statistics.median(x["tok_s"] for x in r), statistics.median(x["mfu"] for x in r),
            max(x["gpu_memory_gib"] for x in r), statistics.median(x["step_seconds"] for x in r))
for name, r in (("1 GPU, 1 micro-batch", c), ("1 GPU, 2 micro-batches", a), ("2 GPUs", b),
                ("2 GPUs fully sharded", d)):
    t, m, g, s = speed(r)
    print(f"RESULT {name}: {t:.0f} tok/s, MFU {m*100:.1f}% (per GPU), {g:.1f} GiB on GPU 0, {s*1e3:.0f} ms/step")
print(f"scaling 2 GPUs / 1 GPU (same per-GPU batch): {speed(b)[0] / speed(c)[0]:.3f}x")
print(f"2 GPUs / 1 GPU with 2 micro-batches (same tokens per step): {speed(b)[0] / speed(a)[0]:.3f}x")
print(f"full sharding / optimizer sharding on 2 GPUs: {speed(d)[0] / speed(b)[0]:.3f}x")
PY
