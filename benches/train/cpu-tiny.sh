#!/usr/bin/env bash
# cpu-tiny's pretraining stage (150 s budget) on two cores, several variants side by side on
# separate core pairs of one many-core machine: the CPU's own instructions, and an
# AVX2-only CPU without bf16 arithmetic (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2),
# where bf16 matrix products are emulated. Prints per variant the batch chosen and why,
# the steps run and the final validation bits per byte.
#
# Needs gpu/ from benches/train/prepare.sh (binaries, tokenizer, shards; any tokenizer and
# shards work, e.g. those of a cpu-tiny speedrun). Run: benches/train/cpu-tiny.sh
# Results land in $OUT (or gpu-out/): cpu-tiny.txt and one log per variant.
set -euo pipefail
out=${OUT:-gpu-out}
work=/tmp/cxxlm-cpu-tiny
mkdir -p "$out" "$work"
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
[ -x "$work/cxxlm-torch" ] || python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall(sys.argv[2])" gpu/cxxlm.tar.xz "$work"
[ -f "$work/pack/pack.json" ] ||
    "$work/cxxlm" pack --tokenizer gpu/tokenizer.json -i gpu/data -o "$work/pack" --val-fraction 0.02 >"$out/pack-tiny.log"
# The cpu-tiny preset's [pretrain] section (crates/cxxlm/presets/cpu-tiny.toml).
tiny=(--set model.preset=\"tiny\" --set model.depth=4 --set model.width=256 --set model.heads=4
    --set model.kv_heads=4 --set model.seq_len=256 --set train.device=\"cpu\" --set train.device_batch=16
    --set train.total_batch_tokens=4096 --set train.steps=2000 --set train.time_budget=150
    --set eval.every=100 --set eval.tokens=65536 --set eval.samples=0 --set checkpoint.every=50)
avx2=(env OMP_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
variant() { # NAME CORES PREFIX... -- SETTINGS...
    local name=$1 cores=$2
    shift 2
    local prefix=()
    while [ "$1" != -- ]; do prefix+=("$1"); shift; done
    shift
    rm -rf "$work/$name"
    taskset -c "$cores" "${prefix[@]}" "$work/cxxlm" train pretrain --pack "$work/pack" --out "$work/$name" \
        "${tiny[@]}" "$@" >"$out/$name.log" 2>&1 || echo "$name failed" >>"$out/$name.log"
}
variant avx2-muon-fit 0,1 "${avx2[@]}" -- --set train.min_steps=300 &
variant avx2-muon 2,3 "${avx2[@]}" -- --set train.min_steps=0 &
variant avx2-adamw-fit 4,5 "${avx2[@]}" -- --set train.min_steps=300 --set optim.matrices=\"adamw\" --set optim.matrix_lr=0.002 &
variant avx2-adamw-fit-4e-3 10,11 "${avx2[@]}" -- --set train.min_steps=300 --set optim.matrices=\"adamw\" --set optim.matrix_lr=0.004 &
variant native-muon-fit 6,7 env OMP_NUM_THREADS=2 -- --set train.min_steps=300 &
variant native-muon 8,9 env OMP_NUM_THREADS=2 -- --set train.min_steps=0 &
wait
for name in avx2-muon-fit avx2-muon avx2-adamw-fit avx2-adamw-fit-4e-3 native-muon-fit native-muon; do
    log="$out/$name.log"
    echo "== $name"
    grep -m1 '^model:' "$log" | sed 's/.*backward: autograd//'
    grep 'time budget' "$log" | tail -1
    grep 'validation' "$log" | tail -1
    tail -1 "$log"
done | tee "$out/cpu-tiny.txt"
