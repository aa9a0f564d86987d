"""Print the timing table and the agreement of the removed sets.

Usage: compare.py CXXLM_OUT CXXLM_TIME DATASKETCH_REMOVED DATASKETCH_TIME
"""

import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import gnu_time, jsonl  # noqa: E402


def removed_ids(out):
    ids = set()
    for path in glob.glob(f"{out}/removed/part-*.jsonl.zst"):
        ids.update(doc["id"] for doc in jsonl(path))
    return ids


def main():
    cx_out, cx_time, ds_removed, ds_time = sys.argv[1:]
    ds_s, ds_rss = gnu_time(ds_time)
    cx_s, cx_rss = gnu_time(cx_time)
    print(f"{'tool':<12}{'seconds':>9}{'peak RSS MB':>13}{'vs datasketch':>15}")
    print(f"{'datasketch':<12}{ds_s:>9.2f}{ds_rss:>13.0f}{1:>14.1f}x")
    print(f"{'cxxlm':<12}{cx_s:>9.2f}{cx_rss:>13.0f}{ds_s / cx_s:>14.1f}x")
    ours = removed_ids(cx_out)
    theirs = {line.strip() for line in open(ds_removed, encoding="utf-8") if line.strip()}
    both = ours & theirs
    print(f"\nremoved: cxxlm {len(ours)}, datasketch {len(theirs)}, both {len(both)}")
    print(f"cxxlm's removals also removed by datasketch: {100 * len(both) / max(1, len(ours)):.1f}%")
    print(f"datasketch's removals also removed by cxxlm: {100 * len(both) / max(1, len(theirs)):.1f}%")
    report = json.load(open(f"{cx_out}/near-dedup-report.json"))
    print(f"clusters: {report['clusters']}, sizes: {report['cluster_sizes']}")


if __name__ == "__main__":
    main()
