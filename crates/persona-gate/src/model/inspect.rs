//! A model described for a person or a tool (`pgate inspect`): shape, tensor types, chat
//! template, stop tokens and file hashes.
//!
//! Why in the library: the description is what receipts and tools check a model against; the
//! command only picks text or JSON.

use super::{LoadOptions, Model, ModelInfo, ModelSource};
use crate::Result;

/// What [`inspect`] found.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub info: ModelInfo,
    /// sha256 of each model file (sorted by path), when hashed.
    pub sha256: Option<Vec<(String, String)>>,
    /// `None` for a model without a chat template.
    pub chat_template_sha256: Option<String>,
    pub stop_tokens: Vec<u32>,
}

/// Resolve and load `spec` (in the quantized mode: low memory, and every tensor is read, so a
/// corrupt file fails here), hashing its files when `hash` is set.
pub fn inspect(spec: &str, hash: bool) -> Result<Inspection> {
    let src = ModelSource::resolve(spec)?;
    let model = Model::load_source(&src, &LoadOptions::default())?;
    let sha256 = if hash {
        let mut v = Vec::new();
        for f in &model.info.files {
            v.push((f.display().to_string(), crate::hash::sha256_file(f)?));
        }
        v.sort();
        Some(v)
    } else {
        None
    };
    Ok(Inspection {
        chat_template_sha256: model.tokenizer.chat_template_sha256(),
        stop_tokens: model.tokenizer.stop_token_ids().to_vec(),
        info: model.info,
        sha256,
    })
}

impl Inspection {
    /// The model info with `sha256` (file -> hash), `chat_template_sha256` and `stop_tokens` added.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(&self.info)?;
        if let Some(h) = &self.sha256 {
            let map: serde_json::Map<String, serde_json::Value> = h
                .iter()
                .map(|(f, s)| (f.clone(), s.clone().into()))
                .collect();
            v["sha256"] = map.into();
        }
        v["chat_template_sha256"] = self.chat_template_sha256.clone().into();
        v["stop_tokens"] = self.stop_tokens.clone().into();
        Ok(v)
    }

    /// One `key  value` line per property.
    pub fn to_text(&self) -> String {
        let i = &self.info;
        let types: Vec<String> = i
            .tensor_types
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        let template = if i.chat_template {
            "present"
        } else {
            "absent (base model)"
        };
        let mut out = [
            ("name", i.name.clone()),
            ("source", i.source.clone()),
            ("format", i.format.clone()),
            ("architecture", i.architecture.clone()),
            ("layers", i.n_layers.to_string()),
            ("width", format!("{} (d_model)", i.d_model)),
            (
                "heads",
                format!(
                    "{} query, {} kv, head_dim {}",
                    i.n_heads, i.n_kv_heads, i.head_dim
                ),
            ),
            ("mlp", i.d_ff.to_string()),
            ("vocab", i.vocab_size.to_string()),
            ("context", i.context_length.to_string()),
            ("parameters", format!("{:.1} M", i.n_params as f64 / 1e6)),
            ("tensor types", types.join(", ")),
            ("chat template", template.to_string()),
        ]
        .iter()
        .map(|(k, v)| format!("{k:<15}{v}\n"))
        .collect::<String>();
        for (f, s) in self.sha256.iter().flatten() {
            out += &format!("{:<15}{s} {f}\n", "sha256");
        }
        out
    }
}
