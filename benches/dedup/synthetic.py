"""Write N small synthetic documents as data-run shards (every 10th a near copy of an
earlier one), for measuring the clusters stage's memory per document.

Usage: synthetic.py OUT_DIR N
"""

import json
import os
import sys

import zstandard


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    os.makedirs(out, exist_ok=True)
    per_shard = 500_000
    for shard in range(0, n, per_shard):
        lines = []
        for i in range(shard, min(n, shard + per_shard)):
            k = i - 7 if i % 10 == 9 else i
            text = f"int value_{k} = combine(alpha_{k % 977}, beta_{k % 1013}, gamma_{k});\nreturn value_{k} + {k % 7};\n"
            lines.append(json.dumps({"id": f"doc{i}", "text": text, "meta": {}}))
        data = ("\n".join(lines) + "\n").encode()
        with open(f"{out}/part-00000-{shard // per_shard:05d}.jsonl.zst", "wb") as f:
            f.write(zstandard.ZstdCompressor(level=1).compress(data))


if __name__ == "__main__":
    main()
