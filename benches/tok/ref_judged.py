"""The PyTorch reference judged as `benches/tok/judged.sh` judges cxxlm: ref_gpt's d12
(beside it in gpu/) with an HF `tokenizers` BPE (`hf_train.py`), trained for STEPS steps of
32 x 2,048 tokens on the documents of a shard directory with cxxlm's default optimizer and
schedule (ref_muon.py's Muon and AdamW at cxxlm's learning rates: matrices 0.02 with the
momentum rising from 0.85 to 0.95 over 300 steps, embedding 0.2, head 0.004; no warmup, the
last 20% of the steps down to zero; clipping at 1), then its bits per byte on held-out shards.
Documents are encoded whole, each after a BOS token, and cut into windows of 2,049 tokens
taken in a new random order every pass; held-out windows are scored over every token but
the BOS ones, per UTF-8 byte of the documents.

The tokens are kept in WORK, and training checkpoints there every 250 steps and when
`--seconds` run out, so a call cut short is continued by the next one on the same machine.

  python3 benches/tok/ref_judged.py --tokenizer gpu/hf-tokenizer.json --data gpu/data-norepeat \\
      --held-out gpu/held-out --work /tmp/ref-judged --steps 3045 --seconds 480
"""
import argparse, json, math, sys, time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent))
sys.path.insert(0, str(here.parent / "train"))
from common import shard_docs  # noqa: E402
from ref_muon import MuonAdamW  # noqa: E402
import ref_gpt  # noqa: E402  (ref_muon put gpu/ on the path)

BOS = "<|reserved_0|>"


def encode(tokenizer, shard_dir, path):
    """The documents' tokens, each after BOS, as one uint16 array (cached at `path`), and the
    documents' UTF-8 bytes."""
    if not path.exists():
        bos = tokenizer.token_to_id(BOS)
        ids, nbytes, batch = [], 0, []

        def flush():
            for e in tokenizer.encode_batch(batch, add_special_tokens=False):
                ids.append(np.array([bos] + e.ids, dtype=np.uint16))
            batch.clear()

        for doc in shard_docs(shard_dir):
            batch.append(doc["text"])
            nbytes += len(doc["text"].encode())
            if len(batch) == 1024:
                flush()
        flush()
        np.save(path.with_suffix(".tmp.npy"), np.concatenate(ids))
        path.with_suffix(".tmp.npy").rename(path)
        path.with_suffix(".json").write_text(json.dumps({"bytes": nbytes}))
    return np.load(path), json.loads(path.with_suffix(".json").read_text())["bytes"]


ORDERS = {}


def batch_at(tokens, step, batch, seq, device):
    """The windows of training step `step`: each pass over the windows in its own random order."""
    n = (len(tokens) - 1) // seq
    rows = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(i, n)
        if epoch not in ORDERS:
            ORDERS[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        start = int(ORDERS[epoch][k]) * seq
        rows.append(tokens[start:start + seq + 1])
    x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device, non_blocking=True)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def lr_scale(step, steps, warmdown=0.2):
    left = steps - step
    return min(1.0, left / round(warmdown * steps))


@torch.no_grad()
def bits_per_byte(model, tokens, nbytes, bos, batch, seq, device):
    nats = 0.0
    starts = list(range(0, len(tokens) - 1, seq))
    for i in range(0, len(starts), batch):
        x = torch.full((len(starts[i:i + batch]), seq), bos, dtype=torch.int64)
        y = torch.full_like(x, -1)
        for r, s in enumerate(starts[i:i + batch]):
            w = torch.from_numpy(tokens[s:s + seq + 1].astype(np.int64))
            x[r, :len(w) - 1] = w[:-1]
            y[r, :len(w) - 1] = w[1:]
        y[y == bos] = -1
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(x, y)
        nats += loss.float().item() * int((y >= 0).sum())
    return nats / math.log(2) / nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--held-out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=3045)
    ap.add_argument("--seconds", type=float, default=480)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--cpu", action="store_true", help="a check of the script, not a measurement")
    a = ap.parse_args()
    device = "cpu" if a.cpu else "cuda"
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = Tokenizer.from_file(a.tokenizer)
    vocab = tokenizer.get_vocab_size()
    t0 = time.time()
    train, train_bytes = encode(tokenizer, a.data, work / "train.npy")
    held, held_bytes = encode(tokenizer, a.held_out, work / "held-out.npy")
    print(f"tokens: {len(train)} training ({train_bytes / len(train):.2f} bytes per token), {len(held)} held out "
          f"({held_bytes} bytes), {time.time() - t0:.1f} s", flush=True)

    torch.manual_seed(0)
    model = ref_gpt.GPT(a.depth, vocab, a.seq).to(device)
    if device == "cuda":
        model.wte.to(dtype=torch.bfloat16)
    width_scale = (a.depth * 64 / 768) ** -0.5
    opt = MuonAdamW(model.parameters(), vocab, vocab_lrs=[0.2 * width_scale, 0.004 * width_scale])
    step, ckpt = 0, work / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.adamw.load_state_dict(state["adamw"])
        for m, saved in zip(opt.momenta, state["momenta"]):
            m.copy_(saved)
        step = state["step"]
        print(f"resumed at step {step}", flush=True)

    def save():
        torch.save({"model": model.state_dict(), "adamw": opt.adamw.state_dict(), "momenta": opt.momenta,
                    "step": step}, work / "checkpoint.tmp")
        (work / "checkpoint.tmp").rename(ckpt)

    fwd = torch.compile(model, dynamic=False) if device == "cuda" else model
    log = open(work / "train.log", "a")
    start = t_last = time.time()
    while step < a.steps:
        if time.time() - start > a.seconds:
            save()
            print(f"RESUME stopped at step {step} of {a.steps}", flush=True)
            return
        x, y = batch_at(train, step, a.batch, a.seq, device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = fwd(x, y)
        loss.backward()
        opt.momentum = 0.85 + 0.1 * min(1.0, step / 300)
        opt.step(lr_scale(step, a.steps))
        opt.zero_grad()
        step += 1
        if step % 100 == 0 or step == a.steps:
            now = time.time()
            line = {"step": step, "loss": loss.item(), "tok_s": 100 * a.batch * a.seq / (now - t_last)}
            t_last = now
            print(json.dumps(line), file=log, flush=True)
        if step % 250 == 0:
            save()
    save()
    model.eval()
    bpb = bits_per_byte(model, held, held_bytes, tokenizer.token_to_id(BOS), a.batch, a.seq, device)
    print(f"RESULT impl=torch-compile-muon steps={a.steps} train_tokens={step * a.batch * a.seq} "
          f"train_bytes_per_token={train_bytes / len(train):.3f} held_out_bytes={held_bytes} "
          f"held_out_bits_per_byte={bpb:.4f}", flush=True)


if __name__ == "__main__":
    main()
