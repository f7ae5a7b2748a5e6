//! `pgate export`: write a model as a Hugging Face safetensors directory, optionally with one
//! direction orthogonalized out of every weight that writes into the residual stream.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use persona_gate::directions::DirectionSet;
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

/// `FILE[L]` -> (file, L).
fn parse_pick(s: &str) -> Result<(PathBuf, usize)> {
    let Some(open) = s.rfind('[') else {
        bail!("--orthogonalize '{s}': expected FILE[L] (which layer's vector to project out)")
    };
    let Some(inner) = s[open + 1..].strip_suffix(']') else {
        bail!("--orthogonalize '{s}': expected FILE[L], missing ']'")
    };
    let layer: usize = inner
        .trim()
        .parse()
        .with_context(|| format!("--orthogonalize '{s}': layer '{inner}' is not a number"))?;
    Ok((PathBuf::from(&s[..open]), layer))
}

pub fn run(a: ExportArgs) -> Result<()> {
    let src = ModelSource::resolve(&a.model)?;
    let orthogonalize = match &a.orthogonalize {
        None => None,
        Some(spec) => {
            let (file, layer) = parse_pick(spec)?;
            let set = DirectionSet::load(&file)
                .with_context(|| format!("reading direction file {}", file.display()))?;
            let v = set.layer(layer)?.to_vec();
            if v.iter().any(|x| !x.is_finite()) {
                bail!(
                    "{}: layer {layer}'s vector has NaN or infinite entries",
                    file.display()
                );
            }
            Some(v)
        }
    };
    let t0 = std::time::Instant::now();
    let rep = export_hf_dir(
        &src,
        &a.out,
        &ExportOptions {
            bf16: a.bf16,
            orthogonalize,
        },
    )?;
    eprintln!(
        "wrote {} tensors to {} in {:.1}s{}{}",
        rep.tensors,
        a.out.display(),
        t0.elapsed().as_secs_f64(),
        if rep.orthogonalized.is_empty() {
            String::new()
        } else {
            format!("; orthogonalized {} matrices", rep.orthogonalized.len())
        },
        if rep.untied_lm_head {
            "; LM head untied from the embeddings"
        } else {
            ""
        },
    );
    Ok(())
}
