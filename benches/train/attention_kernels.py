"""Causal attention forward + backward on the GPU by each fused kernel PyTorch has (flash,
cuDNN, memory-efficient), at the shapes the benches train, and which one SDPA picks.

Usage: python3 attention_kernels.py [B,H,T,D[,H_KV] ...]"""
import sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[1:]] or [
    (32, 6, 2048, 128), (16, 10, 2048, 128), (2, 32, 8192, 80, 8)]
backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for shape in shapes:
    b, h, t, d = shape[:4]
    hkv = shape[4] if len(shape) > 4 else h
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    dout = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    gqa = hkv != h
    flops = 4 * b * h * t * t * d / 2  # causal forward
    ref = None
    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend):
                def fwd():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                out = fwd()
                grads = torch.autograd.grad(out, (q, k, v), dout)
                f_ms = timed(fwd)
                fb_ms = timed(lambda: torch.autograd.grad(fwd(), (q, k, v), dout))
        except Exception as e:  # a kernel that does not take this shape
            print(f"RESULT shape={b},{h},{t},{d},{hkv} kernel={name} error={str(e).splitlines()[0][:80]!r}")
            continue
        if ref is None:
            ref = (out.float(), [x.float() for x in grads])
        err = max([(out.float() - ref[0]).abs().max().item()] +
                  [(a.float() - r).abs().max().item() for a, r in zip(grads, ref[1])])
        print(f"RESULT shape={b},{h},{t},{d},{hkv} kernel={name} fwd_ms={f_ms:.3f} "
              f"fwd_bwd_ms={fb_ms:.3f} fwd_tflops={flops / f_ms / 1e9:.0f} "
              f"fwd_bwd_tflops={3.5 * flops / fb_ms / 1e9:.0f} max_diff_vs_first={err:.2e}", flush=True)
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=gqa)
    print(f"RESULT shape={b},{h},{t},{d},{hkv} sdpa_choice={choice}")
print(torch.__version__, torch.backends.cudnn.version())
