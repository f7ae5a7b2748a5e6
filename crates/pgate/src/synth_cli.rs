//! `pgate synth-model` (seeded random models of real shapes), `pgate logits` (last-token logits and
//! greedy tokens as JSON, what `scripts/gpu/compare_hf.py` checks against transformers) and the
//! GPU-aware `pgate bench` table.

use std::path::PathBuf;

use anyhow::{Context, Result};
use persona_gate::bench::{self, BenchSuite};
use persona_gate::events::Event;
use persona_gate::model::synth::{write_synth_model, SynthOptions};

use crate::args::write_json;
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
    match a.json {
        true => println!("{}", serde_json::to_string_pretty(&r)?),
        false => println!("{}", r.summary(&a.out)),
    }
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct LogitsArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Token ids of one prompt, comma-separated (repeatable: prompts run as one left-padded batch).
    #[arg(long, required = true)]
    tokens: Vec<String>,
    /// Intervention plan (JSON or TOML) applied to every prompt.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Also generate this many greedy tokens per prompt (batched, EOS ignored).
    #[arg(long, default_value_t = 0)]
    greedy: usize,
    /// Write the JSON here instead of stdout.
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
}

/// `{"device", "dtype", "greedy": [[u32]; prompts], "logits": [[f32; vocab]; prompts]}`.
pub(crate) fn run_logits(a: LogitsArgs) -> Result<()> {
    let prompts = bench::parse_token_prompts(&a.tokens)?;
    let model = a.m.load()?;
    let plan = crate::load_plan(a.plan.as_deref(), &model)?;
    let r = bench::logits_report(&model, &prompts, plan, a.greedy, &a.m.dtype)?;
    match &a.out {
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
        threads: crate::rayon_threads(),
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
    match a.json {
        true => println!("{}", serde_json::to_string_pretty(&r.rows)?),
        false => print!("{}", r.table()),
    }
    Ok(())
}
