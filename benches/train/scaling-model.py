"""Data-parallel scaling on paper: step time per GPU on N GPUs, for today's optimizer
sharding (gradients reduce-scattered, updates all-gathered once a step) and for full
sharding (each layer's weights all-gathered for the forward and again for the backward,
its gradients reduce-scattered), with the collectives exposed (on the stream that
computes, as optimizer sharding runs them) or hidden behind the layers' compute but one
layer's worth (full sharding gathers the next layer and reduce-scatters the last on a
side stream).

Measured inputs are named below with their BENCHMARKS.md section. Two figures are derived:
the effective collective bandwidth, calibrated from the two-H200 run (the 2-GPU step less
its compute and its half of Newton-Schulz, over the bytes a rank sent), and Muon's time
at another shape, d20's scaled by the Newton-Schulz FLOPs of the matrices.

usage: python3 benches/train/scaling-model.py"""

# d20, B=16, T=2048, Muon (BENCHMARKS.md):
D20_STEP_1GPU_MS = 310.0  # "Data-parallel training on two H200s": 1 GPU
D20_STEP_2GPU_MS = 307.0  # the same, 2 GPUs at the same per-GPU batch
D20_MUON_MS = 41.4  # "Fused kernels ... against torch.compile": d20's optimizer step
PEAK_FLOPS = 989e12  # bf16 dense, H100 and H200
VOCAB = 32768
NS_STEPS = 5


def d20():
    w = 1280
    layer = [(w, w)] * 4 + [(4 * w, w), (w, 4 * w)]
    return dict(name="d20", depth=20, width=w, matrices=layer * 20, rows=16, seq=2048)


def b3():
    # The seeds' 3B: 32 layers of 2560, keys and values for 8 of 32 heads of 80, SwiGLU of
    # 6912 (gate and value in one matrix).
    w, kv = 2560, 8 * 80
    layer = [(w, w), (kv, w), (kv, w), (w, w), (2 * 6912, w), (w, 6912)]
    return dict(name="3B", depth=32, width=w, matrices=layer * 32, rows=16, seq=8192)


def counts(m):
    muon = sum(a * b for a, b in m["matrices"])
    return muon, 2 * VOCAB * m["width"]


def ns_flops(m):
    """Newton-Schulz per step: 4 r^2 c + 2 r^3 a step for each matrix, r <= c."""
    total = 0
    for a, b in m["matrices"]:
        r, c = min(a, b), max(a, b)
        total += NS_STEPS * (4 * r * r * c + 2 * r ** 3)
    return total


def ring(bytes_, gpus):
    """Bytes a rank sends in a ring all-gather or reduce-scatter of `bytes_` in all."""
    return bytes_ * (gpus - 1) / gpus


def sent(m, gpus, mode):
    muon, adam = counts(m)
    if mode == "optimizer":
        # Gradients reduce-scattered in fp32; Muon's updates gathered in bf16, AdamW's
        # weights in fp32.
        return ring(4 * (muon + adam), gpus) + ring(2 * muon + 4 * adam, gpus)
    # Weights gathered twice (forward, backward) in the bf16 they compute in, fp32
    # gradients reduce-scattered.
    return ring((2 * 2 + 4) * (muon + adam), gpus)


small = d20()
compute_d20 = D20_STEP_1GPU_MS - D20_MUON_MS
comm_2 = D20_STEP_2GPU_MS - compute_d20 - D20_MUON_MS / 2
bandwidth = sent(small, 2, "optimizer") / (comm_2 / 1e3)
muon_ms_per_flop = D20_MUON_MS / ns_flops(small)
print(f"calibration: d20 on 2 GPUs sent {sent(small, 2, 'optimizer') / 1e9:.2f} GB a rank in "
      f"{comm_2:.1f} ms exposed: an effective {bandwidth / 1e9:.0f} GB/s")

big = b3()
muon, adam = counts(big)
tokens = big["rows"] * big["seq"]
flops_per_token = 6 * (muon + adam) + 6 * big["depth"] * big["width"] * big["seq"]
compute_b3 = tokens * flops_per_token / (0.5 * PEAK_FLOPS) * 1e3
print(f"3B: {muon / 1e9:.2f}B Muon and {adam / 1e6:.0f}M AdamW weights; "
      f"{compute_b3 / 1e3:.2f} s of forward and backward a step of 16 x 8192 at the seeds' "
      f"50% MFU; Muon {ns_flops(big) * muon_ms_per_flop:.0f} ms on one GPU")
print()
print("| model | GPUs | sharding | collectives | step ms | collectives' share | Muon's share | per GPU vs 1 GPU |")
print("|---|---:|---|---|---:|---:|---:|---:|")
for m, compute in ((small, compute_d20), (big, compute_b3)):
    muon_ms = ns_flops(m) * muon_ms_per_flop
    one = compute + muon_ms
    for gpus in (2, 8):
        for mode in ("optimizer", "full"):
            comm = sent(m, gpus, mode) / bandwidth * 1e3
            for hidden in (False, True):
                # Hidden: all but one layer's worth (the first gather, the last
                # reduce-scatter); optimizer sharding's collectives sit at the step's ends.
                exposed = comm / m["depth"] if hidden and mode == "full" else comm
                if hidden and mode == "optimizer":
                    continue
                step = compute + muon_ms / gpus + exposed
                print(f"| {m['name']} | {gpus} | {mode} | {'hidden' if hidden else 'exposed'} | "
                      f"{step:,.0f} | {exposed / step:.1%} | {muon_ms / gpus / step:.1%} | "
                      f"{one / step:.2f}x |")
