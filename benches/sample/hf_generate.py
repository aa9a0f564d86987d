"""HF transformers `generate` of a LlamaForCausalLM with cxxlm's depth, width, heads and
vocabulary (random weights, bf16, static KV cache, greedy, exactly NEW tokens), timed
after a warm-up. Usage: hf_generate.py DEPTH WIDTH HEADS KV_HEADS VOCAB BATCH PROMPT NEW"""
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

depth, width, heads, kv, vocab, batch, prompt, new = map(int, sys.argv[1:9])
config = LlamaConfig(
    hidden_size=width,
    intermediate_size=4 * width,
    num_hidden_layers=depth,
    num_attention_heads=heads,
    num_key_value_heads=kv,
    head_dim=width // heads,
    vocab_size=vocab,
    max_position_embeddings=2048,
)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
ids = torch.tensor([[(i * 7919) % (vocab - 64) for i in range(prompt)]] * batch, device="cuda")


def generate(n):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
    )


with torch.no_grad():
    generate(8)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(new)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
tokens = (out.shape[1] - prompt) * batch
print(f"RESULT impl=hf-transformers batch={batch} prompt={prompt} new={new} seconds={seconds:.3f} tok_s={tokens / seconds:.0f}")
