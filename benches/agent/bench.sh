#!/usr/bin/env bash
# Latencies of `cxxlm agent`'s tools: on LLVM's Support and ADT libraries (the index
# bench's subset, ~500 files, with a compile_commands.json naming llvm/include) and on
# a small generated repository whose file includes <bits/stdc++.h>; the edit guard
# (g++ -fsyntax-only in the sandbox) against the same g++ run directly there (LLVM's
# files stop at their first generated header, missing from the sources).
#
# Usage: benches/agent/bench.sh   (after benches/index/bench.sh has made bench-out/index/llvm-support)
set -euo pipefail
cd "$(dirname "$0")/../.."
subset=bench-out/index/llvm-support
[ -d "$subset" ] || { echo "run benches/index/bench.sh first (it makes $subset)" >&2; exit 1; }
root=$(cd "$subset" && pwd)
cat > "$subset/compile_commands.json" <<JSON
[{"directory": "$root", "file": "llvm/lib/Support/StringRef.cpp",
  "arguments": ["g++", "-std=c++17", "-Illvm/include", "-c", "llvm/lib/Support/StringRef.cpp"]}]
JSON
profile=${PROFILE:-release}
cargo build --profile "$profile" -p cxxlm-agent --example tool_latency
bin=target/$([ "$profile" = dev ] && echo debug || echo "$profile")/examples/tool_latency
echo "== LLVM Support + ADT"
$bin "$subset" llvm/lib/Support/StringRef.cpp 377 getAsInteger
small=bench-out/agent/small
rm -rf "$small" && mkdir -p "$small/src"
printf '#pragma once\n#include <vector>\n\ndouble mean(const std::vector<int>& values);\n' > "$small/src/stats.h"
printf '#include "stats.h"\n#include <bits/stdc++.h>\n\ndouble mean(const std::vector<int>& values) {\n    long total = 0;\n    for (int v : values) total += v;\n    return double(total) / values.size();\n}\n' > "$small/src/stats.cpp"
echo "== a small repository (one file including <bits/stdc++.h>)"
$bin "$small" src/stats.cpp 6 mean
