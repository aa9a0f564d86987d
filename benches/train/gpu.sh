#!/usr/bin/env bash
# Training on the GPU machine, side by side with the PyTorch reference of our architecture
# (`ref_gpt.py`, eager and torch.compile, same shapes, same call).
#
# Run from the repository root with gpu/ carried (see benches/train/prepare.sh):
#   benches/train/gpu.sh bench            # d12 B=32, d20 B=16 and B=32, T=2048: tok/s and memory
#                                         # against torch.compile, with AdamW (ref_gpt.py) and with
#                                         # Muon as ours (ref_muon.py; REF_MUON=0 leaves it out)
#                                         # (explicit pass with fused kernels,
#                                         # and autograd with CXXLM_FUSED=0; BENCH_VARIANTS
#                                         # picks among fused, fused-adamw, autograd, and
#                                         # fused-phases: fused with the step's phases timed,
#                                         # build-NAME: fused with the build carried as
#                                         # gpu/cxxlm-NAME.tar.xz, a baseline in the same call;
#                                         # BENCH_SHAPES="12 32,20 16" picks shapes, a
#                                         # third field the row length: "12 8 8192";
#                                         # OURS_STEPS, REF_STEPS the steps timed)
#   benches/train/gpu.sh 3b               # the seeds' 3B at T=8192: memory plan, tok/s and MFU
#                                         # by device batch and checkpointing, against
#                                         # torch.compile (ref_3b.py), and a profile
#   benches/train/gpu.sh kernels          # each fused kernel against its definition, then the
#                                         # explicit pass against autograd: speed, memory, phases
#   benches/train/gpu.sh agree [STEPS]    # d12 loss curves, fused against autograd, same start
#   benches/train/gpu.sh sharding [STEPS] # d12 with full sharding's side stream against the
#                                         # default on one GPU: loss agreement, tok/s, memory
#   benches/train/gpu.sh ours D B STEPS [--set ...]  # one run of ours, summarized
#   benches/train/gpu.sh train STEPS      # d12 on the packed corpus (B=32 x 2048 per step), eval + samples
#   benches/train/gpu.sh sample [STEPS]   # generation tok/s (CUDA graphs on and off) against HF
#   benches/train/gpu.sh eval STEPS       # train d12, then bpb, FIM, MBPP completions and
#                                         # generation speed against HF transformers
# Results land in $OUT (or gpu-out/).
set -euo pipefail
out=${OUT:-gpu-out}
work=/tmp/cxxlm-gpu
mkdir -p "$out" "$work"
source "$(dirname "$0")/../gpu-env.sh"
if [ ! -f "$work/pack/pack.json" ]; then
    /usr/bin/time -f "pack: %e s, %M KB" "$work/cxxlm" pack --tokenizer gpu/tokenizer.json -i gpu/data -o "$work/pack" --val-fraction 0.005 | tee "$out/pack.log"
fi

runner=
seq=2048
ours() { # depth batch steps out extra... (rows of $seq tokens)
    local depth=$1 batch=$2 steps=$3 dir=$4
    shift 4
    $runner "${build:-$work/cxxlm}" train pretrain --pack "$work/pack" --out "$dir" \
        --set model.preset=d$depth --set model.seq_len=$seq --set train.device_batch=$batch \
        --set train.total_batch_tokens=$((batch * seq)) --set train.steps=$steps \
        --set eval.every=0 --set checkpoint.every=0 "$@"
}

# The binary of the build carried as gpu/cxxlm-NAME.tar.xz, unpacked once: a baseline run in
# the same call.
build_named() {
    [ -x "$work/build-$1/cxxlm-torch" ] || python3 -c "import sys,tarfile;tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
        "gpu/cxxlm-$1.tar.xz" "$work/build-$1"
    echo "$work/build-$1/cxxlm-torch"
}

summary() { # metrics.jsonl -> median tok/s, MFU, memory over steps after the first 5 (of a shorter run, the first)
    python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
rows = rows[min(5, len(rows) - 1):]
tok = statistics.median(r["tok_s"] for r in rows)
mfu = statistics.median(r["mfu"] for r in rows)
mem = max(r["gpu_memory_gib"] for r in rows)
alloc = max(r.get("gpu_peak_allocated_gib", 0) for r in rows)
reserved = max(r.get("gpu_peak_reserved_gib", 0) for r in rows)
fb = statistics.median(r["forward_backward_seconds"] for r in rows) * 1e3
step = statistics.median(r["step_seconds"] for r in rows) * 1e3
phases = {}
for r in rows:
    for name, ms in r.get("phase_ms", {}).items():
        phases.setdefault(name, []).append(ms)
phases = "".join(f" {name}_ms={statistics.median(v):.1f}" for name, v in phases.items())
print(f"RESULT impl=cxxlm tok_s={tok:.0f} mfu={mfu:.4f} gpu_used_gib={mem:.2f} peak_alloc_gib={alloc:.2f} peak_reserved_gib={reserved:.2f} "
      f"step_ms={step:.1f} fwd_bwd_ms={fb:.1f} opt_ms={step - fb:.1f} loss_last={rows[-1]['loss']:.4f}{phases}")
PY
}

case ${1:-bench} in
bench)
    IFS=, read -ra shapes <<<"${BENCH_SHAPES:-12 32,20 16,20 32}"
    for shape in "${shapes[@]}"; do
        set -- $shape
        seq=${3:-2048}
        python3 gpu/ref_gpt.py train --depth "$1" --batch "$2" --seq "$seq" --mode compile --steps "${REF_STEPS:-20}" 2>&1 | grep RESULT | tee -a "$out/bench.txt" || true
        [ "${REF_MUON:-1}" = 0 ] || python3 "$(dirname "$0")/ref_muon.py" --depth "$1" --batch "$2" --seq "$seq" --mode compile \
            --steps "${REF_STEPS:-20}" 2>&1 | grep RESULT | tee -a "$out/bench.txt" || true
        # fused-adamw: AdamW on every weight, as the reference does (Muon's Newton-Schulz
        # is work the reference does not do).
        for backward in ${BENCH_VARIANTS:-fused fused-adamw autograd}; do
            # Autograd at d20 B=32 needs more than 80 GB.
            [ "$backward $1 $2" = "autograd 20 32" ] && continue
            dir="$work/bench-d$1-b$2-t$seq-$backward"
            rm -rf "$dir"
            variant=()
            [ $backward = fused-adamw ] && variant=(--set optim.matrices=adamw --set optim.matrix_lr=0.0003)
            [ $backward = fused-phases ] && variant=(--set log.phases=true)
            build=
            [[ $backward = build-* ]] && build=$(build_named "${backward#build-}")
            CXXLM_FUSED=$([ $backward = autograd ] && echo 0 || echo 1) \
                ours "$1" "$2" "${OURS_STEPS:-25}" "$dir" --log-every 5 "${variant[@]}" >"$out/ours-d$1-b$2-t$seq-$backward.log" 2>&1 || { tail -20 "$out/ours-d$1-b$2-t$seq-$backward.log"; continue; }
            echo "d$1 B=$2 T=$seq $backward: $(summary "$dir/metrics.jsonl")" | tee -a "$out/bench.txt"
            cp "$dir/metrics.jsonl" "$out/metrics-d$1-b$2-t$seq-$backward.jsonl"
        done
    done
    ;;
ours)
    # One run of ours: benches/train/gpu.sh ours DEPTH BATCH STEPS [--set KEY=VALUE ...]
    shift
    depth=$1 batch=$2 steps=$3
    shift 3
    rm -rf "$work/ours"
    ours "$depth" "$batch" "$steps" "$work/ours" --log-every 5 "$@" >"$out/ours.log" 2>&1 || { tail -20 "$out/ours.log"; exit 1; }
    echo "d$depth B=$batch $*: $(summary "$work/ours/metrics.jsonl")" | tee -a "$out/ours.txt"
    ;;
3b)
    # The seeds' 3B (SwiGLU, 8 key/value heads) at T=8192 with Muon, for each device batch
    # and activation checkpointing (every k-th layer, 0: none) of THREE_B ("B:k ..."): the
    # memory plan (`--check`), then OURS_STEPS (12) steps of TOKENS_3B tokens (default one
    # pass; the seeds' 262144 a GPU is 32 rows accumulated), the plan against the measured
    # peak (each run's 18 GiB checkpoint is deleted); torch.compile on the same shape
    # (benches/train/ref_3b.py, AdamW) for each REF_3B ("B:checkpoint ..."); last, unless
    # PROFILE_3B=0, where the explicit pass's time goes at B=1. BUILD_3B=NAME runs ours with
    # the build carried as gpu/cxxlm-NAME.tar.xz.
    x=$work/cxxlm
    [ -z "${BUILD_3B:-}" ] || x=$(build_named "$BUILD_3B")
    for cfg in ${THREE_B:-2:0 4:2 4:1 8:1}; do
        IFS=: read -r batch every <<<"$cfg"
        tokens=${TOKENS_3B:-$((batch * 8192))}
        run=3b-b$batch-k$every${BUILD_3B:+-$BUILD_3B}
        dir="$work/$run"
        rm -rf "$dir"
        args=(--pack "$work/pack" --out "$dir" --set model.preset=3b --set train.device_batch="$batch"
            --set train.total_batch_tokens="$tokens" --set train.activation_checkpointing="$every"
            --set train.steps="${OURS_STEPS:-12}" --set eval.every=0 --set checkpoint.every=0 --log-every 1)
        "$x" train pretrain "${args[@]}" --check >"$out/plan-$run.txt" 2>&1 || true
        "$x" train pretrain "${args[@]}" >"$out/ours-$run.log" 2>&1 || { tail -5 "$out/ours-$run.log"; continue; }
        planned=$(grep -o 'total *[0-9.]* GiB' "$out/plan-$run.txt" | head -1 | grep -o '[0-9.]*')
        echo "3b${BUILD_3B:+ ($BUILD_3B)} B=$batch T=8192 checkpoint every $every, $tokens tokens a step, planned ${planned} GiB: $(summary "$dir/metrics.jsonl")" | tee -a "$out/3b.txt"
        cp "$dir/metrics.jsonl" "$out/metrics-$run.jsonl"
        rm -rf "$dir"
    done
    for cfg in ${REF_3B:-1:0 2:1}; do
        IFS=: read -r batch ckpt <<<"$cfg"
        python3 "$(dirname "$0")/ref_3b.py" --batch "$batch" --seq 8192 --mode compile --steps "${REF_STEPS:-8}" \
            $([ "$ckpt" = 1 ] && echo --checkpoint) 2>&1 | grep RESULT | tail -1 | tee -a "$out/3b.txt" || true
    done
    [ "${PROFILE_3B:-1}" = 0 ] || "$work/cxxlm" train profile --preset 3b --batch 1 --steps 5 | tee "$out/profile-3b.md"
    ;;
kernels)
    "$work/cxxlm" train check-kernels | tee "$out/check-kernels.md"
    "$work/cxxlm" train profile --preset d12 --batch 32 | tee "$out/profile-d12.md"
    "$work/cxxlm" train profile --preset d20 --batch 16 | tee "$out/profile-d20.md"
    ;;
agree)
    # The same initialization and batches: the explicit pass with fused kernels against
    # autograd, and, for the size of bf16 noise, autograd over 2 micro-batches of 16.
    steps=${2:-200}
    for run in fused:1:32 autograd:0:32 autograd-2x16:0:16; do
        IFS=: read -r name fused batch <<<"$run"
        rm -rf "$work/agree-$name"
        CXXLM_FUSED=$fused ours 12 "$batch" "$steps" "$work/agree-$name" --set train.total_batch_tokens=65536 \
            --log-every 50 >"$out/agree-$name.log" 2>&1 || { tail -20 "$out/agree-$name.log"; exit 1; }
        cp "$work/agree-$name/metrics.jsonl" "$out/metrics-agree-$name.jsonl"
    done
    python3 - "$out" <<'PY' | tee "$out/agree.txt"
import json, statistics, sys
out = sys.argv[1]
def losses(name):
    return [json.loads(l)["loss"] for l in open(f"{out}/metrics-agree-{name}.jsonl") if '"loss"' in l]
fused, auto, noise = losses("fused"), losses("autograd"), losses("autograd-2x16")
for label, other in (("fused vs autograd", fused), ("autograd 2x16 vs autograd (bf16 noise)", noise)):
    d = [abs(a - b) for a, b in zip(other, auto)]
    print(f"{label}: {len(d)} steps, max |diff| {max(d):.4f}, mean {statistics.mean(d):.4f}, "
          f"final {other[-1]:.4f} vs {auto[-1]:.4f}")
PY
    ;;
sharding)
    # Full sharding's side stream on one GPU: the same initialization and batches with
    # the weights gathered per part on a side stream (one rank: the gathers copy) against
    # the default; the losses must agree to bf16 noise, and the tok/s shows the cost.
    steps=${2:-100}
    for mode in optimizer full; do
        rm -rf "$work/sharding-$mode"
        ours 12 32 "$steps" "$work/sharding-$mode" --set train.sharding=$mode --log-every 25 \
            >"$out/sharding-$mode.log" 2>&1 || { tail -20 "$out/sharding-$mode.log"; exit 1; }
        cp "$work/sharding-$mode/metrics.jsonl" "$out/metrics-sharding-$mode.jsonl"
    done
    python3 - "$out" <<'PY' | tee "$out/sharding.txt"
import json, statistics, sys
out = sys.argv[1]
def rows(mode):
    return [json.loads(l) for l in open(f"{out}/metrics-sharding-{mode}.jsonl") if '"loss"' in l]
a, b = rows("optimizer"), rows("full")
d = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
print(f"full vs optimizer sharding, one GPU: {len(d)} steps, max |loss diff| {max(d):.4f}, "
      f"mean {statistics.mean(d):.4f}, final {b[-1]['loss']:.4f} vs {a[-1]['loss']:.4f}")
for name, r in (("optimizer", a), ("full", b)):
    r = r[5:]
    peak = lambda k: max(x.get(k, 0) for x in r)
    print(f"RESULT {name}: {statistics.median(x['tok_s'] for x in r):.0f} tok/s, "
          f"device {peak('gpu_memory_gib'):.1f} GiB, allocator's peak {peak('gpu_peak_allocated_gib'):.2f} "
          f"GiB handed out, {peak('gpu_peak_reserved_gib'):.2f} GiB held")
PY
    ;;
train)
    steps=${2:-1800}
    rm -rf "$work/d12"
    # SIGTERM (the timeout) makes the trainer checkpoint and stop cleanly.
    runner="timeout ${TRAIN_SECONDS:-540}"
    ours 12 32 "$steps" "$work/d12" \
        --set eval.every=300 --set eval.tokens=2097152 --set eval.samples=4 --set eval.sample_tokens=64 \
        --set checkpoint.every=1000 --log-every 50 2>&1 | tee "$out/train.log" || true
    cp "$work/d12/metrics.jsonl" "$work/d12/samples.jsonl" "$work/d12/config.toml" "$out/"
    ;;
sample)
    # Generation speed only: a briefly trained d12 (the weights do not change the speed).
    steps=${2:-20}
    rm -rf "$work/d12"
    ours 12 32 "$steps" "$work/d12" --log-every 10 >"$out/train.log" 2>&1 || { tail -20 "$out/train.log"; exit 1; }
    for b in 1 64; do
        "$work/cxxlm" sample --checkpoint "$work/d12" --benchmark-batch $b --benchmark-prompt 128 --max-tokens 256 | tee -a "$out/sample.txt"
        python3 benches/sample/hf_generate.py 12 768 6 6 32768 $b 128 256 2>&1 | grep RESULT | tee -a "$out/sample.txt"
    done
    ;;
eval)
    steps=${2:-600}
    rm -rf "$work/d12"
    runner="timeout ${TRAIN_SECONDS:-240}"
    ours 12 32 "$steps" "$work/d12" --log-every 100 2>&1 | tee "$out/train.log" || true
    runner=
    cp "$work/d12/metrics.jsonl" "$out/"
    x="$work/cxxlm"
    for b in 1 64; do
        $x sample --checkpoint "$work/d12" --benchmark-batch $b --benchmark-prompt 128 --max-tokens 256 | tee -a "$out/eval.txt"
        python3 benches/sample/hf_generate.py 12 768 6 6 32768 $b 128 256 2>&1 | grep RESULT | tee -a "$out/eval.txt"
    done
    $x eval bpb --checkpoint "$work/d12" --pack "$work/pack" --json "$out/bpb.json" | tee -a "$out/eval.txt"
    $x eval fim --checkpoint "$work/d12" --pack "$work/pack" --documents 100 --json "$out/fim.json" | tee -a "$out/eval.txt"
    # The sandbox may be unavailable here: the completions are scored where it is.
    timeout "${MBPP_SECONDS:-150}" $x eval mbpp --checkpoint "$work/d12" --limit "${MBPP_LIMIT:-100}" --max-tokens 128 \
        --completions-out "$out/mbpp-completions.jsonl" --json "$out/mbpp.json" 2>&1 | tee -a "$out/eval.txt" || true
    ;;
esac
