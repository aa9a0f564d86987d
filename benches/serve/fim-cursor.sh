#!/usr/bin/env bash
# FIM at an editor's cursor, on this machine's CPU: a tiny model trained on whole-line FIM
# middles (`pack --fim-line-aligned`, as every speedrun packs) over a corpus of regular C++
# (benches/serve/fim_cursor.py), served twice with the same weights: as it is (the server
# cuts the cursor's line at its start, as the model learned), and with its run pointing at
# a pack cut anywhere (the server cuts at the cursor, inside the line). The same
# llama.vim-shaped `/infill` requests to both: how often the completion's first line is the
# rest of the cursor's line exactly, and, with text left after the cursor on its line, how
# often the completion is exactly the text between.
#
# Usage: benches/serve/fim-cursor.sh [OUT_DIR]     (default bench-out/fim-cursor; STEPS, 1500)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench-out/fim-cursor}
mkdir -p "$out"
cargo build --release -q -p cxxlm
bin=$PWD/target/release/cxxlm
py=benches/serve/fim_cursor.py
if [ ! -f "$out/run/checkpoints/.done" ]; then
    rm -rf "$out/src" "$out/data" "$out/lines" "$out/anywhere" "$out/run"
    python3 "$py" corpus "$out/src" 600 1
    "$bin" data run -i "$out/src" -o "$out/data" >/dev/null
    "$bin" tok train -i "$out/data" --vocab 1024 -o "$out/tokenizer.json" >/dev/null
    for cut in lines anywhere; do
        flag=(); [ $cut = lines ] && flag=(--fim-line-aligned)
        "$bin" pack --tokenizer "$out/tokenizer.json" -i "$out/data" -o "$out/$cut" --fim-rate 0.9 \
            --val-fraction 0.1 "${flag[@]}" >/dev/null
    done
    "$bin" train pretrain --pack "$out/lines" --out "$out/run" --set model.preset=tiny \
        --set model.seq_len=512 --set train.device=cpu --set train.device_batch=8 \
        --set train.total_batch_tokens=4096 --set train.steps="${STEPS:-1500}" --set eval.every=0 \
        --log-every 500 | tail -1
    touch "$out/run/checkpoints/.done"
fi
rm -rf "$out/run-anywhere" && cp -r "$out/run" "$out/run-anywhere"
sed -i "s|^pack = .*|pack = \"$out/anywhere\"|" "$out/run-anywhere/config.toml"
for run in run run-anywhere; do
    log=$out/serve-$run.log
    "$bin" serve --checkpoint "$out/$run" --port 0 2>"$log" >/dev/null &
    pid=$!
    for _ in $(seq 100); do grep -q ' at http://' "$log" && break; sleep 0.2; done
    url=$(grep -o 'http://[0-9.:]*' "$log" | head -1)
    echo "$run ($(grep -c 'cut at the cursor line' "$log") line-start cut): $(python3 "$py" ask "$url" 80 2)"
    kill $pid
done
