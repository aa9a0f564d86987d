"""Encode every document of cxxlm shards with Python HF `tokenizers` (our tokenizer.json,
`encode_batch`) and with tiktoken's cl100k_base (`encode_ordinary_batch`), timing only the
encoding; prints JSON with each one's seconds and tokens."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiktoken  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402
from tiktoken_ext import openai_public  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from common import shard_docs  # noqa: E402

shards, tokenizer_path, cl100k_ranks = sys.argv[1], sys.argv[2], sys.argv[3]
texts = [d["text"] for d in shard_docs(shards)]
threads = os.cpu_count()
result = {"documents": len(texts), "bytes": sum(len(t.encode()) for t in texts), "threads": threads}

hf = Tokenizer.from_file(tokenizer_path)
start = time.perf_counter()
tokens = 0
for i in range(0, len(texts), 1000):
    tokens += sum(len(e.ids) for e in hf.encode_batch(texts[i : i + 1000], add_special_tokens=False))
result["hf_tokenizers"] = {"seconds": time.perf_counter() - start, "tokens": tokens}

# The ranks file comes from the tiktoken-rs crate (this machine may not reach OpenAI's
# download, and the file's hash is checked all the same); the rest is tiktoken's own.
openai_public.load_tiktoken_bpe = lambda _url, expected_hash: load_tiktoken_bpe(cl100k_ranks, expected_hash)
cl100k = tiktoken.Encoding(**openai_public.cl100k_base())
start = time.perf_counter()
tokens = 0
for i in range(0, len(texts), 1000):
    tokens += sum(len(ids) for ids in cl100k.encode_ordinary_batch(texts[i : i + 1000], num_threads=threads))
result["tiktoken_cl100k"] = {"seconds": time.perf_counter() - start, "tokens": tokens}
print(json.dumps(result))
