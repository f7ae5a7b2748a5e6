//! Synthetic models of real shapes: seeded random weights written as a Hugging Face directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) that this crate and transformers both load.
//!
//! Real weights are too large to carry to a GPU machine; random ones of the same shape are made there
//! in seconds and measure the same speed. Every value depends only on the seed, the tensor's name and
//! its index (a counter-based hash), so the file is the same whatever the thread count, and an 8B
//! model is written in parallel straight into the file (no whole-model buffer).
//!
//! The tokenizer is byte-level BPE without merges (each byte one token) plus the family's chat
//! special tokens at the top of the vocabulary; the other ids are filler tokens that encoding never
//! produces but decoding prints. A llama-3 or ChatML chat template goes with it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::DType;
use rayon::prelude::*;
use serde::Serialize;

use super::config::{Activation, Family, Llama3Rope, ModelConfig};
use super::export::hf_config;
use crate::{Error, Result};

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &[
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "qwen2.5-7b",
    "qwen2.5-1.5b",
    "qwen2.5-0.5b",
    "llama-tiny",
    "qwen-tiny",
];

#[allow(clippy::too_many_arguments)]
fn base(
    family: Family,
    n_layers: usize,
    d_model: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_ff: usize,
    vocab_size: usize,
    tied: bool,
) -> ModelConfig {
    let qwen = family == Family::Qwen2;
    ModelConfig {
        family,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads,
        head_dim: d_model / n_heads,
        d_ff,
        vocab_size,
        rms_eps: if qwen { 1e-6 } else { 1e-5 },
        rope_theta: if qwen { 1_000_000.0 } else { 500_000.0 },
        rope_local_theta: None,
        rope_linear_factor: None,
        rope_llama3: None,
        rope_interleaved: false,
        max_position: if qwen { 32768 } else { 131072 },
        qkv_bias: qwen,
        tied_embeddings: tied,
        embed_scale: None,
        activation: Activation::Silu,
        qk_norm: false,
        sandwich_norms: false,
        query_pre_attn_scalar: None,
        sliding_window: None,
        sliding_window_pattern: None,
        final_logit_softcap: None,
    }
}

fn llama3_rope(factor: f32) -> Option<Llama3Rope> {
    Some(Llama3Rope {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position: 8192,
    })
}

/// The shape of a named model (published configs; `*-tiny` are test shapes).
pub fn preset(name: &str) -> Result<ModelConfig> {
    use Family::{Llama, Qwen2};
    let c = match name.to_ascii_lowercase().as_str() {
        "llama-3.1-8b" | "llama3.1-8b" => {
            let mut c = base(Llama, 32, 4096, 32, 8, 14336, 128256, false);
            c.rope_llama3 = llama3_rope(8.0);
            c
        }
        "llama-3.1-70b" | "llama3.1-70b" => {
            let mut c = base(Llama, 80, 8192, 64, 8, 28672, 128256, false);
            c.rope_llama3 = llama3_rope(8.0);
            c
        }
        "llama-3.2-1b" | "llama3.2-1b" => {
            let mut c = base(Llama, 16, 2048, 32, 8, 8192, 128256, true);
            c.rope_llama3 = llama3_rope(32.0);
            c
        }
        "llama-3.2-3b" | "llama3.2-3b" => {
            let mut c = base(Llama, 28, 3072, 24, 8, 8192, 128256, true);
            c.rope_llama3 = llama3_rope(32.0);
            c
        }
        "qwen2.5-7b" => base(Qwen2, 28, 3584, 28, 4, 18944, 152064, false),
        "qwen2.5-1.5b" => base(Qwen2, 28, 1536, 12, 2, 8960, 151936, true),
        "qwen2.5-0.5b" => base(Qwen2, 24, 896, 14, 2, 4864, 151936, true),
        "llama-tiny" => {
            let mut c = base(Llama, 2, 64, 4, 2, 128, 384, false);
            c.max_position = 2048;
            c
        }
        "qwen-tiny" => {
            let mut c = base(Qwen2, 2, 64, 4, 2, 128, 384, true);
            c.max_position = 2048;
            c
        }
        other => {
            return Err(Error::InvalidValue(format!(
                "unknown model shape '{other}' (known: {})",
                PRESETS.join(", ")
            )))
        }
    };
    c.validate()?;
    Ok(c)
}

/// How to fill the weights.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct SynthOptions {
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    // Help texts are what `pgate synth-model --help` shows: bf16 is the published models' dtype;
    // the values are uniform with standard deviation 0.02 as in HF's init.
    /// Keep the shape but use this many layers (small test models of real width).
    #[cfg_attr(feature = "cli", arg(long))]
    pub layers: Option<usize>,
    /// Store f32 instead of bf16.
    #[cfg_attr(feature = "cli", arg(long))]
    pub f32: bool,
    /// Standard deviation of the matrices and embeddings.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.02))]
    pub std: f32,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            f32: false,
            std: 0.02,
            layers: None,
        }
    }
}

/// What [`write_synth_model`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SynthReport {
    pub like: String,
    pub config: ModelConfig,
    pub tensors: usize,
    pub n_params: u64,
    pub bytes: u64,
    pub secs: f64,
}

impl SynthReport {
    /// One line: where, what shape, how big, how long (what `pgate synth-model` prints).
    pub fn summary(&self, out: &Path) -> String {
        format!(
            "{}: {} ({} layers, width {}, vocab {}), {} tensors, {:.2} B parameters, {:.2} GB in {:.1} s",
            out.display(),
            self.like,
            self.config.n_layers,
            self.config.d_model,
            self.config.vocab_size,
            self.tensors,
            self.n_params as f64 / 1e9,
            self.bytes as f64 / 1e9,
            self.secs
        )
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Uniform with mean `mean` and standard deviation `std`.
    Uniform { mean: f32, std: f32 },
}

struct TensorPlan {
    name: String,
    shape: Vec<usize>,
    fill: Fill,
    seed: u64,
    /// Byte offset in the data section.
    offset: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: stable across platforms and versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    splitmix64(h ^ splitmix64(seed))
}

/// Value `i` of a tensor: two values per 64-bit hash, each from 24 bits (uniform in [-1, 1)).
#[inline]
fn value(tseed: u64, i: u64, fill: Fill) -> f32 {
    let r = splitmix64(tseed ^ (i >> 1).wrapping_mul(0xD134_2543_DE82_EF95));
    let bits = if i & 1 == 0 {
        r >> 40
    } else {
        (r >> 8) & 0xFF_FFFF
    };
    let u = (bits as f32 + 0.5) * (2.0 / 16_777_216.0) - 1.0;
    match fill {
        // Uniform on [-a, a] has std a / sqrt(3).
        Fill::Uniform { mean, std } => mean + u * std * 1.732_050_8,
    }
}

/// Every tensor of `cfg` in HF naming, with its fill.
fn tensor_list(cfg: &ModelConfig, opts: &SynthOptions) -> Vec<(String, Vec<usize>, Fill)> {
    let (d, ff, v) = (cfg.d_model, cfg.d_ff, cfg.vocab_size);
    let (qd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    let w = Fill::Uniform {
        mean: 0.0,
        std: opts.std,
    };
    // Norm weights around 1 and biases of a visible size, so a mistake in either shows in the logits.
    let norm = Fill::Uniform {
        mean: 1.0,
        std: 0.1,
    };
    let bias = Fill::Uniform {
        mean: 0.0,
        std: 0.1,
    };
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, d], w)];
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![d], norm));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![qd, d], w));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kvd, d], w));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kvd, d], w));
        if cfg.qkv_bias {
            t.push((format!("{p}.self_attn.q_proj.bias"), vec![qd], bias));
            t.push((format!("{p}.self_attn.k_proj.bias"), vec![kvd], bias));
            t.push((format!("{p}.self_attn.v_proj.bias"), vec![kvd], bias));
        }
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![d, qd], w));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            norm,
        ));
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, d], w));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![ff, d], w));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![d, ff], w));
    }
    t.push(("model.norm.weight".into(), vec![d], norm));
    if !cfg.tied_embeddings {
        t.push(("lm_head.weight".into(), vec![v, d], w));
    }
    t
}

/// Write a synthetic model of shape `like` (a [`preset`] name) into `out`.
pub fn write_synth_model(like: &str, out: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    let mut cfg = preset(like)?;
    if let Some(l) = opts.layers {
        if l == 0 {
            return Err(Error::InvalidValue("--layers must be >= 1".into()));
        }
        cfg.n_layers = l;
    }
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let dtype = if opts.f32 { DType::F32 } else { DType::BF16 };
    let esize = dtype.size_in_bytes() as u64;

    let mut plans = Vec::new();
    let mut offset = 0u64;
    for (name, shape, fill) in tensor_list(&cfg, opts) {
        let n: u64 = shape.iter().product::<usize>() as u64;
        plans.push(TensorPlan {
            seed: name_seed(opts.seed, &name),
            name,
            shape,
            fill,
            offset,
        });
        offset += n * esize;
    }
    let data_len = offset;
    let dtype_name = if dtype == DType::BF16 { "BF16" } else { "F32" };
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "persona_gate_synth": format!("{like} seed {}", opts.seed)}),
    );
    for p in &plans {
        let n: u64 = p.shape.iter().product::<usize>() as u64;
        header.insert(
            p.name.clone(),
            serde_json::json!({"dtype": dtype_name, "shape": p.shape, "data_offsets": [p.offset, p.offset + n * esize]}),
        );
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let data_start = 8 + hbytes.len() as u64;

    let path = out.join("model.safetensors");
    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
    file.set_len(data_start + data_len)
        .map_err(|e| Error::io(&path, e))?;
    file.write_all_at(&(hbytes.len() as u64).to_le_bytes(), 0)
        .map_err(|e| Error::io(&path, e))?;
    file.write_all_at(&hbytes, 8)
        .map_err(|e| Error::io(&path, e))?;

    // Chunks of 4M values over all tensors, generated and written in parallel.
    const CHUNK: u64 = 1 << 22;
    let mut jobs = Vec::new();
    for (ti, p) in plans.iter().enumerate() {
        let n: u64 = p.shape.iter().product::<usize>() as u64;
        let mut s = 0;
        while s < n {
            jobs.push((ti, s, CHUNK.min(n - s)));
            s += CHUNK;
        }
    }
    let is_bf16 = dtype == DType::BF16;
    jobs.par_iter()
        .try_for_each_init(Vec::<u8>::new, |buf, &(ti, start, len)| -> Result<()> {
            let p = &plans[ti];
            buf.clear();
            buf.reserve((len * esize) as usize);
            for i in start..start + len {
                let x = value(p.seed, i, p.fill);
                if is_bf16 {
                    buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
                } else {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            }
            file.write_all_at(buf, data_start + p.offset + start * esize)
                .map_err(|e| Error::io(&path, e))
        })?;

    let config = hf_config(&cfg, cfg.tied_embeddings, dtype);
    let cp = out.join("config.json");
    std::fs::write(&cp, serde_json::to_string_pretty(&config)?).map_err(|e| Error::io(&cp, e))?;
    write_tokenizer(&cfg, out)?;
    Ok(SynthReport {
        like: like.to_string(),
        tensors: plans.len(),
        n_params: data_len / esize,
        bytes: data_start + data_len,
        secs: t0.elapsed().as_secs_f64(),
        config: cfg,
    })
}

/// GPT-2's byte -> printable character map of byte-level BPE.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).expect("latin-1");
    }
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(256 + extra).expect("valid");
            extra += 1;
            printable.push(b);
        }
    }
    map
}

/// Chat special tokens, chat template, BOS and end-of-turn of a family.
fn chat_format(
    family: Family,
) -> (
    Vec<&'static str>,
    &'static str,
    Option<&'static str>,
    &'static str,
) {
    match family {
        Family::Qwen2 => (
            vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            None,
            "<|im_end|>",
        ),
        _ => (
            vec![
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
            Some("<|begin_of_text|>"),
            "<|eot_id|>",
        ),
    }
}

fn write_tokenizer(cfg: &ModelConfig, out: &Path) -> Result<()> {
    let (specials, template, bos, eot) = chat_format(cfg.family);
    let v = cfg.vocab_size;
    if v < 256 + specials.len() {
        return Err(Error::InvalidValue(format!(
            "vocabulary of {v} is too small for a byte-level tokenizer"
        )));
    }
    let first_special = v - specials.len();
    let mut vocab = serde_json::Map::new();
    for (b, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), b.into());
    }
    for id in 256..first_special {
        vocab.insert(format!("tok{id}"), id.into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vocab.insert(s.to_string(), (first_special + i).into());
            serde_json::json!({"id": first_special + i, "content": s, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []},
    });
    let p = out.join("tokenizer.json");
    std::fs::write(&p, serde_json::to_string(&tok)?).map_err(|e| Error::io(&p, e))?;
    let eos = if cfg.family == Family::Qwen2 {
        "<|im_end|>"
    } else {
        "<|eot_id|>"
    };
    let tc = serde_json::json!({
        "add_bos_token": false,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": specials[0],
        "chat_template": template,
        "model_max_length": cfg.max_position,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    let p = out.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tc)?).map_err(|e| Error::io(&p, e))?;
    let eot_id = first_special + specials.iter().position(|s| *s == eot).unwrap_or(0);
    let mut gen = serde_json::json!({"eos_token_id": [eot_id]});
    if let Some(b) = bos {
        gen["bos_token_id"] =
            (first_special + specials.iter().position(|s| *s == b).unwrap_or(0)).into();
    }
    let p = out.join("generation_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&gen)?).map_err(|e| Error::io(&p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_centred_and_scaled() {
        let f = Fill::Uniform {
            mean: 0.0,
            std: 0.02,
        };
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| value(7, i, f) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        assert_ne!(value(7, 0, f), value(8, 0, f));
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let m = bytes_to_unicode();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
    }

    #[test]
    fn presets_are_valid() {
        for p in PRESETS {
            preset(p).unwrap();
        }
        assert!(preset("gpt-5").is_err());
        let c = preset("llama-3.1-8b").unwrap();
        assert_eq!((c.head_dim, c.n_kv_heads, c.vocab_size), (128, 8, 128256));
    }
}
