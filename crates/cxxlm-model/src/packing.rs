//! Examples packed side by side in the rows of a batch, kept apart: each starts at rotary
//! position 0 and attends only to its own earlier tokens (block-diagonal causal
//! attention), so that a packed example is trained as it would be alone.

use cxxlm_cuda::attention::Segments;
use tch::{Device, Tensor};

pub struct Packing {
    /// The rows cut into examples, then each row's padding.
    pub segments: Segments,
    /// Every token's position in its example, `(B x T)` int64 on the device.
    pub positions: Tensor,
}

impl Packing {
    /// Rows of `t` input positions holding examples of `lengths` tokens each, in order.
    /// An example may run past its row's `t` positions (the last token of a `t + 1`
    /// window is only a target): it is cut there. What is left of a row after its
    /// examples is padding, a segment of its own.
    pub fn new(rows: &[Vec<usize>], t: usize, device: Device) -> Packing {
        let mut cut = Vec::with_capacity(rows.len());
        let mut positions = Vec::with_capacity(rows.len() * t);
        for lengths in rows {
            let mut used = 0;
            let mut segments = Vec::with_capacity(lengths.len() + 1);
            for &n in lengths {
                let n = n.min(t - used);
                if n > 0 {
                    segments.push(n);
                    used += n;
                }
            }
            if used < t {
                segments.push(t - used);
            }
            positions.extend(segments.iter().flat_map(|&n| 0..n as i64));
            cut.push(segments);
        }
        Packing {
            segments: Segments::new(&cut, t, device),
            positions: Tensor::from_slice(&positions).to_device(device),
        }
    }
}
