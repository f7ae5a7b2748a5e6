//! Qwen2 family (Qwen2.5): the llama decoder with bias on q/k/v and half-split RoPE.

use super::config::{Family, ModelConfig};
use super::meta::{GgufMeta, HfConfig};
use crate::Result;

pub fn from_gguf(m: &GgufMeta, vocab: usize, tied: bool) -> Result<ModelConfig> {
    let mut c = super::llama::from_gguf(m, Family::Qwen2, vocab, tied)?;
    c.qkv_bias = true;
    c.rope_interleaved = false;
    c.rms_eps = m
        .opt_f32("attention.layer_norm_rms_epsilon")
        .unwrap_or(1e-6) as f64;
    c.rope_theta = m.opt_f32("rope.freq_base").unwrap_or(1_000_000.0);
    Ok(c)
}

pub fn from_hf(c: &HfConfig) -> Result<ModelConfig> {
    let mut cfg = super::llama::from_hf(c, Family::Qwen2)?;
    cfg.qkv_bias = true;
    cfg.rms_eps = c.opt_f64("rms_norm_eps").unwrap_or(1e-6);
    // Qwen2 configs carry a sliding_window that is disabled unless use_sliding_window is true.
    if c.opt_bool("use_sliding_window").unwrap_or(false) {
        cfg.sliding_window = c.opt_usize("sliding_window");
        cfg.sliding_window_pattern = None;
    }
    Ok(cfg)
}
