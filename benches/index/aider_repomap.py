"""aider's repository map (RepoMap: tree-sitter tags cached on disk, PageRank over
references) on a C/C++ tree, timed as `cxxlm index` is: the first scan of every file,
a query for a cursor's file and names, and the query after one saved file.

Usage: aider_repomap.py ROOT FILE IDENT[,IDENT...] OUT.json

Only the ranking is timed (`get_ranked_tags`), not the rendering of the map into a
token budget; aider counts tokens with the model's tokenizer, which would be fetched
from the network, so a count of characters / 4 stands in for it.
"""

import json
import os
import resource
import sys
import time

from aider.io import InputOutput
from aider.repomap import RepoMap

EXTENSIONS = {"c", "cc", "cpp", "cxx", "c++", "cp", "h", "hh", "hpp", "hxx", "h++", "inc",
              "inl", "ipp", "tcc", "cu"}


class CharModel:
    def token_count(self, text):
        return len(text) / 4


def sources(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if "." in f and f.rsplit(".", 1)[1].lower() in EXTENSIONS:
                out.append(os.path.join(d, f))
    return out


def main():
    root, rel, idents, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
    root = os.path.abspath(root)
    target = os.path.join(root, rel)
    files = sources(root)
    others = [f for f in files if f != target]
    io = InputOutput(yes=True, pretty=False, fancy_input=False)
    rm = RepoMap(root=root, main_model=CharModel(), io=io, refresh="always")

    def rank():
        t = time.perf_counter()
        tags = rm.get_ranked_tags([target], others, set(), set(idents))
        return time.perf_counter() - t, tags

    scan_s, tags = rank()
    query_s, _ = rank()
    with open(target, "a") as f:
        f.write("\n// saved\n")
    refresh_s, _ = rank()
    top = []
    for tag in tags[:10]:
        top.append(tag[0] if len(tag) == 1 else f"{tag[0]}:{tag[2]}")
    result = {
        "files": len(files),
        "scan_s": scan_s,
        "query_s": query_s,
        "refresh_and_query_s": refresh_s,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "top": top,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
