//! `pgate drift OLD NEW -o DIR`: compare two versions of a model (persona and refusal directions,
//! their geometry, refusal per persona mode with paired statistics); `pgate receipt diff`.

use std::path::PathBuf;

use anyhow::Result;
use persona_gate::drift::receipts::receipt_diff;
use persona_gate::drift::{run_drift, DriftOptions};

use crate::progress::Progress;

#[derive(clap::Args)]
pub struct DriftArgs {
    /// The old version: a .gguf file, a HF directory, a short name or a hub repo id.
    pub old: String,
    /// The new version (same tokenizer and shape).
    pub new: String,
    /// Output folder: drift.json, summary.md, report.html (and directions/ when extracted).
    #[arg(short, long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub opts: DriftOptions,
}

pub fn run(a: DriftArgs) -> Result<()> {
    let rep = run_drift(&a.old, &a.new, &a.out, &a.opts, &mut Progress::new())?;
    let files = rep.write(&a.out)?;
    print!("{}", rep.to_text());
    eprintln!(
        "[pgate] wrote {}",
        files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// `pgate receipt diff OLD NEW`.
pub fn run_diff(old: &std::path::Path, new: &std::path::Path, json: bool) -> Result<()> {
    let d = receipt_diff(old, new)?;
    crate::output::show(json, &d, || d.to_text())
}
