"""`cxxlm serve` against transformers `generate` on the exported model, the same
fill-in-the-middle prompts in the same run: time to first token of ~2,000-token FIM
prompts (p50, p99) and tokens/s at 1 and 32 concurrent clients.

usage: bench.py PROMPTS URL|- HF_DIR|- DEVICE [--clients 32] [--new 128] [--ttft 20]
       bench.py prompts TOKENIZER_JSON FILES... > prompts.jsonl
  prompts: FIM prompts of about 2,000 tokens (of the model's tokenizer) from real C++
           files, as JSON lines
  URL:     time the server at URL; HF_DIR "-" skips transformers
  -:       time transformers only (for a run where the server is elsewhere)"""
import json
import statistics
import sys
import threading
import time
import urllib.request


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def build_prompts(files, tokenizer_json, target=2000, per_file=2):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_json)
    out = []
    for path in files:
        text = open(path, encoding="utf-8", errors="replace").read()
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) < target + 64:
            continue
        for k in range(per_file):
            # The cursor at a line start, with 3/4 of the budget before it.
            cut = len(ids) // 2 + k * 97
            prefix = tok.decode(ids[max(0, cut - target * 3 // 4):cut])
            prefix = prefix[: prefix.rfind("\n") + 1] if "\n" in prefix else prefix
            suffix = tok.decode(ids[cut:cut + target // 4])
            out.append({"file": path, "prefix": prefix, "suffix": suffix})
    return out


def post(url, body, stream):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def server_request(url, p, new, stream=True):
    """(seconds to the first token, tokens, seconds in all, server timings)."""
    body = {"prompt": p["prefix"], "suffix": p["suffix"], "max_tokens": new, "temperature": 0,
            "stream": stream, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with post(url + "/v1/completions", body, stream) as r:
        for line in r:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - start
    return first or 0.0, tokens, time.perf_counter() - start


def bench_server(url, prompts, clients, new, n_ttft):
    server_request(url, prompts[0], 8)  # warm-up
    ttft = [server_request(url, p, 1)[0] for p in prompts[:n_ttft]]
    print(f"RESULT impl=cxxlm-serve what=ttft prompts={len(ttft)} p50_ms={percentile(ttft, 50) * 1e3:.1f} p99_ms={percentile(ttft, 99) * 1e3:.1f}")
    rates = {}
    for n in (1, clients):
        results = [None] * n
        def client(i):
            results[i] = server_request(url, prompts[i % len(prompts)], new)
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        tokens = sum(r[1] for r in results)
        rates[n] = tokens / wall
        print(f"RESULT impl=cxxlm-serve what=throughput clients={n} new={new} tokens={tokens} seconds={wall:.2f} tok_s={rates[n]:.1f}")
    return {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), **{f"tok_s_{k}": v for k, v in rates.items()}}


def bench_hf(hf_dir, prompts, clients, new, n_ttft, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    bos, pre, suf, mid = (tok.convert_tokens_to_ids(t) for t in ("<|bos|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))

    def ids_of(p):
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        return [bos, pre] + enc(p["prefix"]) + [suf] + enc(p["suffix"]) + [mid]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def generate(batch, n):
        width = max(len(b) for b in batch)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        sync()
        return time.perf_counter() - start, (out.shape[1] - width) * len(batch)

    generate([ids_of(prompts[0])], 8)
    ttft = [generate([ids_of(p)], 1)[0] for p in prompts[:n_ttft]]
    print(f"RESULT impl=transformers what=ttft prompts={len(ttft)} p50_ms={percentile(ttft, 50) * 1e3:.1f} p99_ms={percentile(ttft, 99) * 1e3:.1f}")
    rates = {}
    for n in (1, clients):
        batch = [ids_of(prompts[i % len(prompts)]) for i in range(n)]
        seconds, tokens = generate(batch, new)
        rates[n] = tokens / seconds
        print(f"RESULT impl=transformers what=throughput clients={n} new={new} tokens={tokens} seconds={seconds:.2f} tok_s={rates[n]:.1f}")
    return {"ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), **{f"tok_s_{k}": v for k, v in rates.items()}}


def ratios(results):
    """Ratios of the RESULT lines of a results file (both sides, any order)."""
    import re
    r = {}
    for line in open(results):
        m = re.match(r"RESULT impl=(\S+) what=(\S+) (.*)", line)
        if m:
            kv = dict(x.split("=") for x in m.group(3).split())
            r[(m.group(1), m.group(2), kv.get("clients"))] = kv
    for field in ("p50_ms", "p99_ms"):
        a, b = r[("cxxlm-serve", "ttft", None)][field], r[("transformers", "ttft", None)][field]
        print(f"RATIO time to first token {field}: transformers {b} / cxxlm-serve {a} = {float(b) / float(a):.2f}x")
    for (impl, what, n), kv in sorted(r.items(), key=str):
        if impl == "cxxlm-serve" and what == "throughput":
            b = r[("transformers", "throughput", n)]["tok_s"]
            print(f"RATIO tok/s at {n} clients: cxxlm-serve {kv['tok_s']} / transformers {b} = {float(kv['tok_s']) / float(b):.2f}x")


def main():
    args = sys.argv[1:]
    opts = {"--clients": 32, "--new": 128, "--ttft": 20}
    for k in list(opts):
        if k in args:
            i = args.index(k)
            opts[k] = int(args[i + 1])
            del args[i:i + 2]
    if args[0] == "ratios":
        ratios(args[1])
        return
    if args[0] == "prompts":
        tokenizer_json, files = args[1], args[2:]
        for p in build_prompts(files, tokenizer_json):
            print(json.dumps(p))
        return
    prompts_path, url, hf_dir, device = args
    prompts = [json.loads(l) for l in open(prompts_path)]
    clients, new, n_ttft = opts["--clients"], opts["--new"], opts["--ttft"]
    ours = bench_server(url, prompts, clients, new, n_ttft) if url != "-" else None
    hf = bench_hf(hf_dir, prompts, clients, new, n_ttft, device) if hf_dir != "-" else None
main()
