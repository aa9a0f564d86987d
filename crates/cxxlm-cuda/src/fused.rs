//! The fused steps of the GPT's explicit forward and backward passes (`kernels.cu`): on a
//! GPU, run-time compiled CUDA kernels enqueued on torch's current stream; elsewhere, the
//! same arithmetic in plain tch operations, which is also the reference the kernels are
//! tested against. Shapes are the model's: rows of `width`, heads of `dim`, tokens in
//! (batch, time) order.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::nvrtc::{self, Arg, Function};

const SOURCE: &str = include_str!("kernels.cu");

const KERNELS: [&str; 22] = [
    "rmsnorm_forward_v8",
    "rmsnorm_forward_v1",
    "rmsnorm_backward_v8",
    "rmsnorm_backward_v1",
    "rope_norm_forward",
    "rope_norm_backward",
    "relu2_forward_v8",
    "relu2_forward_v1",
    "relu2_backward_v8",
    "relu2_backward_v1",
    "swiglu_forward_v8",
    "swiglu_forward_v1",
    "swiglu_backward_v8",
    "swiglu_backward_v1",
    "softcap_cross_entropy_v8",
    "softcap_cross_entropy_v1",
    "muon_momentum",
    "normalize_to_half",
    "muon_update",
    "adamw_step",
    "decode_attention_split",
    "decode_attention_merge",
];

/// Head dimensions the rotary kernels take (`MAX_PAIR_STEPS` pairs of 64 per lane).
pub const MAX_HEAD_DIM: usize = 512;

/// Head dimensions the decoding attention kernel takes (`DECODE_PAIRS` pairs per lane).
pub const MAX_DECODE_HEAD_DIM: usize = 256;

/// Keys a block of the decoding attention takes: fewer when there are few rows x heads,
/// so that the GPU still gets enough blocks.
fn decode_chunk(row_heads: i64) -> i64 {
    match row_heads {
        512.. => 256,
        128.. => 128,
        _ => 64,
    }
}

/// The kernels loaded on one device.
pub struct Kernels {
    device: usize,
    functions: Vec<Function>,
}

/// Compiles the kernels for compute capability `arch` (90: H100, H200).
pub fn compile(arch: u32) -> Result<Vec<u8>, String> {
    nvrtc::compile(SOURCE, arch)
}

impl Kernels {
    /// The kernels of CUDA device `device`, compiled and loaded on first use.
    pub fn on(device: usize) -> Result<&'static Kernels, String> {
        static LOADED: Mutex<Vec<(usize, &'static Kernels)>> = Mutex::new(Vec::new());
        let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, k)) = loaded.iter().find(|(d, _)| *d == device) {
            return Ok(k);
        }
        if crate::current_stream(device).is_none() {
            return Err(
                "this build has no CUDA shim (libtorch without CUDA, or no CUDA headers)".into(),
            );
        }
        let cubin = compile(nvrtc::compute_capability(device)?)?;
        let functions = nvrtc::load(device, &cubin, &KERNELS)?;
        let kernels: &'static Kernels = Box::leak(Box::new(Kernels { device, functions }));
        loaded.push((device, kernels));
        Ok(kernels)
    }

    fn launch(&self, name: &str, grid: usize, block: usize, args: &[Arg]) {
        let index = KERNELS
            .iter()
            .position(|k| *k == name)
            .expect("a known kernel");
        let stream = crate::current_stream(self.device).expect("a CUDA build");
        // SAFETY: torch's stream on this device; each wrapper checked its tensors' kinds,
        // shapes and contiguity against what its kernel reads and writes.
        unsafe { self.functions[index].launch(stream, grid as u32, block as u32, args) }
            .unwrap_or_else(|e| panic!("kernel {name}: {e}"));
    }
}

fn ptr(t: &Tensor) -> Arg {
    Arg::Ptr(t.data_ptr())
}

/// Whether 8-element (16-byte) loads fit rows of `cols` in all of `tensors`.
fn vec8(cols: i64, tensors: &[&Tensor]) -> bool {
    cols % 8 == 0
        && tensors
            .iter()
            .all(|t| (t.data_ptr() as usize).is_multiple_of(16))
}

fn variant(name: &str, wide: bool) -> String {
    format!("{name}_{}", if wide { "v8" } else { "v1" })
}

/// Blocks of 256 threads for `n` elements, each thread taking 8 (`wide`) or 1.
fn elementwise_grid(n: i64, wide: bool) -> usize {
    (n as usize).div_ceil(256 * if wide { 8 } else { 1 })
}

/// Warps of 32 threads, eight to a block.
fn warp_grid(warps: i64) -> usize {
    (warps as usize).div_ceil(8)
}

/// Whether a step's gradient scale says to skip it; the reference reads it on the host.
fn skips(grad_scale: &Tensor) -> bool {
    let scale = grad_scale.double_value(&[0]);
    scale.is_nan() || scale <= 0.0
}

fn expect_fp32(t: &Tensor, numel: i64, what: &str) {
    assert!(
        t.kind() == Kind::Float && t.is_contiguous() && t.numel() as i64 == numel,
        "{what}: contiguous fp32 of {numel} elements, got {:?} {:?}",
        t.kind(),
        t.size()
    );
}

fn expect_bf16(t: &Tensor, what: &str) {
    assert!(
        t.kind() == Kind::BFloat16 && t.is_contiguous(),
        "{what}: the fused kernels take contiguous bf16 tensors, got {:?} {:?}",
        t.kind(),
        t.size()
    );
}

/// The fused steps, on the device of the tensors they are given.
#[derive(Clone, Copy)]
pub enum Fused {
    Kernels(&'static Kernels),
    /// Plain tch operations (fp32 arithmetic, results in the inputs' precision).
    Reference,
}

impl Fused {
    /// Kernels on a CUDA device (or why they cannot run), the reference elsewhere.
    pub fn for_device(device: Device) -> Result<Fused, String> {
        match device {
            Device::Cuda(index) => Kernels::on(index).map(Fused::Kernels),
            _ => Ok(Fused::Reference),
        }
    }

    /// Parameter-free RMSNorm over the last dimension: `(x / rms(x), 1 / rms(x))`, the
    /// second with one value per row in fp32.
    pub fn rmsnorm(&self, x: &Tensor, eps: f64) -> (Tensor, Tensor) {
        let size = x.size();
        let cols = *size.last().expect("a tensor with dimensions");
        let rows = x.numel() as i64 / cols;
        match self {
            Fused::Reference => {
                let xf = x.to_kind(Kind::Float);
                let r = (xf.square().mean_dim(-1, true, Kind::Float) + eps).rsqrt();
                let rstd = r.squeeze_dim(-1);
                ((xf * r).to_kind(x.kind()), rstd)
            }
            Fused::Kernels(k) => {
                expect_bf16(x, "rmsnorm");
                let y = x.empty_like();
                let rstd = Tensor::empty(&size[..size.len() - 1], (Kind::Float, x.device()));
                let name = variant("rmsnorm_forward", vec8(cols, &[x, &y]));
                let args = [
                    ptr(x),
                    ptr(&y),
                    ptr(&rstd),
                    Arg::I32(rows as i32),
                    Arg::I32(cols as i32),
                    Arg::F32(eps as f32),
                ];
                k.launch(&name, warp_grid(rows), 256, &args);
                (y, rstd)
            }
        }
    }

    /// The input's gradient from the output's `dy`, with the norm's output `y` and `rstd`;
    /// added into `residual` (and returned) when given.
    pub fn rmsnorm_backward(
        &self,
        dy: &Tensor,
        y: &Tensor,
        rstd: &Tensor,
        residual: Option<&Tensor>,
    ) -> Tensor {
        let cols = *y.size().last().expect("a tensor with dimensions");
        let rows = y.numel() as i64 / cols;
        match self {
            Fused::Reference => {
                let (g, yf) = (dy.to_kind(Kind::Float), y.to_kind(Kind::Float));
                let mean = (&g * &yf).mean_dim(-1, true, Kind::Float);
                let dx = rstd.unsqueeze(-1) * (g - yf * mean);
                match residual {
                    Some(r) => {
                        let mut sum = r.shallow_clone();
                        sum.copy_(&(dx + r.to_kind(Kind::Float)));
                        sum
                    }
                    None => dx.to_kind(y.kind()),
                }
            }
            Fused::Kernels(k) => {
                for (t, what) in [(dy, "rmsnorm gradient"), (y, "rmsnorm output")] {
                    expect_bf16(t, what);
                }
                let dx = match residual {
                    Some(r) => {
                        expect_bf16(r, "residual gradient");
                        r.shallow_clone()
                    }
                    None => y.empty_like(),
                };
                let wide = vec8(cols, &[dy, y, &dx]);
                let args = [
                    ptr(dy),
                    ptr(y),
                    ptr(rstd),
                    residual.map_or(Arg::Ptr(std::ptr::null_mut()), ptr),
                    ptr(&dx),
                    Arg::I32(rows as i32),
                    Arg::I32(cols as i32),
                ];
                k.launch(
                    &variant("rmsnorm_backward", wide),
                    warp_grid(rows),
                    256,
                    &args,
                );
                dx
            }
        }
    }

    /// Rotary positions and RMSNorm on the q and k heads of `qkv (B, T, heads + 2 kv_heads,
    /// dim)`, in place (v is left as it is); returns `rstd (B, T, heads + kv_heads)`.
    /// `cos` and `sin` are `(T', dim / 2)` with T' >= T, in the compute precision.
    pub fn rope_norm_(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: i64,
        eps: f64,
    ) -> Tensor {
        let [b, t, all, dim] = qkv.size()[..] else {
            panic!("rope_norm takes (B, T, heads, dim), got {:?}", qkv.size())
        };
        let kv = (all - heads) / 2;
        match self {
            Fused::Reference => {
                let qk = qkv.narrow(2, 0, heads + kv);
                let x = qk.to_kind(Kind::Float);
                let (c, s) = rotary_tables(cos, sin, t);
                let (x1, x2) = (x.narrow(3, 0, dim / 2), x.narrow(3, dim / 2, dim / 2));
                let y = Tensor::cat(&[&x1 * &c + &x2 * &s, &x2 * &c - &x1 * &s], 3);
                let r = (y.square().mean_dim(-1, true, Kind::Float) + eps).rsqrt();
                qk.shallow_clone().copy_(&(y * &r));
                r.squeeze_dim(-1)
            }
            Fused::Kernels(k) => {
                expect_bf16(qkv, "q|k|v");
                expect_bf16(cos, "cos");
                expect_bf16(sin, "sin");
                assert!(
                    dim % 4 == 0 && dim as usize <= MAX_HEAD_DIM,
                    "head dim {dim}"
                );
                let rstd = Tensor::empty([b, t, heads + kv], (Kind::Float, qkv.device()));
                let args = [
                    ptr(qkv),
                    ptr(cos),
                    ptr(sin),
                    ptr(&rstd),
                    Arg::I32((b * t) as i32),
                    Arg::I32(t as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(kv as i32),
                    Arg::I32(dim as i32),
                    Arg::F32(eps as f32),
                ];
                k.launch(
                    "rope_norm_forward",
                    warp_grid(b * t * (heads + kv)),
                    256,
                    &args,
                );
                rstd
            }
        }
    }

    /// The gradient of the `qkv` that [`Fused::rope_norm_`] rewrote, written over it, from
    /// those of the attention's q, k and v (`(B, T, heads, dim)` views, any strides but
    /// unit stride in dim) and that call's `rstd`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_norm_backward_(
        &self,
        gq: &Tensor,
        gk: &Tensor,
        gv: &Tensor,
        qkv: &Tensor,
        rstd: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) {
        let [b, t, all, dim] = qkv.size()[..] else {
            panic!(
                "rope_norm_backward takes (B, T, heads, dim), got {:?}",
                qkv.size()
            )
        };
        let (heads, kv) = (gq.size()[2], gk.size()[2]);
        assert_eq!(heads + 2 * kv, all, "q, k and v heads against q|k|v");
        match self {
            Fused::Reference => {
                let g = Tensor::cat(&[gq, gk], 2).to_kind(Kind::Float);
                let z = qkv.narrow(2, 0, heads + kv).to_kind(Kind::Float);
                let r = rstd.unsqueeze(-1);
                let mean = (&g * &z).mean_dim(-1, true, Kind::Float);
                let dy = r * (g - z * mean);
                let (c, s) = rotary_tables(cos, sin, t);
                let (d1, d2) = (dy.narrow(3, 0, dim / 2), dy.narrow(3, dim / 2, dim / 2));
                let dx = Tensor::cat(&[&d1 * &c - &d2 * &s, &d1 * &s + &d2 * &c], 3);
                qkv.shallow_clone().copy_(&Tensor::cat(
                    &[dx.to_kind(qkv.kind()), gv.to_kind(qkv.kind())],
                    2,
                ));
            }
            Fused::Kernels(k) => {
                expect_bf16(qkv, "q|k|v");
                for (g, what) in [(gq, "q gradient"), (gk, "k gradient"), (gv, "v gradient")] {
                    // The kernel reads bf16 in aligned pairs.
                    let s = g.stride();
                    assert!(
                        g.kind() == Kind::BFloat16
                            && s[3] == 1
                            && s[..3].iter().all(|s| s % 2 == 0)
                            && (g.data_ptr() as usize).is_multiple_of(4),
                        "{what}: bf16 with unit stride in dim, even strides, 4-byte aligned"
                    );
                }
                let mut args = Vec::new();
                for g in [gq, gk, gv] {
                    let s = g.stride();
                    args.extend([ptr(g), Arg::I64(s[0]), Arg::I64(s[1]), Arg::I64(s[2])]);
                }
                args.extend([
                    ptr(qkv),
                    ptr(rstd),
                    ptr(cos),
                    ptr(sin),
                    Arg::I32((b * t) as i32),
                    Arg::I32(t as i32),
                    Arg::I32(heads as i32),
                    Arg::I32(kv as i32),
                    Arg::I32(dim as i32),
                ]);
                k.launch("rope_norm_backward", warp_grid(b * t * all), 256, &args);
            }
        }
    }

    /// `u <- relu(u)^2`, in place.
    pub fn relu2_(&self, u: &Tensor) {
        match self {
            Fused::Reference => {
                let a = u.to_kind(Kind::Float).relu().square();
                u.shallow_clone().copy_(&a);
            }
            Fused::Kernels(k) => {
                expect_bf16(u, "relu^2 input");
                let n = u.numel() as i64;
                let wide = vec8(n, &[u]);
                let name = variant("relu2_forward", wide);
                k.launch(
                    &name,
                    elementwise_grid(n, wide),
                    256,
                    &[ptr(u), Arg::I64(n)],
                );
            }
        }
    }

    /// `da <- da * 2 relu(u)`, in place, from relu^2's output `a`.
    pub fn relu2_backward_(&self, da: &Tensor, a: &Tensor) {
        match self {
            Fused::Reference => {
                let du = da.to_kind(Kind::Float) * a.to_kind(Kind::Float).sqrt() * 2.0;
                da.shallow_clone().copy_(&du);
            }
            Fused::Kernels(k) => {
                expect_bf16(da, "relu^2 gradient");
                expect_bf16(a, "relu^2 output");
                let n = da.numel() as i64;
                let wide = vec8(n, &[da, a]);
                let args = [ptr(da), ptr(a), Arg::I64(n)];
                let name = variant("relu2_backward", wide);
                k.launch(&name, elementwise_grid(n, wide), 256, &args);
            }
        }
    }

    /// SwiGLU of `fc`, the gate and the value side by side `(.., 2 hidden)`:
    /// `silu(gate) * value`, in `fc`'s precision.
    pub fn swiglu(&self, fc: &Tensor) -> Tensor {
        match self {
            Fused::Reference => {
                let parts = fc.to_kind(Kind::Float).chunk(2, -1);
                (parts[0].silu() * &parts[1]).to_kind(fc.kind())
            }
            Fused::Kernels(k) => {
                expect_bf16(fc, "SwiGLU input");
                let (rows, hidden, mut shape) = halves(fc);
                *shape.last_mut().expect("dimensions") = hidden;
                let a = Tensor::empty(&shape, (Kind::BFloat16, fc.device()));
                let wide = vec8(hidden, &[fc, &a]);
                let args = [ptr(fc), ptr(&a), Arg::I64(rows), Arg::I64(hidden)];
                let name = variant("swiglu_forward", wide);
                k.launch(&name, elementwise_grid(rows * hidden, wide), 256, &args);
                a
            }
        }
    }

    /// The gradient of `fc` `(.., 2 hidden)` from that of SwiGLU's output `da`:
    /// `[da value silu'(gate), da silu(gate)]`, where `silu'(g) = s (1 + g (1 - s))`.
    pub fn swiglu_backward(&self, da: &Tensor, fc: &Tensor) -> Tensor {
        match self {
            Fused::Reference => {
                let parts = fc.to_kind(Kind::Float).chunk(2, -1);
                let (gate, value) = (&parts[0], &parts[1]);
                let da = da.to_kind(Kind::Float);
                let s = gate.sigmoid();
                let dsilu = &s * (gate * (1.0 - &s) + 1.0);
                let dgate = &da * value * dsilu;
                let dvalue = da * gate * s;
                Tensor::cat(&[dgate, dvalue], -1).to_kind(fc.kind())
            }
            Fused::Kernels(k) => {
                expect_bf16(da, "SwiGLU gradient");
                expect_bf16(fc, "SwiGLU input");
                let (rows, hidden, _) = halves(fc);
                assert_eq!(da.numel() as i64, rows * hidden, "SwiGLU gradient's size");
                let dfc = Tensor::empty(fc.size(), (Kind::BFloat16, fc.device()));
                let wide = vec8(hidden, &[da, fc, &dfc]);
                let args = [
                    ptr(da),
                    ptr(fc),
                    ptr(&dfc),
                    Arg::I64(rows),
                    Arg::I64(hidden),
                ];
                let name = variant("swiglu_backward", wide);
                k.launch(&name, elementwise_grid(rows * hidden, wide), 256, &args);
                dfc
            }
        }
    }

    /// Cross-entropy of softcapped logits `cap tanh(logits / cap)` `(rows, vocab)` against
    /// `targets (rows)` (negative: ignored): returns each row's loss (fp32) and writes
    /// `scale` x the gradient of their sum over `logits`.
    pub fn softcap_cross_entropy_(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        cap: f64,
        scale: f64,
    ) -> Tensor {
        let [rows, vocab] = logits.size()[..] else {
            panic!("logits are (rows, vocab), got {:?}", logits.size())
        };
        match self {
            Fused::Reference => {
                let t = (logits.to_kind(Kind::Float) / cap).tanh();
                let z = &t * cap;
                let valid = targets.ge(0);
                let target = targets.clamp_min(0).unsqueeze(1);
                let loss = (z.logsumexp([1], false) - z.gather(1, &target, false).squeeze_dim(1))
                    * valid.to_kind(Kind::Float);
                let onehot = z.zeros_like().scatter_value(1, &target, 1.0);
                let grad = (z.softmax(1, Kind::Float) - onehot)
                    * (1.0 - t.square())
                    * scale
                    * valid.to_kind(Kind::Float).unsqueeze(1);
                logits.shallow_clone().copy_(&grad);
                loss
            }
            Fused::Kernels(k) => {
                expect_bf16(logits, "logits");
                assert!(
                    targets.kind() == Kind::Int64
                        && targets.is_contiguous()
                        && targets.numel() as i64 == rows,
                    "targets: contiguous int64, one per row"
                );
                let losses = Tensor::empty([rows], (Kind::Float, logits.device()));
                let wide = vec8(vocab, &[logits]);
                let args = [
                    ptr(logits),
                    ptr(targets),
                    ptr(&losses),
                    Arg::I32(vocab as i32),
                    Arg::F32(cap as f32),
                    Arg::F32(scale as f32),
                ];
                k.launch(
                    &variant("softcap_cross_entropy", wide),
                    rows as usize,
                    512,
                    &args,
                );
                losses
            }
        }
    }

    /// Attention of one new token per row over a KV cache of slots `(slots, kv, capacity,
    /// dim)`: row `i`'s query `q[i] (heads, dim)` attends to the keys and values of slot
    /// `rows[i]` at positions `0..=pos[i]`, with logits scaled by `scale`; query head `h`
    /// reads kv head `h / (heads / kv)`. Returns `(n, heads, dim)` in q's precision.
    /// The kernels read only the filled positions; their shapes do not depend on
    /// `rows` and `pos`, so a captured step replays with new values.
    pub fn decode_attention(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        rows: &Tensor,
        pos: &Tensor,
        scale: f64,
    ) -> Tensor {
        let [n, heads, dim] = q.size()[..] else {
            panic!("decoding queries are (n, heads, dim), got {:?}", q.size())
        };
        let [_, kv, capacity, _] = keys.size()[..] else {
            panic!(
                "a KV cache is (slots, kv, capacity, dim), got {:?}",
                keys.size()
            )
        };
        match self {
            Fused::Reference => {
                let gathered = |x: &Tensor| {
                    x.index_select(0, rows)
                        .to_kind(Kind::Float)
                        .repeat_interleave_self_int(heads / kv, Some(1), None)
                };
                let (k, v) = (gathered(keys), gathered(values));
                let logits = q
                    .to_kind(Kind::Float)
                    .unsqueeze(2)
                    .matmul(&k.transpose(2, 3))
                    * scale;
                let later = Tensor::arange(capacity, (Kind::Int64, q.device()))
                    .view([1, capacity])
                    .gt_tensor(&pos.view([n, 1]))
                    .view([n, 1, 1, capacity]);
                let weights = logits
                    .masked_fill(&later, f64::NEG_INFINITY)
                    .softmax(-1, Kind::Float);
                weights.matmul(&v).squeeze_dim(2).to_kind(q.kind())
            }
            Fused::Kernels(k) => {
                for (t, what) in [(q, "queries"), (keys, "keys"), (values, "values")] {
                    expect_bf16(t, what);
                }
                assert!(
                    keys.size() == values.size()
                        && dim % 2 == 0
                        && dim as usize <= MAX_DECODE_HEAD_DIM
                        && heads % kv == 0,
                    "decoding attention: q {:?}, cache {:?}",
                    q.size(),
                    keys.size()
                );
                for (t, what) in [(rows, "rows"), (pos, "positions")] {
                    assert!(
                        t.kind() == Kind::Int64 && t.is_contiguous() && t.numel() as i64 == n,
                        "decoding attention {what}: contiguous int64, one per row"
                    );
                }
                let chunk = decode_chunk(n * heads);
                let splits = (capacity + chunk - 1) / chunk;
                let device = q.device();
                let part = Tensor::empty([n * heads, splits, dim], (Kind::Float, device));
                let stats = Tensor::empty([n * heads, splits, 2], (Kind::Float, device));
                let args = [
                    ptr(q),
                    ptr(keys),
                    ptr(values),
                    ptr(rows),
                    ptr(pos),
                    ptr(&part),
                    ptr(&stats),
                    Arg::I32(heads as i32),
                    Arg::I32(kv as i32),
                    Arg::I32(capacity as i32),
                    Arg::I32(dim as i32),
                    Arg::I32(chunk as i32),
                    Arg::I32(splits as i32),
                    Arg::F32((scale * std::f64::consts::LOG2_E) as f32),
                ];
                let blocks = (n * heads * splits) as usize;
                k.launch("decode_attention_split", blocks, 128, &args);
                let y = Tensor::empty([n, heads, dim], (Kind::BFloat16, device));
                let args = [
                    ptr(&part),
                    ptr(&stats),
                    ptr(&y),
                    Arg::I32((n * heads) as i32),
                    Arg::I32(dim as i32),
                    Arg::I32(splits as i32),
                ];
                k.launch("decode_attention_merge", warp_grid(n * heads), 256, &args);
                y
            }
        }
    }

    /// Muon's momentum `m <- m + (1 - beta) (g - m)`, in place, and the Nesterov blend
    /// `g + beta (m - g)` that Newton-Schulz orthogonalizes: fp32 here, bf16 from the
    /// kernel. `g` is `grad` times `grad_scale` (one fp32 element on the device: the
    /// clipping); a scale of 0 skips the step: the momentum stays, the blend is zeros.
    pub fn muon_momentum_(
        &self,
        grad: &Tensor,
        grad_scale: &Tensor,
        momentum: &Tensor,
        beta: f64,
    ) -> Tensor {
        match self {
            Fused::Reference if skips(grad_scale) => grad.zeros_like(),
            Fused::Reference => {
                let grad = grad * grad_scale;
                let _ = momentum.shallow_clone().lerp_(&grad, 1.0 - beta);
                grad.lerp(momentum, beta)
            }
            Fused::Kernels(k) => {
                let n = grad.numel() as i64;
                expect_fp32(grad, n, "Muon gradient");
                expect_fp32(grad_scale, 1, "gradient scale");
                expect_fp32(momentum, n, "Muon momentum");
                let blend = Tensor::empty(grad.size(), (Kind::BFloat16, grad.device()));
                let args = [
                    ptr(grad),
                    ptr(grad_scale),
                    ptr(momentum),
                    ptr(&blend),
                    Arg::I64(n),
                    Arg::F32(beta as f32),
                ];
                k.launch("muon_momentum", elementwise_grid(n, false), 256, &args);
                blend
            }
        }
    }

    /// Each matrix of the stack `x` (`[matrices, rows, cols]`) divided by its Frobenius
    /// norm, in `kind`: where Newton-Schulz starts. The kernel takes a contiguous bf16
    /// stack (Muon's blend) to fp16; tch does the rest, in `kind` or, for fp16, in fp32.
    pub fn normalize_matrices(&self, x: &Tensor, kind: Kind) -> Tensor {
        match self {
            Fused::Kernels(k)
                if x.kind() == Kind::BFloat16 && kind == Kind::Half && x.is_contiguous() =>
            {
                let n = x.numel() as i64;
                let norms = x.norm_scalaropt_dim(2, [-2, -1], false);
                let out = Tensor::empty(x.size(), (Kind::Half, x.device()));
                let args = [
                    ptr(x),
                    ptr(&norms),
                    ptr(&out),
                    Arg::I64(n / x.size()[0].max(1)),
                    Arg::I64(n),
                ];
                k.launch("normalize_to_half", elementwise_grid(n, false), 256, &args);
                out
            }
            _ => {
                // fp16 may not hold the input's values before the division.
                let x = x.to_kind(match kind {
                    Kind::Half => Kind::Float,
                    _ => kind,
                });
                let norm = x.norm_scalaropt_dim(2, [-2, -1], true);
                (x / (norm + 1e-7)).to_kind(kind)
            }
        }
    }

    /// `weights += scale * update`: Muon's orthogonalized update (any layout; the kernel
    /// reads it in fp16, Newton-Schulz's precision on GPUs) added to fp32 weights of its
    /// size.
    pub fn muon_update_(&self, weights: &Tensor, update: &Tensor, scale: f64) {
        match self {
            Fused::Reference => {
                let _ = weights
                    .shallow_clone()
                    .g_add_(&(update.to_kind(Kind::Float) * scale));
            }
            Fused::Kernels(k) => {
                let n = weights.numel() as i64;
                expect_fp32(weights, n, "Muon weights");
                let update = update.to_kind(Kind::Half).contiguous();
                assert_eq!(update.numel() as i64, n, "Muon update's size");
                let args = [
                    ptr(weights),
                    ptr(&update),
                    Arg::I64(n),
                    Arg::F32(scale as f32),
                ];
                k.launch("muon_update", elementwise_grid(n, false), 256, &args);
            }
        }
    }

    /// One AdamW update of fp32 weights `param` from `grad` times `grad_scale` (as in
    /// [`Fused::muon_momentum_`], 0 skipping it), with their moments `exp_avg` and
    /// `exp_avg_sq`, all in place (contiguous, same size).
    pub fn adamw_(
        &self,
        param: &Tensor,
        grad: &Tensor,
        grad_scale: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        s: &AdamwStep,
    ) {
        let [b1, b2] = s.betas;
        let correction1 = 1.0 - b1.powf(s.step);
        let correction2 = (1.0 - b2.powf(s.step)).sqrt();
        match self {
            Fused::Reference if skips(grad_scale) => {}
            Fused::Reference => {
                let grad = &(grad * grad_scale);
                let mut p = param.shallow_clone();
                if s.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - s.lr * s.weight_decay);
                }
                let _ = exp_avg.shallow_clone().lerp_(grad, 1.0 - b1);
                let mut v = exp_avg_sq.shallow_clone();
                let _ = v.g_mul_scalar_(b2);
                let _ = v.g_add_(&(grad.square() * (1.0 - b2)));
                let denom = (v.sqrt() / correction2) + s.eps;
                let _ = p.g_add_(&(exp_avg / denom * (-s.lr / correction1)));
            }
            Fused::Kernels(k) => {
                let n = param.numel();
                for (t, what) in [
                    (param, "weights"),
                    (grad, "gradient"),
                    (exp_avg, "exp_avg"),
                    (exp_avg_sq, "exp_avg_sq"),
                ] {
                    assert!(
                        t.kind() == Kind::Float && t.is_contiguous() && t.numel() == n,
                        "AdamW {what}: contiguous fp32 of the weights' size"
                    );
                }
                expect_fp32(grad_scale, 1, "gradient scale");
                let args = [
                    ptr(param),
                    ptr(grad),
                    ptr(grad_scale),
                    ptr(exp_avg),
                    ptr(exp_avg_sq),
                    Arg::I64(n as i64),
                    Arg::F32(s.lr as f32),
                    Arg::F32(b1 as f32),
                    Arg::F32(b2 as f32),
                    Arg::F32(s.eps as f32),
                    Arg::F32((1.0 - s.lr * s.weight_decay) as f32),
                    Arg::F32(correction1 as f32),
                    Arg::F32(correction2 as f32),
                ];
                k.launch("adamw_step", elementwise_grid(n as i64, false), 256, &args);
            }
        }
    }
}

/// One AdamW update's settings; `step` counts from 1.
pub struct AdamwStep {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub step: f64,
}

/// Rows, and the width of each half, of a gate|value tensor `(.., 2 hidden)`; its shape.
fn halves(fc: &Tensor) -> (i64, i64, Vec<i64>) {
    let shape = fc.size();
    let cols = *shape.last().expect("dimensions");
    assert!(cols % 2 == 0, "SwiGLU input of odd width {cols}");
    (fc.numel() as i64 / cols.max(1), cols / 2, shape)
}

/// `cos` and `sin` `(T', dim / 2)` as fp32 `(1, T, 1, dim / 2)` for broadcasting.
fn rotary_tables(cos: &Tensor, sin: &Tensor, t: i64) -> (Tensor, Tensor) {
    let half = cos.size()[1];
    let shape = [1, t, 1, half];
    (
        cos.narrow(0, 0, t).to_kind(Kind::Float).view(shape),
        sin.narrow(0, 0, t).to_kind(Kind::Float).view(shape),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: every kernel compiles for Hopper and Ampere on any host.
    #[cfg(cxxlm_cuda)]
    #[test]
    fn kernels_compile_for_hopper_and_ampere() {
        for arch in [90, 80] {
            let cubin = compile(arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "a cubin is an ELF image");
            let text = String::from_utf8_lossy(&cubin);
            for name in KERNELS {
                assert!(text.contains(name), "sm_{arch} lacks {name}");
            }
        }
    }
}
