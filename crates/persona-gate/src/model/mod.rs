//! Loading chat models: GGUF files, Hugging Face safetensors directories, and hub repo ids.
//!
//! All three end in the same place: a [`WeightLoader`] over the weights, a [`ModelConfig`] from the
//! family file, a [`ChatTokenizer`], and the shared [`Decoder`].

pub mod args;
pub mod bake;
pub mod config;
pub mod decoder;
pub mod export;
pub mod gemma3;
pub mod gguf_check;
pub mod inspect;
pub mod kv_cache;
pub mod limits;
pub mod llama;
pub mod meta;
pub mod qwen2;
pub mod source;
pub mod synth;
pub mod weights;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use serde::Serialize;

pub use args::ModelArgs;
pub use config::{Family, ModelConfig};
pub use decoder::{Decoder, FixedSlotInputs, LogitsAt};
pub use kv_cache::KvCache;
pub use source::ModelSource;
pub use weights::DTypeMode;

use crate::tokenize::ChatTokenizer;
use crate::{Error, Result};
use meta::{GgufMeta, HfConfig};
use weights::{GgufWeights, SafetensorsWeights, WeightFile, WeightLoader};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DTypeMode,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DTypeMode::Q,
            device: Device::Cpu,
        }
    }
}

/// What `pgate inspect` prints and receipts record.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub source: String,
    pub format: String,
    pub files: Vec<PathBuf>,
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    /// tensor type -> number of tensors
    pub tensor_types: BTreeMap<String, usize>,
    pub n_params: u64,
    pub chat_template: bool,
    pub dtype: String,
}

impl ModelInfo {
    #[allow(clippy::too_many_arguments)]
    fn describe(
        name: String,
        src: &ModelSource,
        format: &str,
        files: Vec<PathBuf>,
        cfg: &ModelConfig,
        tensor_types: BTreeMap<String, usize>,
        n_params: u64,
        tokenizer: &ChatTokenizer,
        opts: &LoadOptions,
    ) -> Self {
        Self {
            name,
            source: src.describe(),
            format: format.into(),
            files,
            architecture: cfg.family.name().into(),
            n_layers: cfg.n_layers,
            d_model: cfg.d_model,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            d_ff: cfg.d_ff,
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position,
            tensor_types,
            n_params,
            chat_template: tokenizer.has_chat_template(),
            dtype: opts.dtype.name().into(),
        }
    }
}

/// A loaded chat model: decoder, tokenizer and description.
pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: ChatTokenizer,
    pub info: ModelInfo,
}

impl Model {
    /// Load from a path (GGUF file, HF directory), a cached short name, or a hub repo id.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let src = ModelSource::resolve(spec)?;
        Self::load_source(&src, opts)
    }

    pub fn load_source(src: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        Self::load_split(src, opts, &[])
    }

    /// Load with the layers split over `opts.device` and then `more_devices` (a model larger than
    /// one GPU; [`Decoder::load`] says how layers are placed). Empty `more_devices`: one device.
    pub fn load_split(
        src: &ModelSource,
        opts: &LoadOptions,
        more_devices: &[Device],
    ) -> Result<Self> {
        let mut opened = open(src, opts)?;
        let decoder = Decoder::load(opened.config, &mut opened.weights, more_devices)?;
        Ok(Model {
            decoder,
            tokenizer: opened.tokenizer,
            info: opened.info,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.decoder.cfg
    }

    /// Error unless `layer` is a valid block index.
    pub fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.decoder.cfg.n_layers {
            return Err(Error::LayerOutOfRange {
                layer,
                n_layers: self.decoder.cfg.n_layers,
            });
        }
        Ok(())
    }
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A model's parts before the decoder is built: what loading and exporting share.
pub struct OpenedModel {
    pub config: ModelConfig,
    pub weights: WeightLoader,
    pub tokenizer: ChatTokenizer,
    pub info: ModelInfo,
}

/// Read config, tokenizer and a weight loader for `src` without loading any tensor.
pub fn open(src: &ModelSource, opts: &LoadOptions) -> Result<OpenedModel> {
    match src {
        ModelSource::Gguf(path) => open_gguf(path, src, opts),
        ModelSource::HfDir(dir) => open_hf_dir(dir, src, opts),
    }
}

fn open_gguf(path: &std::path::Path, src: &ModelSource, opts: &LoadOptions) -> Result<OpenedModel> {
    let g = GgufWeights::open(path)?;
    let md = &g.content.metadata;
    let cfg = config_from_gguf(&g.content)?;
    // Metadata strings (e.g. the tokenizer model's name) are quoted in errors: keep them one line.
    let tokenizer = ChatTokenizer::from_gguf_metadata(md).map_err(limits::one_line_error)?;
    check_gguf_blocks(&g.content, &cfg)?;
    let mut tensor_types = BTreeMap::new();
    let mut n_params = 0u64;
    for info in g.content.tensor_infos.values() {
        *tensor_types
            .entry(format!("{:?}", info.ggml_dtype))
            .or_insert(0) += 1;
        n_params += info.shape.elem_count() as u64;
    }
    let name = md
        .get("general.name")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| file_name(path));
    let info = ModelInfo::describe(
        name,
        src,
        "gguf",
        vec![path.to_path_buf()],
        &cfg,
        tensor_types,
        n_params,
        &tokenizer,
        opts,
    );
    let loader = WeightLoader {
        file: WeightFile::Gguf(g),
        mode: opts.dtype,
        device: opts.device.clone(),
        sandwich: cfg.sandwich_norms,
    };
    Ok(OpenedModel {
        config: cfg,
        weights: loader,
        tokenizer,
        info,
    })
}

/// The model config a GGUF file's metadata and tensor shapes describe, checked: the family's
/// fields, [`ModelConfig::validate`]'s limits (a crafted `block_count` would otherwise size the
/// decoder's allocations), and an embedding of two non-zero dimensions whose width is `d_model`.
pub fn config_from_gguf(content: &gguf_file::Content) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| Error::MissingMetadata {
            what: "GGUF key 'general.architecture'".into(),
        })?;
    let family =
        Family::parse(&arch).ok_or_else(|| Error::UnknownArchitecture(limits::quote(&arch, 80)))?;
    let meta = GgufMeta {
        md,
        arch: arch.clone(),
    };
    let emb = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor("token_embd.weight".into()))?;
    let (vocab, width) = match emb.shape.dims() {
        &[v, d] if v > 0 && d > 0 => (v, d),
        dims => {
            return Err(Error::InvalidValue(format!(
                "model config: token_embd.weight has shape {dims:?} (expected [vocab, d_model], both non-zero)"
            )))
        }
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let cfg = match family {
        Family::Llama | Family::Mistral => llama::from_gguf(&meta, family, vocab, tied)?,
        Family::Qwen2 => qwen2::from_gguf(&meta, vocab, tied)?,
        Family::Gemma3 => gemma3::from_gguf(&meta, vocab)?,
    };
    cfg.validate()?;
    if width != cfg.d_model {
        return Err(Error::InvalidValue(format!(
            "model config: token_embd.weight is {width} wide but embedding_length is {}",
            cfg.d_model
        )));
    }
    Ok(cfg)
}

/// A tensor for every block `block_count` announces: a clear error for a count that does not
/// match the file, before the decoder looks for the missing tensors one by one.
pub fn check_gguf_blocks(content: &gguf_file::Content, cfg: &ModelConfig) -> Result<()> {
    let blocks = content
        .tensor_infos
        .keys()
        .filter_map(|k| {
            k.strip_prefix("blk.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i.saturating_add(1))
        .max()
        .unwrap_or(0);
    if blocks < cfg.n_layers {
        return Err(Error::InvalidValue(format!(
            "model config: block_count is {} but the file has tensors for {blocks} blocks",
            cfg.n_layers
        )));
    }
    Ok(())
}

/// Largest `config.json` read: real ones are a few kB.
const MAX_CONFIG_JSON: u64 = 16 << 20;

/// The model config of a Hugging Face directory's `config.json`, checked (see
/// [`config_from_hf_json`]).
pub fn config_from_hf_dir(dir: &std::path::Path) -> Result<ModelConfig> {
    let cfg_path = dir.join("config.json");
    let text = source::read_bounded(&cfg_path, MAX_CONFIG_JSON)?;
    config_from_hf_json(&text).map_err(|e| match e {
        Error::NotAModel { reason, .. } => Error::NotAModel {
            path: cfg_path.clone(),
            reason,
        },
        other => other,
    })
}

/// The model config `config.json` text describes: the family's fields and
/// [`ModelConfig::validate`]'s limits. What the fuzz tests drive.
pub fn config_from_hf_json(text: &str) -> Result<ModelConfig> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::NotAModel {
        path: "config.json".into(),
        reason: format!("config.json is not valid JSON ({e})"),
    })?;
    let c = HfConfig(&json);
    let arch = c
        .opt_str("model_type")
        .map(str::to_string)
        .or_else(|| {
            json.get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .ok_or_else(|| Error::MissingMetadata {
            what: "config.json key 'model_type'".into(),
        })?;
    let family =
        Family::parse(&arch).ok_or_else(|| Error::UnknownArchitecture(limits::quote(&arch, 80)))?;
    let cfg = match family {
        Family::Llama | Family::Mistral => llama::from_hf(&c, family)?,
        Family::Qwen2 => qwen2::from_hf(&c)?,
        Family::Gemma3 => gemma3::from_hf(&c)?,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn open_hf_dir(
    dir: &std::path::Path,
    src: &ModelSource,
    opts: &LoadOptions,
) -> Result<OpenedModel> {
    let cfg = config_from_hf_dir(dir)?;
    let family = cfg.family;
    let files = source::safetensors_files(dir)?;
    let norm_offset = if family == Family::Gemma3 { 1.0 } else { 0.0 };
    let st = SafetensorsWeights::open(&files, norm_offset)?;
    let tokenizer = ChatTokenizer::from_hf_dir(dir).map_err(limits::one_line_error)?;
    let mut tensor_types = BTreeMap::new();
    let mut n_params = 0u64;
    for f in &files {
        let (types, n) = source::safetensors_summary(f)?;
        for (k, v) in types {
            *tensor_types.entry(k).or_insert(0) += v;
        }
        n_params += n;
    }
    let info = ModelInfo::describe(
        file_name(dir),
        src,
        "safetensors",
        files.clone(),
        &cfg,
        tensor_types,
        n_params,
        &tokenizer,
        opts,
    );
    let loader = WeightLoader {
        file: WeightFile::Safetensors(st),
        mode: opts.dtype,
        device: opts.device.clone(),
        sandwich: cfg.sandwich_norms,
    };
    let last = format!("blk.{}.attn_q.weight", cfg.n_layers - 1);
    if !loader.has(&last) {
        return Err(Error::InvalidValue(format!(
            "model config: num_hidden_layers is {} but the weights have no '{}'",
            cfg.n_layers,
            weights::hf_name("model.", &last, cfg.sandwich_norms)
        )));
    }
    Ok(OpenedModel {
        config: cfg,
        weights: loader,
        tokenizer,
        info,
    })
}
