"""The datasketch side of `benches/dedup/bench.sh`: MinHash LSH at the same settings
(lower-cased text split on non-word characters, 5-gram shingles, 256 permutations,
25 bands x 10 rows) over the same shards, the first document of each cluster kept.

Usage: datasketch_dedup.py SHARD_DIR REMOVED_IDS_OUT
"""

import re
import sys
from pathlib import Path

from datasketch import MinHash, MinHashLSH

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import shard_docs  # noqa: E402

NON_WORD = re.compile(r"\W+")


def shingles(text, n=5):
    tokens = [t for t in NON_WORD.split(text.lower()) if t]
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def main():
    shard_dir, out = sys.argv[1:]
    lsh = MinHashLSH(threshold=0.7, num_perm=256, params=(25, 10))
    ids = []
    parent = []

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for doc in shard_docs(shard_dir):
        doc_id, text = doc["id"], doc["text"]
        i = len(ids)
        ids.append(doc_id)
        parent.append(i)
        sh = shingles(text)
        if not sh:
            continue
        m = MinHash(num_perm=256)
        m.update_batch([s.encode("utf-8") for s in sh])
        for j in lsh.query(m):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
        lsh.insert(i, m)
    removed = [ids[i] for i in range(len(ids)) if find(i) != i]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(removed) + "\n")
    print(f"{len(ids)} documents, {len(removed)} removed")


if __name__ == "__main__":
    main()
