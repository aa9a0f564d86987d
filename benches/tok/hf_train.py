"""The Python side of `benches/tok/bench.sh`: HF `tokenizers` training a byte-level BPE
of the same vocabulary size, with the same first-stage split pattern, on the same shards.

Usage: hf_train.py SHARD_DIR VOCAB PATTERN OUT_JSON
"""

import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import shard_docs  # noqa: E402


def main():
    shard_dir, vocab, pattern, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [f"<|reserved_{i}|>" for i in range(64)]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d["text"] for d in shard_docs(shard_dir)), trainer=trainer)
    tok.save(out)
    print(f"vocabulary {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
