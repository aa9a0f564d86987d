// Fused memory-bound steps of the GPT's forward and backward passes, compiled at run time
// by NVRTC (`fused.rs` launches them). Tensors are bf16 (raw 16-bit words: NVRTC needs no
// CUDA headers then), arithmetic is fp32. Each kernel reads its inputs once and writes its
// outputs once where eager PyTorch makes a pass per elementary operation.
//
// `VEC` is 8 where rows are 16-byte aligned (8 bf16 per load) and 1 otherwise.

typedef unsigned short bf16;

__device__ __forceinline__ float to_f(bf16 h) { return __uint_as_float(((unsigned)h) << 16); }

// The low and high bf16 of a 32-bit word of two.
__device__ __forceinline__ float lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ bf16 to_bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

template <int VEC>
__device__ __forceinline__ void load(const bf16* p, float* out) {
    if (VEC == 8) {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            out[2 * i] = __uint_as_float(w[i] << 16);
            out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++) out[i] = to_f(p[i]);
    }
}

template <int VEC>
__device__ __forceinline__ void store(bf16* p, const float* in) {
    if (VEC == 8) {
        unsigned w[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            w[i] = (unsigned)to_bf(in[2 * i]) | ((unsigned)to_bf(in[2 * i + 1]) << 16);
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i++) p[i] = to_bf(in[i]);
    }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The sum over the block, returned to every thread. `scratch` holds 32 floats.
__device__ float block_sum(float x, float* scratch) {
    x = warp_sum(x);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // a previous call may still be reading `scratch`
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f;
    return warp_sum(x);
}

__device__ __forceinline__ float fast_tanh(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ---- RMSNorm without weight: one warp per row of `cols` -------------------------------

// y = x / sqrt(mean(x^2) + eps); rstd[row] = 1 / sqrt(mean(x^2) + eps).
template <int VEC>
__device__ void rmsnorm_forward(const bf16* x, bf16* y, float* rstd, int rows, int cols, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16* xr = x + (long long)row * cols;
    bf16* yr = y + (long long)row * cols;
    float v[VEC], ss = 0.f;
    for (int i = lane * VEC; i < cols; i += 32 * VEC) {
        load<VEC>(xr + i, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) ss += v[j] * v[j];
    }
    const float r = rsqrtf(warp_sum(ss) / cols + eps);
    for (int i = lane * VEC; i < cols; i += 32 * VEC) {
        load<VEC>(xr + i, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) v[j] *= r;
        store<VEC>(yr + i, v);
    }
    if (lane == 0) rstd[row] = r;
}

// From the norm's output y and rstd: dx = rstd * (dy - y * mean(dy * y)), plus the
// residual stream's gradient `dres` when given (dx may be dres itself).
template <int VEC>
__device__ void rmsnorm_backward(const bf16* dy, const bf16* y, const float* rstd, const bf16* dres,
                                 bf16* dx, int rows, int cols) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long long base = (long long)row * cols;
    float g[VEC], v[VEC], dot = 0.f;
    for (int i = lane * VEC; i < cols; i += 32 * VEC) {
        load<VEC>(dy + base + i, g);
        load<VEC>(y + base + i, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) dot += g[j] * v[j];
    }
    const float mean = warp_sum(dot) / cols, r = rstd[row];
    for (int i = lane * VEC; i < cols; i += 32 * VEC) {
        float res[VEC];
        load<VEC>(dy + base + i, g);
        load<VEC>(y + base + i, v);
        if (dres) {
            load<VEC>(dres + base + i, res);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; j++) res[j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; j++) g[j] = res[j] + r * (g[j] - v[j] * mean);
        store<VEC>(dx + base + i, g);
    }
}

extern "C" __global__ void rmsnorm_forward_v8(const bf16* x, bf16* y, float* rstd, int rows, int cols, float eps) {
    rmsnorm_forward<8>(x, y, rstd, rows, cols, eps);
}
extern "C" __global__ void rmsnorm_forward_v1(const bf16* x, bf16* y, float* rstd, int rows, int cols, float eps) {
    rmsnorm_forward<1>(x, y, rstd, rows, cols, eps);
}
extern "C" __global__ void rmsnorm_backward_v8(const bf16* dy, const bf16* y, const float* rstd, const bf16* dres,
                                               bf16* dx, int rows, int cols) {
    rmsnorm_backward<8>(dy, y, rstd, dres, dx, rows, cols);
}
extern "C" __global__ void rmsnorm_backward_v1(const bf16* dy, const bf16* y, const float* rstd, const bf16* dres,
                                               bf16* dx, int rows, int cols) {
    rmsnorm_backward<1>(dy, y, rstd, dres, dx, rows, cols);
}

// ---- Rotary + QK-norm over the fused q|k|v projection, in place -----------------------
//
// `qkv` is (tokens, heads + 2 kv_heads, dim), tokens in (batch, time) order. One warp per
// (token, q or k head): rotated (y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin, halves of
// the head) and RMS-normalized, in place; v is left as it is. Each lane takes two
// adjacent pairs per step and holds them in registers between reading and writing.

#define MAX_PAIR_STEPS 4  // head dims up to 4 * 64 * 2 = 512

// Two adjacent bf16 as one 32-bit word: every pair starts at an even element of a row
// whose length and stride are even (head dims are multiples of 4).
__device__ __forceinline__ unsigned pair(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }
__device__ __forceinline__ void put_pair(bf16* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = (unsigned)to_bf(a) | ((unsigned)to_bf(b) << 16);
}

// Step `s` of a lane's pairs: elements j and j + 1 of each half of the head.
#define FOR_EACH_PAIR(s, j) \
    _Pragma("unroll") for (int s = 0, j = 2 * lane; s < MAX_PAIR_STEPS && j < half; s++, j += 64)

extern "C" __global__ void rope_norm_forward(bf16* qkv, const bf16* cos, const bf16* sin, float* rstd, int tokens,
                                             int time, int heads, int kv_heads, int dim, float eps) {
    const int qk = heads + kv_heads, all = heads + 2 * kv_heads;
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= (long long)tokens * qk) return;
    const int token = (int)(w / qk), head = (int)(w % qk), half = dim / 2;
    bf16* x = qkv + ((long long)token * all + head) * dim;
    const bf16 *c = cos + (token % time) * half, *sn = sin + (token % time) * half;
    float y1[MAX_PAIR_STEPS][2], y2[MAX_PAIR_STEPS][2], ss = 0.f;
    FOR_EACH_PAIR(s, j) {
        const unsigned cw = pair(c + j), sw = pair(sn + j), aw = pair(x + j), bw = pair(x + half + j);
        const float co[2] = {lo(cw), hi(cw)}, si[2] = {lo(sw), hi(sw)}, a[2] = {lo(aw), hi(aw)},
                    b[2] = {lo(bw), hi(bw)};
#pragma unroll
        for (int e = 0; e < 2; e++) {
            y1[s][e] = a[e] * co[e] + b[e] * si[e];
            y2[s][e] = b[e] * co[e] - a[e] * si[e];
            ss += y1[s][e] * y1[s][e] + y2[s][e] * y2[s][e];
        }
    }
    const float r = rsqrtf(warp_sum(ss) / dim + eps);
    FOR_EACH_PAIR(s, j) {
        put_pair(x + j, y1[s][0] * r, y1[s][1] * r);
        put_pair(x + half + j, y2[s][0] * r, y2[s][1] * r);
    }
    if (lane == 0) rstd[w] = r;
}

// The gradient of the fused q|k|v projection, written over the forward's output z (which
// it reads first), from the attention's gradients of q, k and v (each (batch, time,
// heads, dim) in elements' strides `s*[3]`, unit stride in dim): through the norm (from
// z and rstd: dy = rstd (dz - z mean(dz z))), then the inverse rotation
// (dx1 = dy1 cos - dy2 sin, dx2 = dy1 sin + dy2 cos); v's is copied.
extern "C" __global__ void rope_norm_backward(const bf16* gq, long long sqb, long long sqt, long long sqh,
                                              const bf16* gk, long long skb, long long skt, long long skh,
                                              const bf16* gv, long long svb, long long svt, long long svh,
                                              bf16* qkv, const float* rstd, const bf16* cos, const bf16* sin,
                                              int tokens, int time, int heads, int kv_heads, int dim) {
    const int all = heads + 2 * kv_heads;
    const long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= (long long)tokens * all) return;
    const int token = (int)(w / all), head = (int)(w % all), half = dim / 2;
    const int b = token / time, t = token % time;
    bf16* z = qkv + w * dim;
    if (head >= heads + kv_heads) {
        const bf16* g = gv + b * svb + t * svt + (head - heads - kv_heads) * svh;
        for (int j = 2 * lane; j < dim; j += 64) *reinterpret_cast<unsigned*>(z + j) = pair(g + j);
        return;
    }
    const bf16* g = head < heads ? gq + b * sqb + t * sqt + head * sqh
                                 : gk + b * skb + t * skt + (head - heads) * skh;
    unsigned g1[MAX_PAIR_STEPS], g2[MAX_PAIR_STEPS], z1[MAX_PAIR_STEPS], z2[MAX_PAIR_STEPS];
    float dot = 0.f;
    FOR_EACH_PAIR(s, j) {
        g1[s] = pair(g + j);
        g2[s] = pair(g + half + j);
        z1[s] = pair(z + j);
        z2[s] = pair(z + half + j);
        dot += lo(g1[s]) * lo(z1[s]) + hi(g1[s]) * hi(z1[s]) + lo(g2[s]) * lo(z2[s]) + hi(g2[s]) * hi(z2[s]);
    }
    const float mean = warp_sum(dot) / dim, r = rstd[(long long)token * (heads + kv_heads) + head];
    const bf16 *c = cos + t * half, *sn = sin + t * half;
    FOR_EACH_PAIR(s, j) {
        const unsigned cw = pair(c + j), sw = pair(sn + j);
        const float co[2] = {lo(cw), hi(cw)}, si[2] = {lo(sw), hi(sw)};
        const float gg1[2] = {lo(g1[s]), hi(g1[s])}, gg2[2] = {lo(g2[s]), hi(g2[s])};
        const float zz1[2] = {lo(z1[s]), hi(z1[s])}, zz2[2] = {lo(z2[s]), hi(z2[s])};
        float d1[2], d2[2];
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const float dy1 = r * (gg1[e] - zz1[e] * mean);
            const float dy2 = r * (gg2[e] - zz2[e] * mean);
            d1[e] = dy1 * co[e] - dy2 * si[e];
            d2[e] = dy1 * si[e] + dy2 * co[e];
        }
        put_pair(z + j, d1[0], d1[1]);
        put_pair(z + half + j, d2[0], d2[1]);
    }
}

// ---- relu^2, in place ------------------------------------------------------------------

// u <- max(u, 0)^2 over `n` elements (`n` a multiple of VEC).
template <int VEC>
__device__ void relu2_forward(bf16* u, long long n) {
    float v[VEC];
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
         i += (long long)gridDim.x * blockDim.x * VEC) {
        load<VEC>(u + i, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) v[j] = v[j] > 0.f ? v[j] * v[j] : 0.f;
        store<VEC>(u + i, v);
    }
}

// From the output a = relu(u)^2: du = da * 2 relu(u) = da * 2 sqrt(a), written over da.
template <int VEC>
__device__ void relu2_backward(bf16* da, const bf16* a, long long n) {
    float g[VEC], v[VEC];
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
         i += (long long)gridDim.x * blockDim.x * VEC) {
        load<VEC>(da + i, g);
        load<VEC>(a + i, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) g[j] *= 2.f * sqrtf(v[j]);
        store<VEC>(da + i, g);
    }
}

extern "C" __global__ void relu2_forward_v8(bf16* u, long long n) { relu2_forward<8>(u, n); }
extern "C" __global__ void relu2_forward_v1(bf16* u, long long n) { relu2_forward<1>(u, n); }
extern "C" __global__ void relu2_backward_v8(bf16* da, const bf16* a, long long n) { relu2_backward<8>(da, a, n); }
extern "C" __global__ void relu2_backward_v1(bf16* da, const bf16* a, long long n) { relu2_backward<1>(da, a, n); }

// ---- SwiGLU -------------------------------------------------------------------------------
//
// `fc` is (rows, 2 hidden): the gate and the value side by side. a = silu(gate) value is
// (rows, hidden). `VEC` divides `hidden`, so a vector never crosses a row.
template <int VEC>
__device__ void swiglu_forward(const bf16* fc, bf16* a, long long rows, long long hidden) {
    float g[VEC], v[VEC];
    const long long n = rows * hidden;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
         i += (long long)gridDim.x * blockDim.x * VEC) {
        const bf16* gate = fc + i + (i / hidden) * hidden;
        load<VEC>(gate, g);
        load<VEC>(gate + hidden, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) g[j] = g[j] / (1.f + expf(-g[j])) * v[j];
        store<VEC>(a + i, g);
    }
}

// From the gradient of a: d gate = da value s (1 + gate (1 - s)) and d value = da gate s,
// with s = sigmoid(gate), side by side in `dfc` (rows, 2 hidden).
template <int VEC>
__device__ void swiglu_backward(const bf16* da, const bf16* fc, bf16* dfc, long long rows,
                                long long hidden) {
    float d[VEC], g[VEC], v[VEC];
    const long long n = rows * hidden;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
         i += (long long)gridDim.x * blockDim.x * VEC) {
        const long long at = i + (i / hidden) * hidden;
        load<VEC>(da + i, d);
        load<VEC>(fc + at, g);
        load<VEC>(fc + at + hidden, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            const float s = 1.f / (1.f + expf(-g[j]));
            const float dgate = d[j] * v[j] * s * (1.f + g[j] * (1.f - s));
            v[j] = d[j] * g[j] * s;
            g[j] = dgate;
        }
        store<VEC>(dfc + at, g);
        store<VEC>(dfc + at + hidden, v);
    }
}

extern "C" __global__ void swiglu_forward_v8(const bf16* fc, bf16* a, long long rows, long long hidden) {
    swiglu_forward<8>(fc, a, rows, hidden);
}
extern "C" __global__ void swiglu_forward_v1(const bf16* fc, bf16* a, long long rows, long long hidden) {
    swiglu_forward<1>(fc, a, rows, hidden);
}
extern "C" __global__ void swiglu_backward_v8(const bf16* da, const bf16* fc, bf16* dfc, long long rows,
                                              long long hidden) {
    swiglu_backward<8>(da, fc, dfc, rows, hidden);
}
extern "C" __global__ void swiglu_backward_v1(const bf16* da, const bf16* fc, bf16* dfc, long long rows,
                                              long long hidden) {
    swiglu_backward<1>(da, fc, dfc, rows, hidden);
}

// ---- Softcapped cross-entropy, forward and backward in one kernel ----------------------
//
// One block per row of `vocab` bf16 logits l. z = cap tanh(l / cap) lies in [-cap, cap],
// so exp(z - cap) neither overflows nor vanishes: no max pass is needed. Writes the row's
// loss (logsumexp(z) - z[target]) and, over the logits, their gradient
// scale (softmax(z) - onehot(target)) (1 - tanh^2). Rows whose target is negative
// (ignored) get loss 0 and gradient 0.
template <int VEC>
__device__ void softcap_cross_entropy(bf16* logits, const long long* targets, float* losses, int vocab,
                                      float cap, float scale) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    bf16* l = logits + row * vocab;
    const long long target = targets[row];
    const float inv = 1.f / cap;
    float v[VEC], sum = 0.f;
    if (target < 0) {
        for (int i = threadIdx.x * VEC; i < vocab; i += blockDim.x * VEC) {
#pragma unroll
            for (int j = 0; j < VEC; j++) v[j] = 0.f;
            store<VEC>(l + i, v);
        }
        if (threadIdx.x == 0) losses[row] = 0.f;
        return;
    }
    for (int i = threadIdx.x * VEC; i < vocab; i += blockDim.x * VEC) {
        load<VEC>(l + i, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) sum += __expf(cap * fast_tanh(v[j] * inv) - cap);
    }
    sum = block_sum(sum, scratch);
    const float z_target = cap * fast_tanh(to_f(l[target]) * inv);
    if (threadIdx.x == 0) losses[row] = cap + __logf(sum) - z_target;
    __syncthreads();  // everyone has read l[target] before it is overwritten
    const float norm = scale / sum;
    for (int i = threadIdx.x * VEC; i < vocab; i += blockDim.x * VEC) {
        load<VEC>(l + i, v);
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            const float t = fast_tanh(v[j] * inv);
            const float p = __expf(cap * t - cap) * norm - (i + j == target ? scale : 0.f);
            v[j] = p * (1.f - t * t);
        }
        store<VEC>(l + i, v);
    }
}

extern "C" __global__ void softcap_cross_entropy_v8(bf16* logits, const long long* targets, float* losses,
                                                    int vocab, float cap, float scale) {
    softcap_cross_entropy<8>(logits, targets, losses, vocab, cap, scale);
}
extern "C" __global__ void softcap_cross_entropy_v1(bf16* logits, const long long* targets, float* losses,
                                                    int vocab, float cap, float scale) {
    softcap_cross_entropy<1>(logits, targets, losses, vocab, cap, scale);
}

// ---- Muon's passes around Newton-Schulz, over fp32 weights and momentum -----------------
//
// m <- m + (1 - beta) (g - m), and the Nesterov blend g + beta (m - g) in bf16, whose range
// holds any gradient; g is the gradient times *g_scale (its clipping, a device value: the
// step never waits for the gradient norm). A scale of 0 skips the step (a gradient or loss
// that is not finite): m is left as it is and the blend is 0, which adds nothing.
extern "C" __global__ void muon_momentum(const float* g, const float* g_scale, float* m, bf16* blend, long long n,
                                         float beta) {
    const float scale = *g_scale;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        if (!(scale > 0.f)) {
            blend[i] = 0;
            continue;
        }
        const float gi = g[i] * scale;
        const float mi = m[i] + (1.f - beta) * (gi - m[i]);
        m[i] = mi;
        blend[i] = to_bf(gi + beta * (mi - gi));
    }
}

// Each matrix of a stack of bf16 ones divided by its Frobenius norm (`norms`, one bf16 a
// matrix, of `per_matrix` elements) into fp16, which Newton-Schulz's Gram form takes and
// whose range holds the normalized values, not always a gradient's.
extern "C" __global__ void normalize_to_half(const bf16* x, const bf16* norms, unsigned short* out,
                                             long long per_matrix, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = to_f(x[i]) / (to_f(norms[i / per_matrix]) + 1e-7f);
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        out[i] = h;
    }
}

// p <- p + scale u: the orthogonalized update, in fp16 (Newton-Schulz's precision), added
// to fp32 weights.
extern "C" __global__ void muon_update(float* p, const unsigned short* u, long long n, float scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float ui;
        asm("cvt.f32.f16 %0, %1;" : "=f"(ui) : "h"(u[i]));
        p[i] += scale * ui;
    }
}

// ---- AdamW, one pass over fp32 weights and their state --------------------------------
//
// m <- m + (1 - beta1) (g - m); v <- beta2 v + (1 - beta2) g^2;
// p <- p decay - lr / correction1 * m / (sqrt(v) / correction2 + eps), with
// decay = 1 - lr weight_decay, correction1 = 1 - beta1^t, correction2 = sqrt(1 - beta2^t);
// g is the gradient times *g_scale, and a scale of 0 skips the step, as in muon_momentum.
extern "C" __global__ void adamw_step(float* p, const float* g, const float* g_scale, float* m, float* v, long long n,
                                      float lr, float beta1, float beta2, float eps, float decay, float correction1,
                                      float correction2) {
    const float scale = *g_scale;
    if (!(scale > 0.f)) return;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * scale, mi = m[i] + (1.f - beta1) * (gi - m[i]);
        const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - lr / correction1 * mi / (sqrtf(vi) / correction2 + eps);
    }
}

// ---- Attention of a decoding step: one new token per row over its slot of the KV cache --
//
// Split over the keys (flash-decoding), so that a few long rows still fill the GPU: block
// `(row * heads + head) * splits + split` attends to keys [split * chunk, (split + 1) * chunk)
// of cache slot rows[row], cut at the row's position pos[row] (so only the filled part of
// the cache is read), and writes its share of the output unnormalized with its logits'
// maximum and its sum of exponentials; decode_attention_merge combines the splits. Logits
// are base 2 (q is scaled by scale * log2(e)). A lane holds pairs of bf16 of q and of its
// running output; each warp takes DECODE_KEYS keys at a time. head dim <= 2 * 32 * DECODE_PAIRS.

#define DECODE_PAIRS 4
#define DECODE_KEYS 4
#define DECODE_WARPS 4


extern "C" __global__ void decode_attention_split(const bf16* q, const bf16* keys, const bf16* values,
                                                  const long long* rows, const long long* pos, float* part,
                                                  float* stats, int heads, int kv, int capacity, int dim,
                                                  int chunk, int splits, float scale) {
    __shared__ float warp_max[DECODE_WARPS], warp_sum_[DECODE_WARPS];
    __shared__ float warp_out[DECODE_WARPS][2 * 32 * DECODE_PAIRS];
    const float neg_inf = __int_as_float(0xff800000);
    const long long rh = blockIdx.x / splits;
    const int split = blockIdx.x % splits;
    const int row = (int)(rh / heads), head = (int)(rh % heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int start = split * chunk;
    const int end = min(start + chunk, (int)pos[row] + 1);
    float* out = part + (rh * splits + split) * dim;
    float* stat = stats + (rh * splits + split) * 2;
    if (start >= end) {
        if (threadIdx.x == 0) {
            stat[0] = neg_inf;
            stat[1] = 0.f;
        }
        return;
    }
    const int pairs = dim / 2;
    const long long base = ((long long)rows[row] * kv + head / (heads / kv)) * capacity * pairs;
    const unsigned* K = reinterpret_cast<const unsigned*>(keys) + base;
    const unsigned* V = reinterpret_cast<const unsigned*>(values) + base;
    const unsigned* Q = reinterpret_cast<const unsigned*>(q) + rh * pairs;
    float qa[DECODE_PAIRS], qb[DECODE_PAIRS], oa[DECODE_PAIRS], ob[DECODE_PAIRS];
#pragma unroll
    for (int i = 0; i < DECODE_PAIRS; i++) {
        const int p = i * 32 + lane;
        const unsigned w = p < pairs ? Q[p] : 0u;
        qa[i] = lo(w) * scale;
        qb[i] = hi(w) * scale;
        oa[i] = ob[i] = 0.f;
    }
    float m = neg_inf, l = 0.f;
    for (int t0 = start + warp * DECODE_KEYS; t0 < end; t0 += DECODE_WARPS * DECODE_KEYS) {
        float s[DECODE_KEYS];
#pragma unroll
        for (int j = 0; j < DECODE_KEYS; j++) {
            s[j] = 0.f;
            if (t0 + j < end) {
                const unsigned* k = K + (long long)(t0 + j) * pairs;
#pragma unroll
                for (int i = 0; i < DECODE_PAIRS; i++) {
                    const int p = i * 32 + lane;
                    if (p < pairs) {
                        const unsigned w = k[p];
                        s[j] += qa[i] * lo(w) + qb[i] * hi(w);
                    }
                }
            }
        }
        float top = m;
#pragma unroll
        for (int j = 0; j < DECODE_KEYS; j++) {
            s[j] = warp_sum(s[j]);
            if (t0 + j < end) top = fmaxf(top, s[j]);
        }
        const float c = exp2f(m - top);  // 0 while m is -inf: top is finite (key t0 exists)
        l *= c;
#pragma unroll
        for (int i = 0; i < DECODE_PAIRS; i++) {
            oa[i] *= c;
            ob[i] *= c;
        }
#pragma unroll
        for (int j = 0; j < DECODE_KEYS; j++) {
            if (t0 + j < end) {
                const float e = exp2f(s[j] - top);
                l += e;
                const unsigned* v = V + (long long)(t0 + j) * pairs;
#pragma unroll
                for (int i = 0; i < DECODE_PAIRS; i++) {
                    const int p = i * 32 + lane;
                    if (p < pairs) {
                        const unsigned w = v[p];
                        oa[i] += e * lo(w);
                        ob[i] += e * hi(w);
                    }
                }
            }
        }
        m = top;
    }
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum_[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < DECODE_PAIRS; i++) {
        const int p = i * 32 + lane;
        if (p < pairs) {
            warp_out[warp][2 * p] = oa[i];
            warp_out[warp][2 * p + 1] = ob[i];
        }
    }
    __syncthreads();
    float top = neg_inf;
    for (int w = 0; w < DECODE_WARPS; w++) top = fmaxf(top, warp_max[w]);  // warp 0 has a key
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < DECODE_WARPS; w++)
            if (warp_max[w] != neg_inf) o += warp_out[w][d] * exp2f(warp_max[w] - top);
        out[d] = o;
    }
    if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int w = 0; w < DECODE_WARPS; w++)
            if (warp_max[w] != neg_inf) sum += warp_sum_[w] * exp2f(warp_max[w] - top);
        stat[0] = top;
        stat[1] = sum;
    }
}

// One warp per (row, head): the splits' shares weighted by exp2(their max - the overall
// max), divided by the weighted sum. Split 0 always holds key 0, so the max is finite.
extern "C" __global__ void decode_attention_merge(const float* part, const float* stats, bf16* y, int row_heads,
                                                  int dim, int splits) {
    const int rh = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (rh >= row_heads) return;
    const float neg_inf = __int_as_float(0xff800000);
    const float* st = stats + (long long)rh * splits * 2;
    float top = neg_inf;
    for (int s = 0; s < splits; s++) top = fmaxf(top, st[2 * s]);
    float sum = 0.f;
    for (int s = 0; s < splits; s++)
        if (st[2 * s] != neg_inf) sum += st[2 * s + 1] * exp2f(st[2 * s] - top);
    const float inv = 1.f / sum;
    const float* pr = part + (long long)rh * splits * dim;
    for (int d = lane; d < dim; d += 32) {
        float o = 0.f;
        for (int s = 0; s < splits; s++)
            if (st[2 * s] != neg_inf) o += pr[(long long)s * dim + d] * exp2f(st[2 * s] - top);
        y[(long long)rh * dim + d] = to_bf(o * inv);
    }
}
