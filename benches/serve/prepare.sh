#!/usr/bin/env bash
# Adds to gpu/ (after benches/train/prepare.sh, whose binaries and tokenizer it uses) the
# FIM prompts of benches/serve/gpu.sh: about 2,000 tokens each, cut from libstdc++'s
# largest headers with gpu/tokenizer.json.
#
# Usage: benches/serve/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f gpu/tokenizer.json ] || { echo "run benches/train/prepare.sh first" >&2; exit 1; }
files=$(find /usr/include/c++ -name '*.h' -size +60k | sort | head -24)
python3 benches/serve/bench.py prompts gpu/tokenizer.json $files >gpu/serve-prompts.jsonl
cp benches/serve/bench.py gpu/serve-bench.py
echo "$(wc -l <gpu/serve-prompts.jsonl) prompts in gpu/serve-prompts.jsonl"
