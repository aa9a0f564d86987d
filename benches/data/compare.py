"""Compare the keep/drop decisions of the shared filters (size bounds, binary and UTF-8
checks, the quality rules) between a `cxxlm data run --write-removed` output and the
DataTrove pipeline's output, and print the timing table from GNU time's reports.

Usage: compare.py CXXLM_OUT CXXLM_TIME DATATROVE_OUT DATATROVE_TIME CORPUS_MB [EXTRA_LABEL EXTRA_TIME]...
"""

import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import gnu_time, jsonl  # noqa: E402

SHARED_STEPS = {"decode", "quality"}


def cxxlm_decisions(out):
    decisions = {}
    for path in glob.glob(f"{out}/part-*.jsonl.zst"):
        for doc in jsonl(path):
            decisions[doc["id"]] = "keep"
    for path in glob.glob(f"{out}/removed/part-*.jsonl.zst"):
        for doc in jsonl(path):
            removed = doc["meta"]["removed"]
            shared = removed["step"] in SHARED_STEPS
            decisions[doc["id"]] = f"drop:{removed['reason']}" if shared else "keep"
    stats = json.load(open(f"{out}/stats.json"))["stats"]
    for s in stats["read"]["skipped_inputs"]:
        decisions[s["input"]] = f"drop:{s['reason']}"
    return decisions


def datatrove_decisions(out):
    decisions = {}
    for path in glob.glob(f"{out}/kept/*.jsonl"):
        for doc in jsonl(path):
            decisions[doc["id"]] = "keep"
    for path in glob.glob(f"{out}/removed/*.jsonl"):
        for doc in jsonl(path):
            decisions[doc["id"]] = f"drop:{doc['metadata'].get('filter_reason', '?')}"
    for path in glob.glob(f"{out}/reader-skips/*.txt"):
        for line in open(path, encoding="utf-8"):
            name, reason = line.rstrip("\n").rsplit("\t", 1)
            decisions[name] = f"drop:{reason}"
    return decisions


def main():
    cx_out, cx_time, dt_out, dt_time, corpus_mb, *extra = sys.argv[1:]
    corpus_mb = float(corpus_mb)
    dt_s, dt_rss = gnu_time(dt_time)
    rows = [("datatrove", dt_s, dt_rss), ("cxxlm", *gnu_time(cx_time))]
    for label, path in zip(extra[::2], extra[1::2]):
        rows.append((label, *gnu_time(path)))
    print(f"{'pipeline':<28}{'seconds':>9}{'MB/s':>9}{'peak RSS MB':>13}{'vs DataTrove':>14}")
    for label, s, rss in rows:
        print(f"{label:<28}{s:>9.2f}{corpus_mb / s:>9.1f}{rss:>13.0f}{dt_s / s:>13.1f}x")

    ours, theirs = cxxlm_decisions(cx_out), datatrove_decisions(dt_out)
    # DataTrove's file listing (fsspec) does not follow symlinked directories; cxxlm's
    # does. Decisions are compared on the files both read.
    files = sorted(set(ours) & set(theirs))
    only = len(set(ours) - set(theirs)), len(set(theirs) - set(ours))
    agree = 0
    disagreements = []
    for f in files:
        a, b = ours[f], theirs[f]
        if (a == "keep") == (b == "keep"):
            agree += 1
        else:
            disagreements.append((f, a, b))
    print(f"\nfiles read by cxxlm only: {only[0]}, by DataTrove only: {only[1]}")
    print(f"shared-filter decisions: {agree}/{len(files)} files agree ({100 * agree / len(files):.2f}%)")
    for f, a, b in disagreements[:25]:
        print(f"  {f}: cxxlm={a} datatrove={b}")
    if len(disagreements) > 25:
        print(f"  ... {len(disagreements) - 25} more")


if __name__ == "__main__":
    main()
