//! `pgate export`: write a version of a model: a HF directory (optionally orthogonalized), or a
//! GGUF copy with a direction baked in, projected out, or re-quantized.

use std::path::PathBuf;

use anyhow::Result;
use persona_gate::drift::versions::{export_version, VersionOptions};

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Model: a .gguf file, a Hugging Face model directory, a short name or a hub repo id.
    pub model: String,
    /// Output: NEW.gguf (a GGUF copy; needs a GGUF model) or a directory (config.json,
    /// model.safetensors, tokenizer files).
    #[arg(short, long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub version: VersionOptions,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let rep = export_version(&a.model, &a.out, &a.version)?;
    eprintln!("{}", rep.summary(&a.out, t0.elapsed().as_secs_f64()));
    Ok(())
}
