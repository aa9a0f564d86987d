use serde::{Deserialize, Serialize};

use crate::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `relu(x)^2` (nanochat).
    Relu2,
    /// `silu(gate) * up`, hidden width 8/3 of the model's (rounded to 64).
    Swiglu,
}

/// YaRN's rotary scaling (Peng et al. 2023, "YaRN: Efficient Context Window Extension"):
/// NTK-by-parts interpolation of the frequencies and an attention temperature.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Yarn {
    /// s: how many times the original context the positions are stretched.
    pub factor: f64,
    /// L: the context the model was trained at before.
    pub original_seq_len: usize,
    /// alpha: dimensions turning fewer times than this over L are interpolated (divided by s).
    #[serde(default = "Yarn::default_alpha")]
    pub alpha: f64,
    /// beta: dimensions turning more times than this over L are kept.
    #[serde(default = "Yarn::default_beta")]
    pub beta: f64,
}

impl Yarn {
    fn default_alpha() -> f64 {
        1.0
    }

    fn default_beta() -> f64 {
        32.0
    }

    /// A rotary frequency `theta` (radians per position) as YaRN rescales it: with
    /// `r = L / (2 pi / theta)` turns over the original context, the ramp
    /// `gamma = clamp((r - alpha) / (beta - alpha), 0, 1)` blends `theta / s` into `theta`.
    pub fn frequency(&self, theta: f64) -> f64 {
        let turns = self.original_seq_len as f64 * theta / (2.0 * std::f64::consts::PI);
        let gamma = ((turns - self.alpha) / (self.beta - self.alpha)).clamp(0.0, 1.0);
        (1.0 - gamma) * theta / self.factor + gamma * theta
    }

    /// What attention logits are multiplied by: `1 / t`, with `sqrt(1 / t) = 0.1 ln s + 1`.
    pub fn temperature(&self) -> f64 {
        (0.1 * self.factor.ln() + 1.0).powi(2)
    }
}

/// The GPT's shape. Width is depth x 64 and heads are 128 wide unless a preset or an
/// override says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub depth: usize,
    pub width: usize,
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub activation: Activation,
    pub softcap: f64,
    pub rope_base: f64,
    /// YaRN's scaling of the rotary (None: plain rotary at `rope_base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Yarn>,
}

/// Optional overrides of a preset (the `[model]` table of a training config).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    pub preset: Option<String>,
    pub depth: Option<usize>,
    pub width: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub seq_len: Option<usize>,
    pub activation: Option<Activation>,
    pub softcap: Option<f64>,
    pub rope_base: Option<f64>,
    pub rope_scaling: Option<Yarn>,
}

pub const PRESETS: [&str; 5] = ["tiny", "d12", "d20", "d26", "3b"];

impl ModelConfig {
    /// nanochat's family: width = depth x 64, head dimension 128.
    pub fn from_depth(depth: usize, vocab_size: usize, seq_len: usize) -> Self {
        let width = depth * 64;
        let heads = width.div_ceil(128).max(1);
        ModelConfig {
            depth,
            width,
            heads,
            kv_heads: heads,
            vocab_size,
            seq_len,
            activation: Activation::Relu2,
            softcap: 15.0,
            rope_base: 10_000.0,
            rope_scaling: None,
        }
    }

    pub fn preset(name: &str, vocab_size: usize) -> Result<Self, ModelError> {
        Ok(match name {
            // Small enough to train on a CPU in tests: two layers, heads of 64.
            "tiny" => ModelConfig {
                heads: 2,
                kv_heads: 2,
                ..Self::from_depth(2, vocab_size, 128)
            },
            "d12" => Self::from_depth(12, vocab_size, 2048),
            "d20" => Self::from_depth(20, vocab_size, 2048),
            "d26" => Self::from_depth(26, vocab_size, 2048),
            // The seeds' 3B: 32 layers of 2560, 32 heads (80 wide), 8 key/value heads,
            // SwiGLU.
            "3b" => ModelConfig {
                width: 2560,
                heads: 32,
                kv_heads: 8,
                activation: Activation::Swiglu,
                rope_base: 500_000.0,
                ..Self::from_depth(32, vocab_size, 8192)
            },
            other => {
                return Err(ModelError::Config(format!(
                    "unknown preset {other:?} (one of {PRESETS:?})"
                )))
            }
        })
    }

    /// A preset (default `d12`) with overrides applied; `depth` alone rescales width and
    /// heads as the family does.
    pub fn resolve(o: &ModelOverrides, vocab_size: usize) -> Result<Self, ModelError> {
        let mut c = Self::preset(o.preset.as_deref().unwrap_or("d12"), vocab_size)?;
        if let Some(depth) = o.depth {
            c = ModelConfig {
                activation: c.activation,
                softcap: c.softcap,
                rope_base: c.rope_base,
                ..Self::from_depth(depth, vocab_size, c.seq_len)
            };
        }
        c.width = o.width.unwrap_or(c.width);
        c.heads = o.heads.unwrap_or(c.heads);
        c.kv_heads = o.kv_heads.or(o.heads).unwrap_or(c.kv_heads);
        c.seq_len = o.seq_len.unwrap_or(c.seq_len);
        c.activation = o.activation.unwrap_or(c.activation);
        c.softcap = o.softcap.unwrap_or(c.softcap);
        c.rope_base = o.rope_base.unwrap_or(c.rope_base);
        c.rope_scaling = o.rope_scaling.or(c.rope_scaling);
        c.validate()?;
        Ok(c)
    }

    /// This (trained) model continued at another context: `o` may set `seq_len`,
    /// `rope_base` and `rope_scaling`; any other key must agree with the model.
    pub fn extended(&self, o: &ModelOverrides) -> Result<Self, ModelError> {
        let preset = match &o.preset {
            Some(name) => Some(Self::preset(name, self.vocab_size)?),
            None => None,
        };
        let shape = |c: &Self| (c.depth, c.width, c.heads, c.kv_heads, c.activation);
        let differs = [
            ("preset", preset.is_some_and(|p| shape(&p) != shape(self))),
            ("depth", o.depth.is_some_and(|v| v != self.depth)),
            ("width", o.width.is_some_and(|v| v != self.width)),
            ("heads", o.heads.is_some_and(|v| v != self.heads)),
            ("kv_heads", o.kv_heads.is_some_and(|v| v != self.kv_heads)),
            (
                "activation",
                o.activation.is_some_and(|v| v != self.activation),
            ),
            ("softcap", o.softcap.is_some_and(|v| v != self.softcap)),
        ];
        if let Some((key, _)) = differs.iter().find(|(_, d)| *d) {
            return Err(ModelError::Config(format!(
                "model.{key} is the initial model's; a continued model changes only seq_len, rope_base and rope_scaling"
            )));
        }
        let c = ModelConfig {
            seq_len: o.seq_len.unwrap_or(self.seq_len),
            rope_base: o.rope_base.unwrap_or(self.rope_base),
            rope_scaling: o.rope_scaling.or(self.rope_scaling),
            ..self.clone()
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.depth == 0 || self.width == 0 || self.heads == 0 || self.seq_len == 0 {
            return bad(format!(
                "depth, width, heads and seq_len must be positive: {self:?}"
            ));
        }
        if !self.width.is_multiple_of(self.heads) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "width {} must split into {} heads of an even size",
                self.width, self.heads
            ));
        }
        for (key, value) in [("softcap", self.softcap), ("rope_base", self.rope_base)] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("model.{key} = {value} must be finite and > 0"));
            }
        }
        if let Some(y) = self.rope_scaling {
            if !(y.factor.is_finite() && y.factor >= 1.0) || y.original_seq_len == 0 {
                return bad(format!(
                    "model.rope_scaling: factor {} must be finite and >= 1, original_seq_len {} positive",
                    y.factor, y.original_seq_len
                ));
            }
            if !(y.alpha.is_finite() && y.beta.is_finite() && 0.0 <= y.alpha && y.alpha < y.beta) {
                return bad(format!(
                    "model.rope_scaling: alpha {} and beta {} must be finite with 0 <= alpha < beta",
                    y.alpha, y.beta
                ));
            }
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} heads cannot be shared by {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    /// The rotary's angle per position of each pair of a head's dimensions: `base^(-2i/d)`,
    /// rescaled by YaRN when it is on.
    pub fn rope_frequencies(&self) -> Vec<f64> {
        let d = self.head_dim() as f64;
        (0..self.head_dim() / 2)
            .map(|i| {
                let theta = self.rope_base.powf(-2.0 * i as f64 / d);
                self.rope_scaling.map_or(theta, |y| y.frequency(theta))
            })
            .collect()
    }

    /// What attention logits are multiplied by beyond `1 / sqrt(head_dim)`: YaRN's
    /// temperature. QK-norm (after the rotary) bounds each logit by `sqrt(head_dim)`
    /// whatever the rotary's scale, so the temperature cannot ride in the rotary tables as
    /// in other models: it multiplies the logits. None: 1.
    pub fn logit_scale(&self) -> Option<f64> {
        self.rope_scaling.map(|y| y.temperature())
    }

    pub fn hidden(&self) -> usize {
        match self.activation {
            Activation::Relu2 => 4 * self.width,
            Activation::Swiglu => (8 * self.width / 3).div_ceil(64) * 64,
        }
    }

    /// The shapes (`[out, in]`) of one block's matrices, by name.
    pub fn block_shapes(&self) -> Vec<(&'static str, [usize; 2])> {
        let (w, hd) = (self.width, self.head_dim());
        let fc_out = match self.activation {
            Activation::Relu2 => self.hidden(),
            Activation::Swiglu => 2 * self.hidden(),
        };
        vec![
            ("attn.q", [self.heads * hd, w]),
            ("attn.k", [self.kv_heads * hd, w]),
            ("attn.v", [self.kv_heads * hd, w]),
            ("attn.proj", [w, self.heads * hd]),
            ("mlp.fc", [fc_out, w]),
            ("mlp.proj", [w, self.hidden()]),
        ]
    }

    /// Parameters of the embedding table (not counted in FLOPs).
    pub fn embedding_params(&self) -> usize {
        self.vocab_size * self.width
    }

    pub fn params(&self) -> usize {
        let block: usize = self.block_shapes().iter().map(|(_, [o, i])| o * i).sum();
        self.embedding_params() + self.depth * block + self.vocab_size * self.width
    }

    /// Training FLOPs per token: 6 per non-embedding parameter plus attention's
    /// `12 x layers x width x seq_len` (nanochat's and PaLM's estimate).
    pub fn flops_per_token(&self) -> f64 {
        6.0 * (self.params() - self.embedding_params()) as f64
            + 12.0 * (self.depth * self.width * self.seq_len) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_follow_the_family() {
        let d12 = ModelConfig::preset("d12", 32_768).unwrap();
        assert_eq!((d12.width, d12.heads, d12.head_dim()), (768, 6, 128));
        let d20 = ModelConfig::preset("d20", 32_768).unwrap();
        assert_eq!((d20.width, d20.heads), (1280, 10));
        let big = ModelConfig::preset("3b", 32_768).unwrap();
        assert_eq!((big.head_dim(), big.kv_heads, big.seq_len), (80, 8, 8192));
        // 2 x 32768 x 2560 embeddings + 32 x (q 2560^2, k/v 2 x 640 x 2560, proj, SwiGLU's
        // gate, up and down of 2560 x 6848)
        assert_eq!(big.hidden(), 6848);
        assert_eq!(
            big.params(),
            2 * 32_768 * 2560 + 32 * (2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 2560 * 6848)
        );
        assert!(ModelConfig::preset("d7", 100).is_err());
        let o = ModelOverrides {
            preset: Some("d12".into()),
            depth: Some(4),
            ..Default::default()
        };
        let c = ModelConfig::resolve(&o, 1000).unwrap();
        assert_eq!((c.width, c.heads, c.seq_len), (256, 2, 2048));
        let bad = ModelOverrides {
            heads: Some(5),
            ..Default::default()
        };
        assert!(ModelConfig::resolve(&bad, 1000).is_err());
        for softcap in [0.0, -15.0, f64::NAN] {
            let bad = ModelOverrides {
                softcap: Some(softcap),
                ..Default::default()
            };
            let e = ModelConfig::resolve(&bad, 1000).unwrap_err().to_string();
            assert!(e.contains("model.softcap"), "{e}");
        }
    }
}
