//! Llama family (SmolLM2, Llama-3.x; Mistral runs the same decoder).

use super::config::{head_dim_of, Activation, Family, Llama3Rope, ModelConfig};
use super::meta::{GgufMeta, HfConfig};
use crate::Result;

pub fn from_gguf(m: &GgufMeta, family: Family, vocab: usize, tied: bool) -> Result<ModelConfig> {
    let d_model = m.usize("embedding_length")?;
    let n_heads = m.usize("attention.head_count")?;
    Ok(ModelConfig {
        family,
        n_layers: m.usize("block_count")?,
        d_model,
        n_heads,
        n_kv_heads: m.opt_usize("attention.head_count_kv")?.unwrap_or(n_heads),
        head_dim: head_dim_of(d_model, n_heads, m.opt_usize("attention.key_length")?)?,
        d_ff: m.usize("feed_forward_length")?,
        vocab_size: vocab,
        rms_eps: m
            .opt_f32("attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5) as f64,
        rope_theta: m.opt_f32("rope.freq_base").unwrap_or(10_000.0),
        rope_local_theta: None,
        rope_linear_factor: None,
        rope_llama3: None,
        // llama.cpp's converter permutes llama q/k rows so that RoPE rotates adjacent pairs.
        rope_interleaved: true,
        max_position: m.opt_usize("context_length")?.unwrap_or(4096),
        qkv_bias: false,
        tied_embeddings: tied,
        embed_scale: None,
        activation: Activation::Silu,
        qk_norm: false,
        sandwich_norms: false,
        query_pre_attn_scalar: None,
        sliding_window: None,
        sliding_window_pattern: None,
        final_logit_softcap: None,
    })
}

pub fn from_hf(c: &HfConfig, family: Family) -> Result<ModelConfig> {
    let d_model = c.usize("hidden_size")?;
    let n_heads = c.usize("num_attention_heads")?;
    let rope_llama3 = c.raw("rope_scaling").and_then(|r| {
        let t = r.get("rope_type").or_else(|| r.get("type"))?.as_str()?;
        (t == "llama3").then(|| Llama3Rope {
            factor: r.get("factor").and_then(|v| v.as_f64()).unwrap_or(8.0) as f32,
            low_freq_factor: r
                .get("low_freq_factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(1.0) as f32,
            high_freq_factor: r
                .get("high_freq_factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(4.0) as f32,
            original_max_position: r
                .get("original_max_position_embeddings")
                .and_then(|v| v.as_u64())
                .unwrap_or(8192) as usize,
        })
    });
    Ok(ModelConfig {
        family,
        n_layers: c.usize("num_hidden_layers")?,
        d_model,
        n_heads,
        n_kv_heads: c.opt_usize("num_key_value_heads").unwrap_or(n_heads),
        head_dim: head_dim_of(d_model, n_heads, c.opt_usize("head_dim"))?,
        d_ff: c.usize("intermediate_size")?,
        vocab_size: c.usize("vocab_size")?,
        rms_eps: c.opt_f64("rms_norm_eps").unwrap_or(1e-5),
        rope_theta: c.opt_f64("rope_theta").unwrap_or(10_000.0) as f32,
        rope_local_theta: None,
        rope_linear_factor: None,
        rope_llama3,
        rope_interleaved: false,
        max_position: c.opt_usize("max_position_embeddings").unwrap_or(4096),
        qkv_bias: c.opt_bool("attention_bias").unwrap_or(false),
        tied_embeddings: c.opt_bool("tie_word_embeddings").unwrap_or(false),
        embed_scale: None,
        activation: Activation::Silu,
        qk_norm: false,
        sandwich_norms: false,
        query_pre_attn_scalar: None,
        sliding_window: if family == Family::Mistral {
            c.opt_usize("sliding_window")
        } else {
            None
        },
        sliding_window_pattern: None,
        final_logit_softcap: None,
    })
}
