#!/usr/bin/env python3
"""Bug-fix SFT examples from real C++, in the seeds' format.

Reads documents as JSON lines ({"text": ...}, e.g. `zstd -dc shards/*.jsonl.zst`) on stdin,
cuts functions out of them (a signature line ending in `{`, or followed by a line `{`, then
the lines up to the brace that closes it), and changes one operator of each to a plausible wrong one (`==` and `!=`, `<`
and `<=`, `&&` and `||`, `+ 1` and `- 1`, `true` and `false` returned). Each example asks
for the fix and answers with a `/* REASONING: */` note naming the changed line, then the
function as it was:

    {"input": "// Fix the bug in this function.\n<changed>", "output": "/* REASONING: ... */\n<original>"}

Usage: zstd -dc data/*.jsonl.zst | bugfix.py --out bugfix.jsonl.gz [--max N] [--seed S]
"""
import argparse
import gzip
import json
import random
import re
import sys

SIGNATURE = re.compile(r"^[A-Za-z_~][\w:<>,\s\*&~]*\([^;{}]*\)\s*(const\s*)?(noexcept\s*)?(override\s*)?(\{)?$")
NOT_FUNCTIONS = ("if", "for", "while", "switch", "else", "return", "catch", "do", "case", "namespace")
SWAPS = [
    (" == ", " != "), (" != ", " == "), (" <= ", " < "), (" >= ", " > "), (" < ", " <= "),
    (" > ", " >= "), (" && ", " || "), (" || ", " && "), (" + 1", " - 1"), (" - 1", " + 1"),
    ("return true;", "return false;"), ("return false;", "return true;"),
]


def functions(text, min_lines=4, max_lines=40, max_chars=1500):
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        match = SIGNATURE.match(line)
        # The brace ends the signature's line, or is the next line (GNU style).
        opens = match and (match.group(4) or (i + 1 < len(lines) and lines[i + 1].strip() == "{"))
        if opens and not line.startswith(NOT_FUNCTIONS):
            depth, j = 0, i
            while j < len(lines):
                depth += lines[j].count("{") - lines[j].count("}")
                if depth <= 0 and "{" in "".join(lines[i:j + 1]):
                    break
                j += 1
            body = "\n".join(lines[i:j + 1])
            if depth == 0 and min_lines <= j - i + 1 <= max_lines and len(body) <= max_chars:
                yield body
                i = j + 1
                continue
        i += 1


def mutate(function, rng):
    """The function with one operator changed, and a note of the change; or None."""
    lines = function.split("\n")
    spots = []
    for k, line in enumerate(lines[1:], start=1):
        stripped = line.strip()
        if stripped.startswith(("#", "//", "/*", "*")):
            continue
        for good, bad in SWAPS:
            start = line.find(good)
            while start >= 0:
                spots.append((k, start, good, bad))
                start = line.find(good, start + 1)
    if not spots:
        return None
    k, start, good, bad = rng.choice(spots)
    changed = lines[k][:start] + bad + lines[k][start + len(good):]
    note = (f"/* REASONING:\n   Line {k + 1} reads `{changed.strip()}`: `{bad.strip()}` is wrong here.\n"
            f"   It should be `{good.strip()}`.\n*/\n")
    return "\n".join(lines[:k] + [changed] + lines[k + 1:]), note


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--max", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seen = set()
    written = 0
    with gzip.open(args.out, "wt") as out:
        for raw in sys.stdin:
            try:
                text = json.loads(raw)["text"]
            except (ValueError, KeyError, TypeError):
                continue
            for function in functions(text):
                if function in seen:
                    continue
                seen.add(function)
                changed = mutate(function, rng)
                if changed is None:
                    continue
                buggy, note = changed
                record = {"input": f"// Fix the bug in this function.\n{buggy}\n",
                          "output": f"{note}{function}\n"}
                out.write(json.dumps(record) + "\n")
                written += 1
                if written == args.max:
                    print(f"{written} examples", file=sys.stderr)
                    return
    print(f"{written} examples", file=sys.stderr)


if __name__ == "__main__":
    main()
