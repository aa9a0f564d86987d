"""The PyTorch reference (`ref_gpt.py`, beside it in gpu/) with the optimizer cxxlm trains
with by default, for a like-for-like speed: Muon on the blocks' matrices (momentum 0.95 with
the Nesterov blend, five quintic Newton-Schulz steps in bf16 under torch.compile, as
nanochat's, run over each stack of same-shape matrices at once, as cxxlm does), fused AdamW on
the embedding and the head, gradients clipped to norm 1. ref_gpt's own loop, model and data;
prints its RESULT line with `impl=torch-<mode>-muon`.

  python3 benches/train/ref_muon.py --depth 12 --batch 32 --mode compile
"""
import argparse, os, sys

sys.path.insert(0, os.environ.get("REF_GPT_DIR", "gpu"))
import ref_gpt  # noqa: E402
import torch  # noqa: E402

ADAMW = torch.optim.AdamW


@torch.compile(dynamic=False)
def orthogonalize(g, steps: int):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


class MuonAdamW:
    """Muon for every matrix but those with `vocab` rows (embedding, head): AdamW, at
    `vocab_lrs` (one rate, or a list in the parameters' order)."""

    def __init__(self, params, vocab, lr=0.02, momentum=0.95, steps=5, vocab_lrs=1e-4):
        params = list(params)
        vocab_params = [p for p in params if p.size(0) == vocab]
        if not isinstance(vocab_lrs, list):
            vocab_lrs = [vocab_lrs] * len(vocab_params)
        self.adamw = ADAMW([{"params": [p], "lr": r} for p, r in zip(vocab_params, vocab_lrs)], betas=(0.8, 0.95),
                           eps=1e-10, weight_decay=0.0, fused=params[0].is_cuda)
        for g in self.adamw.param_groups:
            g["base_lr"] = g["lr"]
        by_shape = {}
        for p in params:
            if p.size(0) != vocab:
                by_shape.setdefault(tuple(p.shape), []).append(p)
        self.groups = list(by_shape.values())
        self.momenta = [torch.zeros((len(g), *g[0].shape), device=g[0].device) for g in self.groups]
        self.params, self.lr, self.momentum, self.steps = params, lr, momentum, steps

    @torch.no_grad()
    def step(self, lr_scale=1.0):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        for g in self.adamw.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        for group, m in zip(self.groups, self.momenta):
            g = torch.stack([p.grad for p in group])
            m.lerp_(g, 1 - self.momentum)
            update = orthogonalize(g.lerp_(m, self.momentum), self.steps)
            scale = -self.lr * lr_scale * max(1.0, group[0].size(0) / group[0].size(1)) ** 0.5
            torch._foreach_add_(group, list(update.float().unbind(0)), alpha=scale)
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--mode", default="compile")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu", action="store_true", help="a check of the script, not a measurement")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.optim.AdamW = lambda params, **_: MuonAdamW(params, a.vocab)
    import contextlib, io

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        ref_gpt.bench_train(a.depth, a.batch, a.seq, a.vocab, a.mode, a.steps, "cpu" if a.cpu else "cuda")
    print(captured.getvalue().strip().replace(f"impl=torch-{a.mode} ", f"impl=torch-{a.mode}-muon "), flush=True)
