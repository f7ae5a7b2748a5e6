//! The decoder's shape and the handful of ways the supported families differ, as plain data.
//!
//! llama, mistral, qwen2 and gemma3 share one decoder block; what differs (bias on q/k/v, the MLP's
//! activation, gemma's embedding scale, sandwich norms, per-head q/k norms, sliding-window layers and
//! their RoPE base) is a field here, filled by each family's file from GGUF metadata or `config.json`.

use serde::{Deserialize, Serialize};

use super::limits::{
    MAX_CONTEXT, MAX_D_FF, MAX_D_MODEL, MAX_HEADS, MAX_HEAD_DIM, MAX_LAYERS, MAX_VOCAB,
};

/// Architecture family. `Mistral` runs the llama decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Gemma3,
}

impl Family {
    /// Parse an architecture name as written in GGUF (`general.architecture`) or in HF `model_type`
    /// / `architectures`.
    pub fn parse(name: &str) -> Option<Family> {
        let n = name.to_ascii_lowercase();
        let n = n.trim_end_matches("forcausallm");
        match n {
            "llama" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "gemma3" | "gemma3_text" | "gemma3text" => Some(Family::Gemma3),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Gemma3 => "gemma3",
        }
    }
}

/// Activation of the gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`), used by Gemma.
    GeluTanh,
}

/// Everything the shared decoder needs to know about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    /// RoPE base of sliding-window layers (gemma3 uses 10k locally and 1M globally).
    pub rope_local_theta: Option<f32>,
    /// Linear RoPE scaling factor for global layers (positions divided by it), when the model uses one.
    pub rope_linear_factor: Option<f32>,
    /// Llama-3 style frequency-dependent RoPE scaling.
    pub rope_llama3: Option<Llama3Rope>,
    /// RoPE rotates adjacent pairs (GGUF llama, whose q/k rows were permuted on conversion) instead of
    /// the two halves of each head (HF layout, qwen2, gemma).
    pub rope_interleaved: bool,
    pub max_position: usize,
    pub qkv_bias: bool,
    pub tied_embeddings: bool,
    /// Multiply token embeddings by this before block 0 (gemma: sqrt(d_model)).
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    /// Per-head RMSNorm on q and k before RoPE (gemma3).
    pub qk_norm: bool,
    /// Norms after attention and after the MLP, before the residual add (gemma "sandwich" norms).
    pub sandwich_norms: bool,
    /// Attention scale is `1/sqrt(query_pre_attn_scalar)` when set, else `1/sqrt(head_dim)`.
    pub query_pre_attn_scalar: Option<f32>,
    /// Window of sliding-window layers, and which layers use it.
    pub sliding_window: Option<usize>,
    /// A layer `l` is global (full attention) when `(l + 1) % pattern == 0`; others slide.
    pub sliding_window_pattern: Option<usize>,
    pub final_logit_softcap: Option<f32>,
}

/// Llama-3.1 RoPE scaling parameters (`rope_scaling` with `rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position: usize,
}

impl ModelConfig {
    /// Whether block `layer` uses sliding-window attention.
    pub fn is_sliding(&self, layer: usize) -> bool {
        match (self.sliding_window, self.sliding_window_pattern) {
            (Some(_), Some(p)) if p > 0 => !(layer + 1).is_multiple_of(p),
            (Some(_), None) => true,
            _ => false,
        }
    }

    pub fn attn_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => 1.0 / (s as f64).sqrt(),
            None => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }

    /// Sanity checks that turn a malformed or crafted config into a clear error instead of a shape
    /// panic, a division by zero or an allocation sized by a hostile number later: every dimension
    /// non-zero and within [`super::limits`], heads that group evenly, finite positive constants.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::InvalidValue(format!("model config: {m}")));
        for (name, v, max) in [
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("d_model", self.d_model, MAX_D_MODEL),
            ("n_heads", self.n_heads, MAX_HEADS),
            ("n_kv_heads", self.n_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("d_ff", self.d_ff, MAX_D_FF),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("max_position", self.max_position, MAX_CONTEXT),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} (must be from 1 to {max})"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads cannot be grouped over {} kv heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd", self.head_dim));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window = 0".into());
        }
        self.validate_constants()
    }

    /// Norm epsilon, RoPE bases and scalings, attention scalar and soft-cap: finite, and positive
    /// where a zero would divide.
    fn validate_constants(&self) -> crate::Result<()> {
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(crate::Error::InvalidValue(format!(
                "model config: {name} = {x} (must be finite and positive)"
            ))),
            _ => Ok(()),
        };
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(crate::Error::InvalidValue(format!(
                "model config: rms_eps = {} (must be finite and not negative)",
                self.rms_eps
            )));
        }
        positive("rope_theta", Some(self.rope_theta as f64))?;
        positive("rope_local_theta", self.rope_local_theta.map(f64::from))?;
        positive("rope linear factor", self.rope_linear_factor.map(f64::from))?;
        positive("embed_scale", self.embed_scale.map(f64::from))?;
        positive(
            "query_pre_attn_scalar",
            self.query_pre_attn_scalar.map(f64::from),
        )?;
        positive(
            "final_logit_softcap",
            self.final_logit_softcap.map(f64::from),
        )?;
        if let Some(l3) = &self.rope_llama3 {
            positive("rope_scaling.factor", Some(l3.factor as f64))?;
            positive(
                "rope_scaling.low_freq_factor",
                Some(l3.low_freq_factor as f64),
            )?;
            positive(
                "rope_scaling.high_freq_factor",
                Some(l3.high_freq_factor as f64),
            )?;
            if l3.high_freq_factor <= l3.low_freq_factor || l3.original_max_position == 0 {
                return Err(crate::Error::InvalidValue(format!(
                    "model config: llama3 rope_scaling needs high_freq_factor > low_freq_factor and original_max_position_embeddings > 0 (got {l3:?})"
                )));
            }
        }
        Ok(())
    }
}

/// Head width: as given (`key_length` / `head_dim`), else `d_model / n_heads`, which must divide
/// evenly; a head count of 0 is an error here rather than a division by zero.
pub fn head_dim_of(d_model: usize, n_heads: usize, given: Option<usize>) -> crate::Result<usize> {
    let bad = |m: String| Err(crate::Error::InvalidValue(format!("model config: {m}")));
    if n_heads == 0 {
        return bad("the attention head count is 0".into());
    }
    match given {
        Some(h) => Ok(h),
        None if !d_model.is_multiple_of(n_heads) => bad(format!(
            "hidden size {d_model} is not divisible by {n_heads} attention heads"
        )),
        None => Ok(d_model / n_heads),
    }
}
