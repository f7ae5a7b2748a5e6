//! Gemma 3 (text): embedding scaled by sqrt(d), sandwich norms, per-head q/k RMSNorm, GELU-tanh,
//! and five sliding-window layers (local RoPE base 10k) for every global one.

use super::config::{Activation, Family, ModelConfig};
use super::meta::{GgufMeta, HfConfig};
use crate::Result;

const DEFAULT_PATTERN: usize = 6;

pub fn from_gguf(m: &GgufMeta, vocab: usize) -> Result<ModelConfig> {
    let mut c = super::llama::from_gguf(m, Family::Gemma3, vocab, true)?;
    c.rope_interleaved = false;
    c.rms_eps = m
        .opt_f32("attention.layer_norm_rms_epsilon")
        .unwrap_or(1e-6) as f64;
    c.rope_theta = m.opt_f32("rope.freq_base").unwrap_or(1_000_000.0);
    c.rope_local_theta = Some(10_000.0);
    c.rope_linear_factor = m.opt_f32("rope.scaling.factor").filter(|f| *f > 1.0);
    c.embed_scale = Some((c.d_model as f32).sqrt());
    c.activation = Activation::GeluTanh;
    c.qk_norm = true;
    c.sandwich_norms = true;
    c.sliding_window = Some(m.opt_usize("attention.sliding_window")?.unwrap_or(512));
    c.sliding_window_pattern = Some(DEFAULT_PATTERN);
    Ok(c)
}

pub fn from_hf(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = super::llama::from_hf(c, Family::Gemma3)?;
    cfg.rms_eps = c.opt_f64("rms_norm_eps").unwrap_or(1e-6);
    cfg.rope_theta = c.opt_f64("rope_theta").unwrap_or(1_000_000.0) as f32;
    cfg.rope_local_theta = Some(c.opt_f64("rope_local_base_freq").unwrap_or(10_000.0) as f32);
    cfg.rope_linear_factor = c
        .raw("rope_scaling")
        .and_then(|r| r.get("factor"))
        .and_then(|v| v.as_f64())
        .map(|f| f as f32)
        .filter(|f| *f > 1.0);
    cfg.rope_llama3 = None;
    cfg.embed_scale = Some((cfg.d_model as f32).sqrt());
    cfg.activation = Activation::GeluTanh;
    cfg.qk_norm = true;
    cfg.sandwich_norms = true;
    cfg.tied_embeddings = c.opt_bool("tie_word_embeddings").unwrap_or(true);
    cfg.query_pre_attn_scalar = c.opt_f64("query_pre_attn_scalar").map(|x| x as f32);
    cfg.sliding_window = Some(c.opt_usize("sliding_window").unwrap_or(512));
    cfg.sliding_window_pattern = Some(
        c.opt_usize("sliding_window_pattern")
            .unwrap_or(DEFAULT_PATTERN),
    );
    cfg.final_logit_softcap = c.opt_f64("final_logit_softcapping").map(|x| x as f32);
    Ok(cfg)
}
