#!/usr/bin/env bash
# Compile-rate checks per second: `cxxlm eval compile` (g++ -fsyntax-only against a
# precompiled <bits/stdc++.h>, in the sandbox) against plain g++ -fsyntax-only (same
# sandbox, no header cache) on the same programs, in the same run. The programs are the
# 398 MBPP-C++ prompts with a body that returns a value-initialized result (most compile;
# some do not, which exercises the failure classes), plus the unit tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench-out/eval
mkdir -p "$out"
cargo build --release -q -p cxxlm
python3 - evals/multipl-e_mbpp-cpp-keep.jsonl >"$out/completions.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    print(json.dumps({"name": json.loads(line)["name"], "completion": "    return {};\n}\n"}))
PY
target/release/cxxlm eval compile --completions "$out/completions.jsonl" --baseline --json "$out/compile.json"
