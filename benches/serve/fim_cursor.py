"""FIM at an editor's cursor for a model that learned whole-line middles.

`corpus DIR N SEED` writes N small C++ files of regular functions (switch tables,
arithmetic chains, array fills: a line is predictable from its neighbours). `ask URL
CASES SEED` sends `/infill` requests as llama.vim does, each a fresh file cut at a random
point of one of its lines, and counts completions whose first line is the rest of that
line exactly; then as many with text left after the cursor on its line (an editor's
auto-inserted `)` or `;`, or code being edited), counting completions that are exactly the
text between the cursor and it.
"""
import json
import os
import random
import sys
import time
import urllib.request

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta"]


def program(i, rng):
    out = [f"// file {i}\n#include <cstdio>\n"]
    for j in range(rng.randint(2, 4)):
        name = f"{rng.choice(NAMES)}_{i}_{j}"
        kind = rng.choice(["table", "chain", "fill"])
        if kind == "table":
            lo = rng.randint(0, 5)
            cases = "".join(f"case {k}: return {k * k};\n" for k in range(lo, lo + rng.randint(5, 9)))
            out.append(f"int {name}(int k) {{\nswitch (k) {{\n{cases}default: return -1;\n}}\n}}\n")
        elif kind == "chain":
            c = rng.randint(2, 9)
            out.append(f"int {name}(int x) {{\nint a = x + {c};\nint b = a * {c};\nint d = b - {c};\nreturn d;\n}}\n")
        else:
            lo = rng.randint(1, 4)
            fills = "".join(f"t[{k}] = {k} + {k};\n" for k in range(lo, lo + 6))
            out.append(f"void {name}(int* t) {{\n{fills}}}\n")
    return "\n".join(out)


def corpus(out, n, seed):
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    for i in range(n):
        with open(f"{out}/f{i:04}.cpp", "w") as f:
            f.write(program(i, rng))


def infill(url, prefix, suffix):
    body = {"input_prefix": prefix, "input_suffix": suffix, "prompt": "", "n_predict": 24, "temperature": 0}
    request = urllib.request.Request(f"{url}/infill", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request).read())["content"]


def ask(url, cases, seed):
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health")
            break
        except Exception:
            time.sleep(0.1)
    rng = random.Random(seed)
    exact = between = 0
    for i in range(cases):
        text = program(100_000 + i, rng)
        lines, start = [], 0
        for k, ch in enumerate(text):
            if ch == "\n":
                if len(text[start:k].strip()) > 3 and not text[start:k].startswith(("//", "#")):
                    lines.append((start, k))
                start = k + 1
        a, b = rng.choice(lines)
        cursor = a + rng.randint(0, b - a - 1)
        got = infill(url, text[:cursor], text[b:]).split("\n")[0]
        exact += got.rstrip() == text[cursor:b].rstrip()
        # The same line with the text from a later point of it left after the cursor.
        a, b = rng.choice(lines)
        cursor = a + rng.randint(0, b - a - 2)
        rest = rng.randint(cursor + 1, b - 1)
        got = infill(url, text[:cursor], text[rest:]).split("\n")[0]
        between += got == text[cursor:rest]
    print(f"RESULT exact_rest_of_line={exact} of {cases} exact_up_to_the_text_after_the_cursor={between} of {cases}")

if __name__ == "__main__":
    if sys.argv[1] == "corpus":
        corpus(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        ask(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
