//! Causal self-attention whose backward is called explicitly: on a GPU, the cuDNN or flash
//! kernel that PyTorch's SDPA would pick (through `shim.cpp`, which keeps the statistics
//! its backward needs); elsewhere, the plain softmax(q k^T / sqrt(d)) v, recomputed for the
//! backward. q is `(B, H, T, D)`, k and v `(B, H_kv, T, D)` (H a multiple of H_kv).
//!
//! With [`Segments`] (examples packed side by side in a batch's rows), each token attends
//! only to the earlier tokens of its own segment: on a GPU, flash attention's
//! variable-length kernel over the batch's tokens as one sequence cut at the segments'
//! starts; elsewhere, the plain attention with a block-diagonal causal mask. Those calls
//! take token-major `(B, T, H, D)` views.

use tch::{Kind, Tensor};

/// What the backward needs besides q, k, v and the output.
pub enum Saved {
    #[cfg(cxxlm_cuda)]
    Cuda(*mut std::ffi::c_void),
    /// The plain attention, recomputed, with its mask `(B, 1, T, T)` when there are
    /// segments (None: causal).
    Recompute(Option<Tensor>),
}

/// Where the segments of a batch's `(B, T)` tokens lie; every row is cut into whole
/// segments.
pub struct Segments {
    /// The offset of each segment's first token among the flattened `B x T` tokens, then
    /// `B x T`: int32 on the device (flash attention's cumulative sequence lengths).
    pub starts: Tensor,
    /// The longest segment.
    pub longest: i64,
    /// Every token's segment number, `(B, T)` int64 (the reference's mask).
    pub ids: Tensor,
}

impl Segments {
    /// The segments of rows of `t` tokens, each row's lengths in order (summing to `t`).
    pub fn new(rows: &[Vec<usize>], t: usize, device: tch::Device) -> Segments {
        let mut starts = vec![0i32];
        let mut ids = Vec::with_capacity(rows.len() * t);
        for (r, lengths) in rows.iter().enumerate() {
            assert_eq!(
                lengths.iter().sum::<usize>(),
                t,
                "row {r}: segments of {lengths:?} do not cover {t} tokens"
            );
            for &n in lengths.iter().filter(|&&n| n > 0) {
                ids.extend(std::iter::repeat_n(starts.len() as i64 - 1, n));
                starts.push(starts[starts.len() - 1] + n as i32);
            }
        }
        let longest = rows.iter().flatten().copied().max().unwrap_or(0) as i64;
        Segments {
            starts: Tensor::from_slice(&starts).to_device(device),
            longest,
            ids: Tensor::from_slice(&ids)
                .view([rows.len() as i64, t as i64])
                .to_device(device),
        }
    }

    /// Which keys each query may attend to: `(B, 1, T, T)`, earlier or equal positions of
    /// its own segment.
    pub fn mask(&self) -> Tensor {
        let t = self.ids.size()[1];
        let same = self.ids.unsqueeze(2).eq_tensor(&self.ids.unsqueeze(1));
        let causal = Tensor::ones([t, t], (Kind::Bool, self.ids.device())).tril(0);
        same.logical_and(&causal).unsqueeze(1)
    }
}

#[cfg(cxxlm_cuda)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    use torch_sys::C_tensor;
    extern "C" {
        pub fn cxxlm_attention_forward(
            q: *const C_tensor,
            k: *const C_tensor,
            v: *const C_tensor,
            out: *mut *mut C_tensor,
            error: *mut c_char,
            len: usize,
        ) -> *mut c_void;
        #[allow(clippy::too_many_arguments)]
        pub fn cxxlm_attention_backward(
            saved: *mut c_void,
            dout: *const C_tensor,
            q: *const C_tensor,
            k: *const C_tensor,
            v: *const C_tensor,
            out: *const C_tensor,
            dq: *mut *mut C_tensor,
            dk: *mut *mut C_tensor,
            dv: *mut *mut C_tensor,
            error: *mut c_char,
            len: usize,
        ) -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub fn cxxlm_attention_forward_segments(
            q: *const C_tensor,
            k: *const C_tensor,
            v: *const C_tensor,
            starts: *const C_tensor,
            longest: i64,
            out: *mut *mut C_tensor,
            error: *mut c_char,
            len: usize,
        ) -> *mut c_void;
        pub fn cxxlm_attention_free(saved: *mut c_void);
    }
}

#[cfg(cxxlm_cuda)]
impl Drop for Saved {
    fn drop(&mut self) {
        if let Saved::Cuda(p) = self {
            // SAFETY: from cxxlm_attention_forward, freed once.
            unsafe { ffi::cxxlm_attention_free(*p) }
        }
    }
}

/// Takes the output of a tensor the shim allocated.
#[cfg(cxxlm_cuda)]
fn adopt(t: *mut torch_sys::C_tensor) -> Tensor {
    // SAFETY: the shim returns a heap `at::Tensor` that tch now owns and frees.
    unsafe { Tensor::from_ptr(t) }
}

/// The attention's output `(B, H, T, D)` and what its backward needs.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor) -> (Tensor, Saved) {
    #[cfg(cxxlm_cuda)]
    if q.device().is_cuda() {
        let mut out = std::ptr::null_mut();
        let mut saved = std::ptr::null_mut();
        crate::call(|e, n| {
            // SAFETY: live tensors; the shim fills `out` on success.
            saved = unsafe {
                ffi::cxxlm_attention_forward(q.as_ptr(), k.as_ptr(), v.as_ptr(), &mut out, e, n)
            };
            !saved.is_null()
        })
        .unwrap_or_else(|e| panic!("attention: {e}"));
        return (adopt(out), Saved::Cuda(saved));
    }
    reference(q, k, v, None)
}

/// The attention by its definition, on any device; with `mask` `(B, 1, T, T)` (true:
/// may attend) instead of causal.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<Tensor>) -> (Tensor, Saved) {
    let p = probabilities(q, k, mask.as_ref());
    (
        p.matmul(&repeat_heads(v, q.size()[1])).to_kind(q.kind()),
        Saved::Recompute(mask),
    )
}

/// Attention within `segments` of token-major q `(B, T, H, D)`, k and v `(B, T, H_kv, D)`
/// (unit stride in D, B and T mergeable, as views of one q|k|v projection are): the
/// output `(B, T, H, D)`, contiguous, and what its backward needs.
pub fn forward_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Segments,
) -> (Tensor, Saved) {
    #[cfg(cxxlm_cuda)]
    if q.device().is_cuda() {
        let [b, t, heads, dim] = q.size()[..] else {
            panic!("attention takes (B, T, H, D), got {:?}", q.size())
        };
        let rows = |x: &Tensor| x.view([b * t, x.size()[2], dim]);
        let (qr, kr, vr) = (rows(q), rows(k), rows(v));
        let mut out = std::ptr::null_mut();
        let mut saved = std::ptr::null_mut();
        crate::call(|e, n| {
            // SAFETY: live tensors; the shim fills `out` on success.
            saved = unsafe {
                ffi::cxxlm_attention_forward_segments(
                    qr.as_ptr(),
                    kr.as_ptr(),
                    vr.as_ptr(),
                    segments.starts.as_ptr(),
                    segments.longest,
                    &mut out,
                    e,
                    n,
                )
            };
            !saved.is_null()
        })
        .unwrap_or_else(|e| panic!("attention within segments: {e}"));
        let out = adopt(out).contiguous().view([b, t, heads, dim]);
        return (out, Saved::Cuda(saved));
    }
    let heads_first = |x: &Tensor| x.transpose(1, 2);
    let (out, saved) = reference(
        &heads_first(q),
        &heads_first(k),
        &heads_first(v),
        Some(segments.mask()),
    );
    (out.transpose(1, 2).contiguous(), saved)
}

/// The gradients of token-major q, k and v (contiguous, `(B, T, H, D)` and `(B, T, H_kv,
/// D)`) from that of the output of [`forward_segments`].
pub fn backward_segments(
    saved: &Saved,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    match saved {
        #[cfg(cxxlm_cuda)]
        Saved::Cuda(_) => {
            let [b, t, _, dim] = q.size()[..] else {
                panic!("attention takes (B, T, H, D), got {:?}", q.size())
            };
            let rows = |x: &Tensor| x.view([b * t, x.size()[2], dim]);
            let (dq, dk, dv) =
                backward(saved, &rows(dout), &rows(q), &rows(k), &rows(v), &rows(out));
            let tokens = |g: Tensor| g.contiguous().view([b, t, -1, dim]);
            (tokens(dq), tokens(dk), tokens(dv))
        }
        Saved::Recompute(_) => {
            let heads_first = |x: &Tensor| x.transpose(1, 2);
            let (dq, dk, dv) = backward(
                saved,
                &heads_first(dout),
                &heads_first(q),
                &heads_first(k),
                &heads_first(v),
                &heads_first(out),
            );
            let tokens = |g: Tensor| g.transpose(1, 2).contiguous();
            (tokens(dq), tokens(dk), tokens(dv))
        }
    }
}

/// The gradients of q, k and v from that of the output.
pub fn backward(
    saved: &Saved,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let _ = out;
    match saved {
        #[cfg(cxxlm_cuda)]
        Saved::Cuda(s) => {
            let (mut dq, mut dk, mut dv) = (
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            crate::call(|e, n| {
                // SAFETY: live tensors and the forward's statistics; the shim fills the
                // three gradients on success.
                unsafe {
                    ffi::cxxlm_attention_backward(
                        *s,
                        dout.as_ptr(),
                        q.as_ptr(),
                        k.as_ptr(),
                        v.as_ptr(),
                        out.as_ptr(),
                        &mut dq,
                        &mut dk,
                        &mut dv,
                        e,
                        n,
                    ) == 0
                }
            })
            .unwrap_or_else(|e| panic!("attention backward: {e}"));
            (adopt(dq), adopt(dk), adopt(dv))
        }
        Saved::Recompute(mask) => {
            let heads = q.size()[1];
            let (kf, vf) = (repeat_heads(k, heads), repeat_heads(v, heads));
            let p = probabilities(q, k, mask.as_ref());
            let g = dout.to_kind(Kind::Float);
            let dv = p.transpose(-2, -1).matmul(&g);
            let dp = g.matmul(&vf.transpose(-2, -1));
            let ds = &p * (&dp - (&dp * &p).sum_dim_intlist(-1, true, Kind::Float));
            let scale = (q.size()[3] as f64).powf(-0.5);
            let dq = ds.matmul(&kf) * scale;
            let dk = ds.transpose(-2, -1).matmul(&q.to_kind(Kind::Float)) * scale;
            let kv = k.size()[1];
            (
                dq.to_kind(q.kind()),
                sum_groups(&dk, kv).to_kind(k.kind()),
                sum_groups(&dv, kv).to_kind(v.kind()),
            )
        }
    }
}

/// softmax(q k^T / sqrt(d)) in fp32, `(B, H, T, T)`, causal or under `mask` `(B, 1, T,
/// T)`.
fn probabilities(q: &Tensor, k: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let (heads, t, d) = (q.size()[1], q.size()[2], q.size()[3]);
    let k = repeat_heads(k, heads);
    let scores = q.to_kind(Kind::Float).matmul(&k.transpose(-2, -1)) * (d as f64).powf(-0.5);
    let hidden = match mask {
        Some(m) => m.logical_not(),
        None => Tensor::ones([t, t], (Kind::Bool, q.device())).triu(1),
    };
    scores
        .masked_fill(&hidden, f64::NEG_INFINITY)
        .softmax(-1, Kind::Float)
}

/// k or v `(B, H_kv, T, D)` in fp32 with each head repeated for its group of q heads.
fn repeat_heads(x: &Tensor, heads: i64) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let kv = x.size()[1];
    if kv == heads {
        x
    } else {
        x.repeat_interleave_self_int(heads / kv, 1, None)
    }
}

/// The gradient of a repeated k or v: each group of q heads summed into its kv head.
fn sum_groups(g: &Tensor, kv: i64) -> Tensor {
    let [b, h, t, d] = g.size()[..] else {
        unreachable!("4 dimensions")
    };
    if h == kv {
        return g.shallow_clone();
    }
    g.view([b, kv, h / kv, t, d])
        .sum_dim_intlist(2, false, Kind::Float)
}
