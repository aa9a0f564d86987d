#!/usr/bin/env bash
# Memory per document of the clusters stage, from two synthetic runs (1M and 3M small
# documents): the difference of peak RSS over the difference of document counts.
#
# Usage: benches/dedup/synthetic.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench-out/dedup-synthetic
venv=bench-out/datasketch-venv
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install -q zstandard; }
cargo build --release -q -p cxxlm
declare -A rss
for n in 1000000 3000000; do
    rm -rf "$out/$n"
    "$venv/bin/python" benches/dedup/synthetic.py "$out/$n/shards" "$n"
    target/release/cxxlm data dedup -i "$out/$n/shards" -o "$out/$n/dedup" --stage signatures >/dev/null 2>&1
    target/release/cxxlm data dedup -i "$out/$n/shards" -o "$out/$n/dedup" --stage buckets >/dev/null 2>&1
    /usr/bin/time -v -o "$out/$n/clusters.time" \
        target/release/cxxlm data dedup -i "$out/$n/shards" -o "$out/$n/dedup" --stage clusters >/dev/null 2>&1
    rss[$n]=$(grep 'Maximum resident' "$out/$n/clusters.time" | awk '{print $NF}')
    secs=$(grep 'Elapsed' "$out/$n/clusters.time" | awk '{print $NF}')
    pairs=$(python3 -c "import json;r=json.load(open('$out/$n/dedup/near-dedup-report.json'));print(r['candidate_pairs'], r['removed']['documents'])")
    echo "$n documents: clusters stage peak RSS ${rss[$n]} KB, $secs, candidate pairs and removed: $pairs"
done
echo "clusters stage memory: $(( (rss[3000000] - rss[1000000]) * 1024 / 2000000 )) bytes per document (stated: $(python3 -c "import json;print(json.load(open('$out/1000000/dedup/near-dedup-report.json'))['clustering_memory_bytes_per_document'])"))"
