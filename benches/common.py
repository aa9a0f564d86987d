"""What the Python sides of the benchmarks share: reading cxxlm shards and GNU time's
reports."""

import glob
import io
import json
import re

import zstandard


def jsonl(path):
    """The records of a .jsonl or .jsonl.zst file."""
    if path.endswith(".zst"):
        with open(path, "rb") as f:
            stream = zstandard.ZstdDecompressor().stream_reader(f)
            yield from (json.loads(line) for line in io.TextIOWrapper(stream, encoding="utf-8"))
    else:
        with open(path, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)


def shard_docs(shard_dir):
    """Every document of the part-*.jsonl.zst shards in a directory, in order."""
    for path in sorted(glob.glob(f"{shard_dir}/part-*.jsonl.zst")):
        yield from jsonl(path)


def gnu_time(path):
    """(wall seconds, peak RSS in MB) from a `/usr/bin/time -v` report."""
    text = open(path).read()
    h, m, s = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text).groups()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return int(h or 0) * 3600 + int(m) * 60 + float(s), rss_kb / 1024
