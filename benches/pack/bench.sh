#!/usr/bin/env bash
# Packing throughput: `cxxlm pack` (read shards, tokenize, FIM, write .bin/.idx) against
# Python HF `tokenizers` `encode_batch` with the same tokenizer.json and tiktoken's
# cl100k_base encoding the same documents (encoding time only), in the same run.
#
# Usage: benches/pack/bench.sh [SHARDS] [TOKENIZER]
# Defaults: shards of `cxxlm data run` on /usr/include and the tokenizer trained on them
# by benches/tok/bench.sh (both made here if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench-out/pack
venv=bench-out/pack-venv
shards=${1:-bench-out/tok/usr-include-shards}
tokenizer=${2:-bench-out/tok/tokenizer.json}
mkdir -p "$out"
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install -q tokenizers tiktoken zstandard; }
cargo build --release -q -p cxxlm
[ -f "$shards/stats.json" ] || target/release/cxxlm data run -i /usr/include -o "$shards" >/dev/null
[ -f "$tokenizer" ] || target/release/cxxlm tok train -i "$shards" -o "$tokenizer" >/dev/null
cl100k=$(ls ~/.cargo/registry/src/*/tiktoken-rs-*/assets/cl100k_base.tiktoken | head -n 1)

rm -rf "$out/pack"
/usr/bin/time -v -o "$out/cxxlm.time" target/release/cxxlm pack --tokenizer "$tokenizer" -i "$shards" -o "$out/pack" >"$out/cxxlm.log"
"$venv/bin/python" benches/pack/py_encode.py "$shards" "$tokenizer" "$cl100k" >"$out/python.json"
"$venv/bin/python" - "$out" <<'PY'
import json, sys
sys.path.insert(0, "benches")
from common import gnu_time
out = sys.argv[1]
py = json.load(open(f"{out}/python.json"))
manifest = json.load(open(f"{out}/pack/pack.json"))
seconds, rss = gnu_time(f"{out}/cxxlm.time")
mb = py["bytes"] / 1e6
assert sum(manifest["splits"][s]["text_bytes"] for s in ("train", "val")) == py["bytes"]
print(f"{py['documents']} documents, {mb:.1f} MB of text, {py['threads']} threads")
ours = mb / seconds
print(f"cxxlm pack (read, tokenize, FIM, write): {seconds:.2f} s, {ours:.1f} MB/s, peak RSS {rss:.0f} MB")
for name in ("hf_tokenizers", "tiktoken_cl100k"):
    s = py[name]["seconds"]
    print(f"{name} (encode only): {s:.2f} s, {mb / s:.1f} MB/s, {py[name]['tokens']} tokens; cxxlm pack is {ours / (mb / s):.2f}x")
PY
