#!/usr/bin/env bash
# `cxxlm index` on LLVM from the Debian sources: the build on 2 cores (time, memory,
# files, definitions), a refresh after one saved file, query latency; then against
# aider's repository map (RepoMap) on the same part of LLVM in the same run.
#
# Usage: benches/index/bench.sh [TARBALL]
# Default: corpus/debian's LLVM source tarball, fetched by scripts/corpus/debian-cpp.sh.
# aider scans about 5 files a second on one of these cores (the whole tree's ~46,000
# files would take hours), so the comparison runs on LLVM's Support and ADT libraries
# (llvm/lib/Support, llvm/include/llvm/{Support,ADT}: ~500 files).
set -euo pipefail
cd "$(dirname "$0")/../.."
tarball=${1:-corpus/debian/llvm-toolchain-15_15.0.6.orig.tar.xz}
[ -e "$tarball" ] || [ -d bench-out/index/llvm-toolchain-15_15.0.6 ] || scripts/corpus/debian-cpp.sh corpus/debian llvm-toolchain-15 >/dev/null
out=bench-out/index
venv=bench-out/aider-venv
tree=$out/llvm-toolchain-15_15.0.6
subset=$out/llvm-support
cursor_file=llvm/lib/Support/StringRef.cpp
cursor_line=377 # `if (substr(i, N).equals(Str)) {` in StringRef::count

mkdir -p "$out"
if [ ! -d "$tree" ]; then
    tar -xJf "$tarball" -C "$out"
fi
if [ ! -d "$subset" ]; then
    mkdir -p "$subset/llvm/lib" "$subset/llvm/include/llvm"
    cp -r "$tree/llvm/lib/Support" "$subset/llvm/lib/"
    cp -r "$tree/llvm/include/llvm/Support" "$tree/llvm/include/llvm/ADT" "$subset/llvm/include/llvm/"
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q aider-chat
fi
cargo build --release -q -p cxxlm --bin cxxlm
cxxlm=target/release/cxxlm

build() { # NAME TREE
    rm -rf "$out/$1.idx"
    nice -n 10 /usr/bin/time -v -o "$out/$1.time" \
        $cxxlm index build "$2" -o "$out/$1.idx" --threads 2 --json >"$out/$1.build.json"
}
query() { # NAME TREE: the best of 5 end-to-end queries (load, graph, rank)
    for _ in 1 2 3 4 5; do
        $cxxlm index query "$out/$1.idx" --file "$2/$cursor_file" --line $cursor_line --top 10 --json
    done >"$out/$1.query.jsonl"
}

build llvm "$tree"
query llvm "$tree"
nice -n 10 python3 benches/index/refresh.py $cxxlm "$tree" "$out/llvm.idx" $cursor_file 5 "$out/llvm.refresh.json" >/dev/null

build support "$subset"
query support "$subset"
nice -n 10 python3 benches/index/refresh.py $cxxlm "$subset" "$out/support.idx" $cursor_file 5 "$out/support.refresh.json" >/dev/null
rm -rf "$subset/.aider.tags.cache.v4"
LITELLM_LOCAL_MODEL_COST_MAP=True nice -n 10 "$venv/bin/python" benches/index/aider_repomap.py \
    "$subset" $cursor_file substr,equals "$out/aider.json" >"$out/aider.log" 2>&1

python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
def time_of(name):
    t = open(f"{out}/{name}.time").read()
    wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split("\n")[0]
    s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([0-9.]+)", t).group(1)) for k in ["User", "System"])
    return s, rss, cpu
def queries(name):
    q = [json.loads(l) for l in open(f"{out}/{name}.query.jsonl")]
    return min(q, key=lambda x: x["timing"]["total_ms"])
for name in ["llvm", "support"]:
    b = json.load(open(f"{out}/{name}.build.json"))
    s, rss, cpu = time_of(name)
    q = queries(name)
    r = json.load(open(f"{out}/{name}.refresh.json"))
    t = q["timing"]
    print(f"{name}: {b['files']} files, {b['definitions']} definitions, {b['names']} names, "
          f"skipped {b['skipped']}; build {s:.1f} s on 2 threads ({cpu:.1f} s of CPU), max RSS {rss:.0f} MB")
    print(f"  query (best of 5, end to end): {t['total_ms']:.0f} ms = load {t['load_ms']:.0f} "
          f"+ graph {t['graph_ms']:.0f} + rank {t['rank_ms']:.1f} ({t['edges_visited']} edges); "
          f"top: {[d['name'] for d in q['definitions'][:5]]}")
    print(f"  refresh after one saved file: median {r['refresh_ms_median']:.2f} ms, max "
          f"{r['refresh_ms_max']:.2f} ms (save to report {r['save_to_report_ms_median']:.1f} ms); "
          f"watcher ready in {r['watch_ready_s']:.1f} s")
a = json.load(open(f"{out}/aider.json"))
s, _, _ = time_of("support")
q = queries("support")["timing"]
r = json.load(open(f"{out}/support.refresh.json"))
print(f"aider RepoMap on the same {a['files']} files: scan {a['scan_s']:.1f} s, query "
      f"{a['query_s']*1e3:.0f} ms, save + query {a['refresh_and_query_s']*1e3:.0f} ms, max RSS "
      f"{a['max_rss_mb']:.0f} MB")
print(f"ratio (aider / cxxlm): build {a['scan_s']/s:.1f}x, query {a['query_s']*1e3/q['total_ms']:.1f}x, "
      f"save + query {a['refresh_and_query_s']*1e3/(r['refresh_ms_median'] + q['rank_ms'] + q['graph_ms']):.1f}x")
PY
