//! Writing a model as a Hugging Face safetensors directory, optionally with a direction projected
//! out of every weight that writes into the residual stream ("weight orthogonalization", Arditi et
//! al. 2024): the permanent form of ablating that direction at every layer.
//!
//! What is written loads back through the safetensors path of this crate (and in transformers):
//! `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::config::{Activation, Family, ModelConfig};
use super::weights::{hf_name, WeightFile};
use super::{open, DTypeMode, LoadOptions, ModelSource};
use crate::{Error, Result};

/// Export settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportOptions {
    /// Store weights as bf16 instead of f32.
    pub bf16: bool,
    /// Project this direction (width d_model, any norm) out of the embeddings and of every matrix
    /// writing to the residual stream (attention output and MLP down projections).
    pub orthogonalize: Option<Vec<f32>>,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub tensors: usize,
    pub orthogonalized: Vec<String>,
    pub untied_lm_head: bool,
}

impl ExportReport {
    /// What was written, in one line (`pgate export`).
    pub fn summary(&self, out: &Path, seconds: f64) -> String {
        format!(
            "wrote {} tensors to {} in {:.1}s{}{}",
            self.tensors,
            out.display(),
            seconds,
            if self.orthogonalized.is_empty() {
                String::new()
            } else {
                format!("; orthogonalized {} matrices", self.orthogonalized.len())
            },
            if self.untied_lm_head {
                "; LM head untied from the embeddings"
            } else {
                ""
            },
        )
    }
}

/// Every tensor name (GGUF style) a model of `cfg` may have.
fn tensor_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".into(),
        "output.weight".into(),
    ];
    for l in 0..cfg.n_layers {
        for s in [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_q.bias",
            "attn_k.weight",
            "attn_k.bias",
            "attn_v.weight",
            "attn_v.bias",
            "attn_output.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "post_attention_norm.weight",
            "ffn_norm.weight",
            "post_ffw_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
            super::bake::RESID_ADD,
        ] {
            names.push(format!("blk.{l}.{s}"));
        }
    }
    names
}

/// Undo llama.cpp's q/k row permutation so RoPE can rotate halves (HF layout).
fn unpermute(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_heads;
    Ok(t.reshape((n_heads, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Write `src` as a HF directory at `out`.
pub fn export_hf_dir(src: &ModelSource, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    let opened = open(
        src,
        &LoadOptions {
            dtype: DTypeMode::F32,
            device: candle_core::Device::Cpu,
        },
    )?;
    let cfg = opened.config.clone();
    if opts.orthogonalize.is_some() && cfg.sandwich_norms {
        return Err(Error::Unsupported(
            "weight orthogonalization of models with post-block norms (gemma): a norm after the output projection reintroduces the direction".into(),
        ));
    }
    let w = &opened.weights;
    let from_gguf = matches!(w.file, WeightFile::Gguf(_));
    let unit = match &opts.orthogonalize {
        Some(v) => {
            if v.len() != cfg.d_model {
                return Err(Error::WidthMismatch {
                    got: v.len(),
                    want: cfg.d_model,
                });
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::InvalidValue(
                    "orthogonalization direction has NaN or infinite entries".into(),
                ));
            }
            let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            if n == 0.0 {
                return Err(Error::InvalidValue(
                    "orthogonalization direction is zero".into(),
                ));
            }
            Some(Tensor::from_vec(
                v.iter().map(|x| (*x as f64 / n) as f32).collect::<Vec<_>>(),
                (cfg.d_model, 1),
                &candle_core::Device::Cpu,
            )?)
        }
        None => None,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut report = ExportReport {
        tensors: 0,
        orthogonalized: Vec::new(),
        untied_lm_head: false,
    };
    let store_dtype = if opts.bf16 { DType::BF16 } else { DType::F32 };
    for name in tensor_names(&cfg) {
        if !w.has(&name) {
            continue;
        }
        let mut t = w.dense_f32(&name)?;
        let stem = name.rsplit('.').nth(1).unwrap_or("");
        if from_gguf && cfg.rope_interleaved && (stem == "attn_q" || stem == "attn_k") {
            let heads = if stem == "attn_q" {
                cfg.n_heads
            } else {
                cfg.n_kv_heads
            };
            t = unpermute(&t, heads)?;
        }
        if from_gguf && cfg.family == Family::Gemma3 && name.contains("norm") {
            // GGUF stores gemma's `1 + w`; HF stores `w`.
            t = (t - 1.0)?;
        }
        if let Some(u) = &unit {
            if name == "token_embd.weight" {
                if cfg.tied_embeddings || !w.has("output.weight") {
                    // The unembedding must stay as it was: untie it.
                    tensors.insert("lm_head.weight".into(), t.to_dtype(store_dtype)?);
                    report.untied_lm_head = true;
                }
                t = (&t - t.matmul(u)?.matmul(&u.t()?)?)?; // rows e - (e.u) u
                report.orthogonalized.push(name.clone());
            } else if stem == "attn_output" || stem == "ffn_down" {
                t = (&t - u.matmul(&u.t()?.matmul(&t)?)?)?; // W - u (u^T W)
                report.orthogonalized.push(name.clone());
            }
        }
        tensors.insert(
            hf_name("model.", &name, cfg.sandwich_norms),
            t.to_dtype(store_dtype)?,
        );
    }
    report.tensors = tensors.len();
    let tied =
        cfg.tied_embeddings && !report.untied_lm_head && !tensors.contains_key("lm_head.weight");
    let st = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st)?;
    let config = hf_config(&cfg, tied, store_dtype);
    let cp = out.join("config.json");
    std::fs::write(&cp, serde_json::to_string_pretty(&config)?).map_err(|e| Error::io(&cp, e))?;
    opened.tokenizer.save_hf_files(out)?;
    Ok(report)
}

/// `config.json` for a [`ModelConfig`].
pub fn hf_config(cfg: &ModelConfig, tied: bool, dtype: DType) -> serde_json::Value {
    let (model_type, arch) = match cfg.family {
        Family::Llama => ("llama", "LlamaForCausalLM"),
        Family::Mistral => ("mistral", "MistralForCausalLM"),
        Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Family::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
    };
    let mut c = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": tied,
        "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
        "hidden_act": match cfg.activation { Activation::Silu => "silu", Activation::GeluTanh => "gelu_pytorch_tanh" },
    });
    if cfg.family == Family::Llama {
        c["attention_bias"] = false.into();
    }
    if let Some(l3) = &cfg.rope_llama3 {
        c["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": l3.factor, "low_freq_factor": l3.low_freq_factor,
            "high_freq_factor": l3.high_freq_factor, "original_max_position_embeddings": l3.original_max_position,
        });
    }
    if cfg.family == Family::Gemma3 {
        c["hidden_activation"] = "gelu_pytorch_tanh".into();
        c["rope_local_base_freq"] = cfg.rope_local_theta.unwrap_or(10_000.0).into();
        c["sliding_window"] = cfg.sliding_window.into();
        c["sliding_window_pattern"] = cfg.sliding_window_pattern.into();
        c["query_pre_attn_scalar"] = cfg
            .query_pre_attn_scalar
            .unwrap_or(cfg.head_dim as f32)
            .into();
        if let Some(f) = cfg.rope_linear_factor {
            c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": f});
        }
    }
    c
}
