#!/usr/bin/env bash
# Decoding speed on the GPU machine: `cxxlm sample --benchmark-batch` (eager; CUDA graphs
# with the decoding attention kernel; CUDA graphs with attention through a mask over the
# whole cache) against HF transformers' `generate` (static cache) of the same shape, greedy,
# 256 new tokens: batch 1 and 64 with 128-token prompts (an editor's request, a server's
# batch), and batch 256 with 1,536-token prompts (an RL rollout batch: 32 bug-fix prompts
# x 8 samples).
#
#   benches/sample/gpu.sh CHECKPOINT     # a d12 run, e.g. the speedrun's train/
set -euo pipefail
out=${OUT:-gpu-out}
work=/tmp/cxxlm-gpu
mkdir -p "$out" "$work"
source "$(dirname "$0")/../gpu-env.sh"
checkpoint=$1
for shape in "1 128" "64 128" "256 1536"; do
    read -r batch prompt <<<"$shape"
    "$work/cxxlm" sample --checkpoint "$checkpoint" --benchmark-batch "$batch" --benchmark-prompt "$prompt" \
        --max-tokens 256 | tee -a "$out/sample.txt"
    python3 benches/sample/hf_generate.py 12 768 6 6 32768 "$batch" "$prompt" 256 2>&1 | grep RESULT | tee -a "$out/sample.txt"
done
