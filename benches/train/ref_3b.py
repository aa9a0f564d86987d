"""The PyTorch reference (`ref_gpt.py`, beside it in gpu/) at the seeds' 3B shape: grouped
key/value heads and a SwiGLU MLP (hidden 8/3 of the width, rounded up to 64, as the `3b`
preset with `model.activation = "swiglu"`), optionally each block checkpointed
(torch.utils.checkpoint), trained by ref_gpt's own loop (AdamW, autocast, torch.compile).
Prints ref_gpt's RESULT line, then one with the MFU counted as cxxlm counts it
(6 x non-embedding parameters + 12 x layers x width x sequence per token).

  python3 benches/train/ref_3b.py --batch 1 --seq 8192 --mode compile [--checkpoint]
"""
import argparse, math, os, sys

sys.path.insert(0, os.environ.get("REF_GPT_DIR", "gpu"))
import ref_gpt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

WIDTH, DEPTH, HEADS, KV_HEADS, ROPE_BASE = 2560, 32, 32, 8, 500_000.0
CHECKPOINT = False


class Block(nn.Module):
    def __init__(self, d, nh, nkv):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, d // nh
        hidden = (8 * d // 3 + 63) // 64 * 64
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, nkv * self.hd, bias=False)
        self.c_v = nn.Linear(d, nkv * self.hd, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.c_gate = nn.Linear(d, hidden, bias=False)
        self.c_up = nn.Linear(d, hidden, bias=False)
        self.mlp_proj = nn.Linear(hidden, d, bias=False)

    def layer(self, x, cos, sin):
        B, T, C = x.shape
        h = ref_gpt.norm(x)
        q = self.c_q(h).view(B, T, self.nh, self.hd)
        k = self.c_k(h).view(B, T, self.nkv, self.hd)
        v = self.c_v(h).view(B, T, self.nkv, self.hd)
        q, k = ref_gpt.norm(ref_gpt.apply_rotary_emb(q, cos, sin)), ref_gpt.norm(ref_gpt.apply_rotary_emb(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        h = ref_gpt.norm(x)
        return x + self.mlp_proj(F.silu(self.c_gate(h)) * self.c_up(h))

    def forward(self, x, cos, sin):
        if CHECKPOINT:
            return checkpoint(self.layer, x, cos, sin, use_reentrant=False)
        return self.layer(x, cos, sin)


class GPT(ref_gpt.GPT):
    """ref_gpt's model with the 3B's blocks; `depth` is ignored (the shape is fixed)."""

    def __init__(self, depth, vocab, seq):
        nn.Module.__init__(self)
        d = WIDTH
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([Block(d, HEADS, KV_HEADS) for _ in range(DEPTH)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        hd = d // HEADS
        inv = 1.0 / (ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        f = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
        self.register_buffer("cos", f.cos().bfloat16()[None, :, None, :], persistent=False)
        self.register_buffer("sin", f.sin().bfloat16()[None, :, None, :], persistent=False)
        std = 1.0 / math.sqrt(d)
        for blk in self.h:
            for lin in (blk.c_q, blk.c_k, blk.c_v, blk.c_proj, blk.c_gate, blk.c_up):
                nn.init.normal_(lin.weight, 0.0, std)
            nn.init.normal_(blk.mlp_proj.weight, 0.0, std * 0.5)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.001)
        nn.init.normal_(self.wte.weight, 0.0, 1.0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--mode", default="compile")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--checkpoint", action="store_true")
    a = ap.parse_args()
    CHECKPOINT = a.checkpoint
    torch.backends.cuda.matmul.allow_tf32 = True
    ref_gpt.GPT = GPT
    import contextlib, io

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        ref_gpt.bench_train(DEPTH, a.batch, a.seq, a.vocab, a.mode, a.steps, "cuda")
    line = captured.getvalue().strip()
    print(line)
    fields = dict(kv.split("=", 1) for kv in line.split()[1:])
    per_token = 6 * int(fields["params_noemb"]) + 12 * DEPTH * WIDTH * a.seq
    mfu = per_token * float(fields["tok_s"]) / 989e12
    print(f"RESULT impl=torch-{a.mode} shape=3b B={a.batch} T={a.seq} checkpoint={int(a.checkpoint)} "
          f"tok_s={fields['tok_s']} mfu={mfu:.4f} peak_alloc_gib={fields['peak_alloc_gib']} "
          f"step_ms={fields['step_ms']}", flush=True)
