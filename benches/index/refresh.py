"""Times `cxxlm index watch` refreshing one saved file: starts the watcher, saves FILE
N times (a comment appended, then the original restored), and reports the refresh time
the watcher prints and the time from the save to its report.

Usage: refresh.py CXXLM REPO INDEX FILE N OUT.json
"""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import queue


def main():
    cxxlm, repo, index, rel, n, out = sys.argv[1:7]
    path = os.path.join(repo, rel)
    original = open(path, "rb").read()
    t0 = time.perf_counter()
    w = subprocess.Popen([cxxlm, "index", "watch", repo, "-o", index, "--threads", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = w.stderr.readline()
    ready_s = time.perf_counter() - t0
    if not ready.startswith("watching"):
        sys.exit(f"the watcher did not start: {ready}{w.stderr.read()}")
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in w.stdout], daemon=True).start()
    time.sleep(1)
    printed, seen = [], []
    try:
        for i in range(int(n)):
            with open(path, "ab") as f:
                start = time.perf_counter()
                f.write(f"\n// saved {i}\n".encode())
            line = lines.get(timeout=30)
            seen.append((time.perf_counter() - start) * 1e3)
            m = re.search(r" in ([0-9.]+) ms", line)
            printed.append(float(m.group(1)))
            while True:  # the events of one save may come in two rounds
                try:
                    lines.get(timeout=0.3)
                except queue.Empty:
                    break
    finally:
        with open(path, "wb") as f:
            f.write(original)
        time.sleep(0.5)
        w.send_signal(signal.SIGINT)
        w.wait(timeout=60)
    result = {
        "watch_ready_s": ready_s,
        "refresh_ms_median": statistics.median(printed),
        "refresh_ms_max": max(printed),
        "save_to_report_ms_median": statistics.median(seen),
        "refresh_ms": printed,
    }
    json.dump(result, open(out, "w"), indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
