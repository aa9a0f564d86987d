//! Causal self-attention whose backward is called explicitly: on a GPU, the cuDNN or flash
//! kernel that PyTorch's SDPA would pick (through `shim.cpp`, which keeps the statistics
//! its backward needs); elsewhere, the plain softmax(q k^T / sqrt(d)) v, recomputed for the
//! backward. q is `(B, H, T, D)`, k and v `(B, H_kv, T, D)` (H a multiple of H_kv).

use tch::{Kind, Tensor};

/// What the backward needs besides q, k, v and the output.
pub enum Saved {
    #[cfg(cxxlm_cuda)]
    Cuda(*mut std::ffi::c_void),
    Recompute,
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
    reference(q, k, v)
}

/// The attention by its definition, on any device.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> (Tensor, Saved) {
    let p = probabilities(q, k);
    (
        p.matmul(&repeat_heads(v, q.size()[1])).to_kind(q.kind()),
        Saved::Recompute,
    )
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
        Saved::Recompute => {
            let heads = q.size()[1];
            let (kf, vf) = (repeat_heads(k, heads), repeat_heads(v, heads));
            let p = probabilities(q, k);
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

/// Causal softmax(q k^T / sqrt(d)) in fp32, `(B, H, T, T)`.
fn probabilities(q: &Tensor, k: &Tensor) -> Tensor {
    let (heads, t, d) = (q.size()[1], q.size()[2], q.size()[3]);
    let k = repeat_heads(k, heads);
    let scores = q.to_kind(Kind::Float).matmul(&k.transpose(-2, -1)) * (d as f64).powf(-0.5);
    let future = Tensor::ones([t, t], (Kind::Bool, q.device())).triu(1);
    scores
        .masked_fill(&future, f64::NEG_INFINITY)
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
