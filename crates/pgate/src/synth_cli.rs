//! `pgate synth-model` (seeded random models of real shapes), `pgate logits` (last-token logits and
//! greedy tokens as JSON, what `scripts/gpu/compare_hf.py` checks against transformers) and the
//! GPU-aware `pgate bench` table.

use std::path::PathBuf;

use anyhow::{Context, Result};
use persona_gate::bench::{self, BenchSuite, LogitsFlags};
use persona_gate::events::Event;
use persona_gate::model::synth::{write_synth_model, SynthOptions};

use crate::args::WithModel;
use crate::output::{show, write_json};
use crate::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct SynthArgs {
    /// Shape to copy: llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, qwen2.5-7b, qwen2.5-1.5b,
    /// qwen2.5-0.5b, llama-tiny, qwen-tiny.
    #[arg(long)]
    like: String,
    /// Output directory (config.json, model.safetensors, tokenizer.json, ...).
    #[arg(short = 'o', long)]
    out: PathBuf,
    #[command(flatten)]
    opts: SynthOptions,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_synth(a: SynthArgs) -> Result<()> {
    // An unknown shape's error lists the known ones.
    let r = write_synth_model(&a.like, &a.out, &a.opts)?;
    show(a.json, &r, || format!("{}\n", r.summary(&a.out)))
}

/// `{"device", "dtype", "greedy": [[u32]; prompts], "logits": [[f32; vocab]; prompts]}`.
pub(crate) fn run_logits(a: WithModel<LogitsFlags>) -> Result<()> {
    let prompts = bench::parse_token_prompts(&a.job.tokens)?;
    let model = a.m.load()?;
    let r = a.job.run(&model, &prompts, &a.m.dtype)?;
    match &a.job.out {
        Some(p) => std::fs::write(p, serde_json::to_vec(&r)?)
            .with_context(|| format!("writing {}", p.display()))?,
        None => println!("{}", serde_json::to_string(&r)?),
    }
    Ok(())
}

/// `pgate bench`: the model, the suite, where the rows go.
#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    suite: BenchSuite,
    /// Write the rows (and bandwidth, weight and KV bytes) as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_bench(a: BenchArgs) -> Result<()> {
    let model = a.m.load()?;
    let suite = BenchSuite {
        dtype: a.m.dtype.clone(),
        threads: persona_gate::kernels::threads(),
        ..a.suite
    };
    let r = bench::run_suite(&model, &suite, &mut |e| {
        if let Event::Note(s) = e {
            eprintln!("{s}")
        }
    })?;
    if let Some(p) = &a.out {
        write_json(p, &r.json)?;
    }
    show(a.json, &r.rows, || r.table())
}
