#!/usr/bin/env bash
# The launcher with 1, 2, 4 and 8 ranks on the CPU (a dry run of multi-GPU training where
# no GPUs are): the tiny model on libstdc++'s headers, 20 steps of the same 8 x 128-token
# rows per step split among the ranks. Prints each run's time and its largest per-step
# loss difference from the one-rank run.
#
# Usage: benches/train/cpu-ranks.sh [OUT_DIR]   (default bench-out/cpu-ranks)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench-out/cpu-ranks}
cargo build --release -q -p cxxlm
x=$PWD/target/release/cxxlm
rm -rf "$out" && mkdir -p "$out/src"
cp /usr/include/c++/*/bits/*.h "$out/src/"
cd "$out"
$x data run -i src -o data >/dev/null 2>&1
$x tok train -i data --vocab 1024 -o tok.json >/dev/null 2>&1
$x pack --tokenizer tok.json -i data -o pack --val-fraction 0.1 >/dev/null 2>&1
for n in 1 2 4 8; do
    launch=()
    [ "$n" -gt 1 ] && launch=(launch --gpus "$n" --)
    start=$(date +%s.%N)
    "$x" "${launch[@]}" train pretrain --pack pack --out "run$n" --set model.preset=tiny \
        --set train.device=cpu --set train.device_batch=$((8 / n)) --set train.total_batch_tokens=1024 \
        --set train.steps=20 --set eval.every=10 --set eval.tokens=2048 --set eval.samples=0 >"log$n" 2>&1
    echo "$n $(python3 -c "import time; print(f'{time.time() - $start:.1f}')")" >>times
done
python3 - <<'PY'
import json
times = dict(l.split() for l in open("times"))
def losses(n):
    return [json.loads(l)["loss"] for l in open(f"run{n}/metrics.jsonl") if '"loss"' in l]
base = losses(1)
for n in ("1", "2", "4", "8"):
    d = max(abs(a - b) for a, b in zip(base, losses(n)))
    print(f"{n} ranks: {times[n]} s, final loss {losses(n)[-1]:.4f}, max |loss - one rank's| {d:.5f}")
PY
