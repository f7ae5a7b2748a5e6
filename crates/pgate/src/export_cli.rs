//! `pgate export`: write a model as a Hugging Face safetensors directory, optionally with one
//! direction orthogonalized out of every weight that writes into the residual stream.

use std::path::PathBuf;

use anyhow::{Context, Result};
use persona_gate::directions::spec::layer_vector;
use persona_gate::model::export::{export_hf_dir, ExportOptions};
use persona_gate::model::ModelSource;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Model: a .gguf file, a Hugging Face model directory, a short name or a hub repo id.
    pub model: String,
    /// Output directory (config.json, model.safetensors, tokenizer files).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Project this direction out of the embeddings and of every attention-output and MLP-down
    /// matrix: `FILE[L]` (layer L's vector of a direction file). The written model behaves like
    /// run-time ablation of that direction at every site of every layer.
    #[arg(long, value_name = "FILE[L]")]
    pub orthogonalize: Option<String>,
    /// Store weights as bf16 (default f32).
    #[arg(long)]
    pub bf16: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let src = ModelSource::resolve(&a.model)?;
    let orthogonalize = match &a.orthogonalize {
        Some(spec) => Some(layer_vector(spec).context("--orthogonalize")?),
        None => None,
    };
    let t0 = std::time::Instant::now();
    let opts = ExportOptions {
        bf16: a.bf16,
        orthogonalize,
    };
    let rep = export_hf_dir(&src, &a.out, &opts)?;
    eprintln!("{}", rep.summary(&a.out, t0.elapsed().as_secs_f64()));
    Ok(())
}
