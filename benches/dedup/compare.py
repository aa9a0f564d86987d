"""Print the timing table and the agreement of the removed sets.

Usage: compare.py CXXLM_OUT CXXLM_TIME DATASKETCH_REMOVED DATASKETCH_TIME
"""

import glob
import io
import json
import re
import sys

import zstandard


def gnu_time(path):
    text = open(path).read()
    h, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text).groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return int(h or 0) * 3600 + int(m) * 60 + float(s), rss


def removed_ids(out):
    ids = set()
    for path in glob.glob(f"{out}/removed/part-*.jsonl.zst"):
        with open(path, "rb") as f:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
                ids.add(json.loads(line)["id"])
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
