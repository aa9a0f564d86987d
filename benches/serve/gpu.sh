#!/usr/bin/env bash
# `cxxlm serve` on the GPU against transformers `generate` (bf16, same GPU) serving the same
# model exported with `cxxlm export hf`, the same ~2,000-token FIM prompts, in one call:
# time to first token (p50, p99; client-side, so HTTP included), tokens/s at 1 and 32
# concurrent clients, and `cxxlm sample --benchmark-batch` decode speed at batch 1 and 64.
#
# Prepare here:  benches/train/prepare.sh && benches/serve/prepare.sh   (fills gpu/)
# Run there:     benches/serve/gpu.sh [DEPTH] [STEPS]    (default d20, 60 training steps)
# Results land in $OUT (or gpu-out/): serve.txt, parity.json, server.log.
set -euo pipefail
depth=${1:-20}
steps=${2:-60}
out=${OUT:-gpu-out}
work=/tmp/cxxlm-gpu
mkdir -p "$out" "$work"
source "$(dirname "$0")/../gpu-env.sh"
if [ ! -f "$work/pack/pack.json" ]; then
    "$work/cxxlm" pack --tokenizer gpu/tokenizer.json -i gpu/data -o "$work/pack" --val-fraction 0.005 >"$out/pack.log"
fi
run="$work/serve-d$depth"
if [ ! -f "$run/.done" ]; then
    rm -rf "$run"
    # A briefly trained model: speed does not depend on how well it is trained.
    "$work/cxxlm" train pretrain --pack "$work/pack" --out "$run" --set model.preset=d$depth \
        --set train.device_batch=16 --set train.total_batch_tokens=32768 --set train.steps=$steps \
        --set eval.every=0 --set checkpoint.every=0 >"$out/train-serve.log" 2>&1
    touch "$run/.done"
fi
"$work/cxxlm" export hf "$run" -o "$work/hf-d$depth" | tee -a "$out/serve.txt"
cp "$work/hf-d$depth/parity.json" "$out/parity.json"
for batch in 1 64; do
    "$work/cxxlm" sample --checkpoint "$run" --benchmark-batch $batch --benchmark-prompt 128 --max-tokens 256 2>&1 |
        grep -E "RESULT|same tokens" | tee -a "$out/serve.txt"
done
log="$out/server.log"
"$work/cxxlm" serve --checkpoint "$run" --port 0 --slots 64 --queue 256 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q ' at http://' "$log" && break; sleep 0.2; done
url=$(grep -o 'http://[0-9.:]*' "$log" | head -1)
python3 gpu/serve-bench.py gpu/serve-prompts.jsonl "$url" - cuda --ttft 40 | tee -a "$out/serve.txt"
kill $server; wait $server 2>/dev/null || true
trap - EXIT
python3 gpu/serve-bench.py gpu/serve-prompts.jsonl - "$work/hf-d$depth" cuda --ttft 40 | tee -a "$out/serve.txt"
python3 gpu/serve-bench.py ratios "$out/serve.txt" | tee -a "$out/serve.txt"
