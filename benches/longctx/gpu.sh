#!/usr/bin/env bash
# Long context on the GPU machine: d12 trained at 2k, continued to 8k on repository-level
# examples with and without YaRN, bits per byte by position before and after, and
# repository-level against file-level fill-in-the-middle.
#
# Run from the repository root with gpu/ carried (benches/tok/judged-prepare.sh fills it: the
# binaries, a tokenizer, Debian shards whose documents record their archive and path, and in
# gpu/held-out shards of other projects; HELD_OUT names another directory of those).
# Each stage keeps its outputs in /tmp/cxxlm-longctx and skips what is done, so the stages
# can be spread over several calls of at most 10 minutes:
#   benches/longctx/gpu.sh pack       # file-level pack, and repository-level examples of 8k
#   benches/longctx/gpu.sh base       # d12 at 2k, document masking (BASE_STEPS, 400)
#   benches/longctx/gpu.sh extend     # base continued at 8k (EXTEND_STEPS, 100): repository
#                                     # examples with YaRN (s = 4) and without, and file-level
#                                     # documents with YaRN
#   benches/longctx/gpu.sh eval       # bpb by position at 8k on held-out repositories,
#                                     # FIM bpb and exact match, retrieval by distance,
#                                     # each model
#   benches/longctx/gpu.sh all        # the four in order
# EVAL_TOKENS (4,194,304) sets the tokens each bits-per-byte evaluation reads, FIM_DOCUMENTS
# (100; 0 leaves it out) the held-out documents whose spans each model fills.
# Results land in $OUT (or gpu-out/): *.json, longctx.txt.
set -euo pipefail
out=${OUT:-gpu-out}
work=/tmp/cxxlm-longctx
mkdir -p "$out" "$work"
source "$(dirname "$0")/../gpu-env.sh"
x="$work/cxxlm"
long=8192

pack() {
    # Trained on gpu/data, scored on other projects (HELD_OUT, shards of repositories that
    # gpu/data lacks), packed whole both ways.
    local held=${HELD_OUT:-gpu/held-out}
    [ -f "$work/pack-file/pack.json" ] ||
        $x pack --tokenizer gpu/tokenizer.json -i gpu/data -o "$work/pack-file" --val-fraction 0.002 | tee "$out/pack-file.log"
    [ -f "$work/pack-repo/pack.json" ] ||
        $x pack --tokenizer gpu/tokenizer.json -i gpu/data -o "$work/pack-repo" --val-fraction 0.002 \
            --repo-context $long --repo-file-share 0.3 | tee "$out/pack-repo.log"
    [ -f "$work/held-file/pack.json" ] ||
        $x pack --tokenizer gpu/tokenizer.json -i "$held" -o "$work/held-file" --val-fraction 1 | tee "$out/held-file.log"
    [ -f "$work/held-repo/pack.json" ] ||
        $x pack --tokenizer gpu/tokenizer.json -i "$held" -o "$work/held-repo" --val-fraction 1 \
            --repo-context $long --repo-file-share 0.3 | tee "$out/held-repo.log"
    $x pack inspect "$work/held-repo" --sample-chars 300 >"$out/held-repo-inspect.txt"
}

train() { # out pack steps extra...: SIGTERM (the timeout) checkpoints; a rerun resumes
    local dir=$1 pack=$2 steps=$3
    shift 3
    [ -d "$dir/checkpoints/step-$(printf %06d "$steps")" ] && return 0
    local resume=()
    [ -d "$dir/checkpoints" ] && resume=(--resume)
    timeout "${TRAIN_SECONDS:-540}" $x train pretrain --pack "$pack" --out "$dir" --set model.preset=d12 \
        --set train.total_batch_tokens=524288 --set train.steps="$steps" --set data.document_mask=true \
        --set eval.every=0 --set checkpoint.every=50 --log-every 25 "${resume[@]}" "$@" >>"$dir.log" 2>&1 || true
    tail -3 "$dir.log"
}

base() {
    train "$work/base" "$work/pack-file" "${BASE_STEPS:-400}" --set train.device_batch=32
}

extend() { # name pack extra...
    local name=$1 pack=$2
    shift 2
    train "$work/$name" "$pack" "${EXTEND_STEPS:-100}" --init "$work/base" --set model.seq_len=$long \
        --set train.device_batch=8 --set schedule.warmup_frac=0.05 "$@"
}

yarn=(--set model.rope_scaling.factor=4 --set model.rope_scaling.original_seq_len=2048)

evaluate() { # name checkpoint extra...
    local name=$1 run=$2
    shift 2
    [ -f "$out/bpb-$name.json" ] ||
        $x eval bpb --checkpoint "$run" --pack "$work/held-repo" --document-mask --tokens "${EVAL_TOKENS:-4194304}" --batch 4 \
            --json "$out/bpb-$name.json" "$@" | tee -a "$out/longctx.txt"
    [ -f "$out/bpb-fim-repo-$name.json" ] ||
        $x eval bpb --checkpoint "$run" --pack "$work/held-repo" --split val_fim --document-mask --tokens "${EVAL_TOKENS:-4194304}" \
            --batch 4 --json "$out/bpb-fim-repo-$name.json" "$@" | tee -a "$out/longctx.txt"
    [ -f "$out/bpb-fim-file-$name.json" ] ||
        $x eval bpb --checkpoint "$run" --pack "$work/held-file" --split val_fim --document-mask --tokens "${EVAL_TOKENS:-4194304}" \
            --batch 4 --json "$out/bpb-fim-file-$name.json" "$@" | tee -a "$out/longctx.txt"
    [ -f "$out/retrieval-$name.json" ] ||
        $x eval retrieval --checkpoint "$run" --pack "$work/held-file" --distances 256,1024,4096,7168 \
            --json "$out/retrieval-$name.json" | tee -a "$out/longctx.txt"
    [ "${FIM_DOCUMENTS:-100}" = 0 ] || [ -f "$out/fim-$name.json" ] ||
        $x eval fim --checkpoint "$run" --pack "$work/held-file" --documents "${FIM_DOCUMENTS:-100}" --json "$out/fim-$name.json" | tee -a "$out/longctx.txt"
}

extend_all() {
    extend repo-yarn "$work/pack-repo" "${yarn[@]}"
    extend repo-plain "$work/pack-repo"
    extend file-yarn "$work/pack-file" "${yarn[@]}"
}

evaluate_all() {
    # "Before": the 2k model read at 8k (its rotary beyond 2k untrained).
    evaluate base "$work/base" --seq-len $long
    for name in repo-yarn repo-plain file-yarn; do evaluate "$name" "$work/$name"; done
    python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, os, sys
out = sys.argv[1]
for name in ["base", "repo-yarn", "repo-plain", "file-yarn"]:
    def bpb(kind):
        path = f"{out}/{kind}-{name}.json"
        return json.load(open(path)) if os.path.exists(path) else None
    plain = bpb("bpb")
    if plain is None:
        continue
    buckets = "  ".join(f"{b['from']}-{b['to']}: {b['bits_per_byte']:.4f}" for b in plain["by_position"])
    repo, file, fim = bpb("bpb-fim-repo"), bpb("bpb-fim-file"), bpb("fim")
    print(f"{name:<10} held-out repositories {plain['bits_per_byte']:.4f} bpb ({buckets}); "
          f"FIM bpb repository-level {repo['bits_per_byte']:.4f}, file-level {file['bits_per_byte']:.4f}; "
          "FIM exact " + (", ".join(f"{k} {v['exact_rate']:.3f}" for k, v in fim["spans"].items()) if fim else "-"))
    retrieval = bpb("retrieval")
    if retrieval:
        print("  retrieval, body written back: " + ", ".join(
            f"{r['distance'] if r['distance'] is not None else 'without'}: {r['copied']}/{r['asked']}"
            for r in retrieval["rows"]))
PY
}

case ${1:-all} in
pack) pack ;;
base) base ;;
extend) extend_all ;;
eval) evaluate_all ;;
all)
    pack
    base
    extend_all
    evaluate_all
    ;;
esac
