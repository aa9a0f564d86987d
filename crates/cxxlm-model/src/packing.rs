//! Examples packed side by side in the rows of a batch, kept apart: each starts at rotary
//! position 0 and attends only to its own earlier tokens (block-diagonal causal
//! attention), so that a packed example is trained as it would be alone. A row may also
//! open with a prefix that its later examples share (samples of one prompt): they attend
//! to it as well, their positions continuing it, so each is scored as the prefix followed
//! by itself, the prefix computed once.

use cxxlm_cuda::attention::Segments;
use tch::{Device, Kind, Tensor};

pub struct Packing {
    /// The rows cut into examples, then each row's padding.
    pub segments: Segments,
    /// Every token's position in its example, `(B x T)` int64 on the device.
    pub positions: Tensor,
    /// Each row's shared prefix, `(B)` lengths, for rows packed by
    /// [`Packing::with_shared_prefix`].
    pub prefix: Option<Tensor>,
}

impl Packing {
    /// Rows of `t` input positions holding examples of `lengths` tokens each, in order.
    /// An example may run past its row's `t` positions (the last token of a `t + 1`
    /// window is only a target): it is cut there. What is left of a row after its
    /// examples is padding, a segment of its own at position 0.
    pub fn new(rows: &[Vec<usize>], t: usize, device: Device) -> Packing {
        Self::packed(rows, t, false, device)
    }

    /// [`Packing::new`], each row's first length (which may be 0) a prefix that the
    /// row's later examples attend to, their positions continuing it.
    pub fn with_shared_prefix(rows: &[Vec<usize>], t: usize, device: Device) -> Packing {
        Self::packed(rows, t, true, device)
    }

    fn packed(rows: &[Vec<usize>], t: usize, shared: bool, device: Device) -> Packing {
        let mut cut = Vec::with_capacity(rows.len());
        let mut positions = Vec::with_capacity(rows.len() * t);
        let mut prefixes = Vec::with_capacity(rows.len());
        for lengths in rows {
            let mut used = 0;
            let mut segments = Vec::with_capacity(lengths.len() + 1);
            let prefix = match shared {
                true => lengths.first().map_or(0, |&n| n.min(t)),
                false => 0,
            };
            for (k, &n) in lengths.iter().enumerate() {
                let n = n.min(t - used);
                if n > 0 {
                    let from = if k > 0 { prefix } else { 0 };
                    positions.extend((from..from + n).map(|p| p as i64));
                    segments.push(n);
                    used += n;
                }
            }
            // Padding's positions are never read, but must index the rotary tables: a
            // row of samples after a shared prompt can be longer than the context, and
            // a short row beside it padded past it.
            if used < t {
                positions.extend(std::iter::repeat_n(0, t - used));
                segments.push(t - used);
            }
            prefixes.push(prefix as i64);
            cut.push(segments);
        }
        Packing {
            segments: Segments::new(&cut, t, device),
            positions: Tensor::from_slice(&positions).to_device(device),
            prefix: shared.then(|| Tensor::from_slice(&prefixes).to_device(device)),
        }
    }

    /// [`Packing::visible`] as an additive bias of `kind` (0, or -inf where a key is not
    /// visible), made once for every layer: attention converts a boolean mask on each
    /// call and keeps each layer's copy for the backward, `(B, T, T)` elements a layer.
    /// Each query's keys are laid out in a multiple of 8 elements, the alignment the
    /// memory-efficient kernel reads a bias with (it copies one that lacks it).
    pub fn bias(&self, kind: Kind) -> Tensor {
        let visible = self.visible();
        let size = visible.size();
        let t = size[3];
        let padded = [size[0], 1, size[2], aligned_keys(t as usize) as i64];
        Tensor::zeros(padded, (kind, visible.device()))
            .narrow(3, 0, t)
            .masked_fill_(&visible.logical_not(), f64::NEG_INFINITY)
    }

    /// The bytes [`Packing::bias`] of `rows` rows of `t` positions holds in `kind`.
    pub fn bias_bytes(rows: usize, t: usize, kind: Kind) -> u64 {
        (rows * t * aligned_keys(t) * kind.elt_size_in_bytes()) as u64
    }

    /// Which keys each query may attend to: `(B, 1, T, T)`, earlier or equal positions of
    /// its own example, and of its row's shared prefix.
    fn visible(&self) -> Tensor {
        let own = self.segments.mask();
        let Some(prefix) = &self.prefix else {
            return own;
        };
        let t = own.size()[3];
        let device = own.device();
        let keys = Tensor::arange(t, (Kind::Int64, device));
        let in_prefix = keys
            .view([1, 1, 1, t])
            .lt_tensor(&prefix.view([-1, 1, 1, 1]));
        let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
        own.logical_or(&in_prefix.logical_and(&causal))
    }
}

/// A query's `t` keys laid out in a multiple of 8.
fn aligned_keys(t: usize) -> usize {
    t.next_multiple_of(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bias_is_the_visibility_made_additive_in_aligned_rows() {
        // A prefix of 2, samples of 3 and 2, then 2 positions of padding.
        let p = Packing::with_shared_prefix(&[vec![2, 3, 2]], 9, Device::Cpu);
        let (bias, visible) = (p.bias(Kind::Float), p.visible());
        assert_eq!(bias.size(), [1, 1, 9, 9]);
        assert_eq!(bias.stride()[2], 16);
        let held = bias.size()[0] * bias.stride()[0] * 4;
        assert_eq!(held as u64, Packing::bias_bytes(1, 9, Kind::Float));
        assert!(bias.eq(0.0).equal(&visible));
        let hidden = bias.masked_select(&visible.logical_not());
        assert!(hidden.numel() > 0 && hidden.eq(f64::NEG_INFINITY).all().int64_value(&[]) == 1);
        // The second sample (positions 5 and 6) sees the prefix and itself only.
        let seen: Vec<i64> = (0..9).map(|k| visible.int64_value(&[0, 0, 6, k])).collect();
        assert_eq!(seen, [1, 1, 0, 0, 0, 1, 1, 0, 0]);
    }
}
