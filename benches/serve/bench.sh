#!/usr/bin/env bash
# `cxxlm serve` on the CPU against transformers `generate` serving the exported model, the
# same ~2,000-token FIM prompts from libstdc++ in the same run: time to first token (p50,
# p99) and tokens/s at 1 and 32 concurrent clients. The model is cpu-tiny's shape (4
# layers of 256) with a 2,048-token context, trained briefly on /usr/include here (speed
# does not depend on how well it is trained).
#
# Usage: benches/serve/bench.sh [OUT_DIR]     (default bench-out/serve; STEPS=N training steps, 20)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench-out/serve}
mkdir -p "$out"
cargo build --release -q -p cxxlm
bin=target/release/cxxlm
if [ ! -f "$out/run/checkpoints/.done" ]; then
    rm -rf "$out/data" "$out/pack" "$out/run"
    "$bin" data run -i /usr/include/c++ -o "$out/data" >/dev/null
    "$bin" tok train -i "$out/data" --vocab 8192 -o "$out/tokenizer.json" >/dev/null
    "$bin" pack --tokenizer "$out/tokenizer.json" -i "$out/data" -o "$out/pack" >/dev/null
    "$bin" train pretrain --pack "$out/pack" --out "$out/run" --set model.preset=tiny \
        --set model.depth=4 --set model.width=256 --set model.heads=4 --set model.kv_heads=4 \
        --set model.seq_len=2048 --set train.device=cpu --set train.device_batch=2 \
        --set train.total_batch_tokens=4096 --set train.steps=${STEPS:-20} --set eval.every=0 >/dev/null
    touch "$out/run/checkpoints/.done"
fi
"$bin" export hf "$out/run" -o "$out/hf"
files=$(find /usr/include/c++ -name '*.h' -size +60k | sort | head -20)
python3 benches/serve/bench.py prompts "$out/tokenizer.json" $files >"$out/prompts.jsonl"
echo "$(wc -l <"$out/prompts.jsonl") FIM prompts of about 2,000 tokens"
log="$out/server.log"
"$bin" serve --checkpoint "$out/run" --port 0 --slots 32 --queue 256 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q ' at http://' "$log" && break; sleep 0.2; done
url=$(grep -o 'http://[0-9.:]*' "$log" | head -1)
python3 benches/serve/bench.py "$out/prompts.jsonl" "$url" - cpu | tee "$out/results.txt"
kill $server; wait $server 2>/dev/null || true
trap - EXIT
# transformers after the server has stopped, on the same cores.
python3 benches/serve/bench.py "$out/prompts.jsonl" - "$out/hf" cpu | tee -a "$out/results.txt"
python3 benches/serve/bench.py ratios "$out/results.txt" | tee -a "$out/results.txt"
