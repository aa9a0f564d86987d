"""Loads a `cxxlm export hf` directory with transformers' own classes (no remote code)
and writes the logits of the given prompts, for the exporter to compare with its own, and
the ids its chat template gives a conversation.

usage: hf_parity.py EXPORT_DIR PROMPTS_JSON LOGITS_OUT
PROMPTS_JSON: {"ids": [[int...]...], "texts": [str...], "chat": [{"role", "content"}...]};
LOGITS_OUT: float32 rows."""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

export, prompts_path, out = sys.argv[1:4]
prompts = json.load(open(prompts_path))
model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, trust_remote_code=False)
model.eval()
tok = AutoTokenizer.from_pretrained(export, trust_remote_code=False)
report = {
    "transformers": transformers.__version__,
    "class": type(model).__name__,
    "tokenizer_class": type(tok).__name__,
    "tokens_equal": [tok(t, add_special_tokens=False)["input_ids"] == ids[1:]
                     for t, ids in zip(prompts["texts"], prompts["ids"])],
    "chat_ids": list(tok.apply_chat_template(prompts["chat"], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)),
}
with open(out, "wb") as f, torch.no_grad():
    for ids in prompts["ids"]:
        logits = model(torch.tensor([ids])).logits[0].float().contiguous()
        f.write(logits.numpy().tobytes())
print(json.dumps(report))
