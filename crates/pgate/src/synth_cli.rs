//! `pgate synth-model` (seeded random models of real shapes), `pgate logits` (last-token logits and
//! greedy tokens as JSON, what `scripts/gpu/compare_hf.py` checks against transformers) and the
//! GPU-aware `pgate bench` table.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use persona_gate::bench::{self, BenchConfig, BenchRow};
use persona_gate::generate::{GenRequest, Generator, Sampling};
use persona_gate::model::synth::{write_synth_model, SynthOptions, PRESETS};

use crate::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct SynthArgs {
    /// Shape to copy: llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, qwen2.5-7b, qwen2.5-1.5b,
    /// qwen2.5-0.5b, llama-tiny, qwen-tiny.
    #[arg(long)]
    like: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (config.json, model.safetensors, tokenizer.json, ...).
    #[arg(short = 'o', long)]
    out: PathBuf,
    /// Keep the shape but use this many layers (small test models of real width).
    #[arg(long)]
    layers: Option<usize>,
    /// Store f32 instead of bf16.
    #[arg(long)]
    f32: bool,
    /// Standard deviation of the matrices and embeddings.
    #[arg(long, default_value_t = 0.02)]
    std: f32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run_synth(a: SynthArgs) -> Result<()> {
    let opts = SynthOptions {
        seed: a.seed,
        f32: a.f32,
        std: a.std,
        layers: a.layers,
    };
    let r = write_synth_model(&a.like, &a.out, &opts)
        .with_context(|| format!("known shapes: {}", PRESETS.join(", ")))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}: {} ({} layers, width {}, vocab {}), {} tensors, {:.2} B parameters, {:.2} GB in {:.1} s",
            a.out.display(),
            r.like,
            r.config.n_layers,
            r.config.d_model,
            r.config.vocab_size,
            r.tensors,
            r.n_params as f64 / 1e9,
            r.bytes as f64 / 1e9,
            r.secs
        );
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
    /// Intervention plan (JSON) applied to every prompt.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Also generate this many greedy tokens per prompt (batched, EOS ignored).
    #[arg(long, default_value_t = 0)]
    greedy: usize,
    /// Write the JSON here instead of stdout.
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
}

/// `{"logits": [[f32; vocab]; prompts], "greedy": [[u32]; prompts], "device", "dtype"}`.
pub(crate) fn run_logits(a: LogitsArgs) -> Result<()> {
    let prompts: Vec<Vec<u32>> = a
        .tokens
        .iter()
        .map(|s| {
            s.split(',')
                .map(|t| t.trim().parse::<u32>().context("token ids are integers"))
                .collect::<Result<Vec<u32>>>()
        })
        .collect::<Result<_>>()?;
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("empty --tokens");
    }
    let model = a.m.load()?;
    let plan = crate::load_plan(a.plan.as_deref(), &model)?;
    let logits = bench::last_token_logits(&model, &prompts, plan.clone())?;
    let greedy: Vec<Vec<u32>> = if a.greedy > 0 {
        let reqs: Vec<GenRequest> = prompts
            .iter()
            .map(|p| GenRequest {
                prompt: p.clone(),
                max_new_tokens: a.greedy,
                sampling: Sampling::greedy(),
                stop: Vec::new(),
                plan: plan.clone(),
            })
            .collect();
        Generator::new(&model.decoder, prompts.len())
            .run(&reqs, None, |_, _| Ok(()))?
            .into_iter()
            .map(|o| o.tokens)
            .collect()
    } else {
        Vec::new()
    };
    let out = serde_json::json!({
        "device": format!("{:?}", model.decoder.device()),
        "dtype": a.m.dtype,
        "logits": logits,
        "greedy": greedy,
    });
    match &a.out {
        Some(p) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            );
            serde_json::to_writer(&mut f, &out)?;
            f.flush()?;
        }
        None => println!("{}", serde_json::to_string(&out)?),
    }
    Ok(())
}

/// `pgate bench` options beyond the model.
pub(crate) struct BenchOpts {
    pub batches: Vec<usize>,
    pub new_tokens: usize,
    pub prompt_tokens: Option<usize>,
    pub reps: usize,
    pub warmup: usize,
    pub plan: Option<PathBuf>,
    pub steer: Vec<String>,
    pub seed: u64,
    pub cuda_graphs: String,
    pub json: bool,
    pub out: Option<PathBuf>,
}

pub(crate) fn run_bench(m: &ModelArgs, o: BenchOpts) -> Result<()> {
    let model = m.load()?;
    let dev = model.decoder.device().clone();
    let copy_gbs = bench::copy_bandwidth(&dev)?;
    // (name, plan) pairs: a plan file, or the built-in steering presets (default: none).
    let mut plans = Vec::new();
    if let Some(p) = &o.plan {
        let name = p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        plans.push((name, crate::load_plan(Some(p), &model)?));
    }
    let steer: Vec<String> = if o.steer.is_empty() && o.plan.is_none() {
        vec!["none".into()]
    } else {
        o.steer.clone()
    };
    for s in &steer {
        let plan = match bench::steer_preset(s, &model, o.seed)? {
            Some(p) => {
                let c = model.config();
                Some(Arc::new(p.compile(
                    c.n_layers,
                    c.d_model,
                    model.decoder.dtype(),
                    &dev,
                )?))
            }
            None => None,
        };
        plans.push((s.clone(), plan));
    }
    let header = format!(
        "model {} ({}, {:.2} B params, dtype {}, device {}{})",
        model.info.name,
        model.info.architecture,
        model.info.n_params as f64 / 1e9,
        m.dtype,
        if dev.is_cpu() { "cpu" } else { "cuda" },
        match copy_gbs {
            Some(bw) => format!(", copy bandwidth {bw:.0} GB/s"),
            None => format!(", {} threads", crate::rayon_threads()),
        }
    );
    eprintln!("{header}");
    let graph_modes: &[bool] = match o.cuda_graphs.as_str() {
        "off" => &[false],
        "both" => &[true, false],
        _ => &[true],
    };
    let mut rows: Vec<BenchRow> = Vec::new();
    for (name, plan) in plans {
        for &b in &o.batches {
            for &cuda_graphs in graph_modes {
                let r = bench::run(
                    &model,
                    &BenchConfig {
                        batches: vec![b],
                        new_tokens: o.new_tokens,
                        prompt_tokens: o.prompt_tokens,
                        reps: o.reps,
                        plan: plan.clone(),
                        plan_name: name.clone(),
                        warmup: o.warmup,
                        copy_gbs,
                        cuda_graphs,
                    },
                )?;
                for row in &r {
                    eprintln!("{}", serde_json::to_string(row)?);
                }
                rows.extend(r);
            }
        }
    }
    if let Some(p) = &o.out {
        let v = serde_json::json!({
            "model": model.info.name, "n_params": model.info.n_params, "dtype": m.dtype,
            "device": format!("{dev:?}"), "copy_GBs": copy_gbs,
            "weight_bytes": bench::weight_bytes(&model), "kv_bytes_per_token": bench::kv_bytes_per_token(&model),
            "rows": rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{header}");
    println!(
        "{:>11} {:>6} {:>7} {:>5} {:>10} {:>9} {:>13} {:>12} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "plan",
        "batch",
        "prompt",
        "new",
        "tok/s",
        "step ms",
        "prefill tok/s",
        "decode tok/s",
        "dec ms",
        "issue ms",
        "floor ms",
        "floor%",
        "graphs"
    );
    for r in &rows {
        println!(
            "{:>11} {:>6} {:>7} {:>5} {:>10.1} {:>9.2} {:>13.1} {:>12.1} {:>9.2} {:>9.2} {:>9} {:>7} {:>7}",
            r.plan,
            r.batch,
            r.prompt_tokens,
            r.new_tokens,
            r.tok_s,
            r.step_ms,
            r.prefill_tok_s,
            r.decode_tok_s,
            r.decode_ms_per_step,
            r.issue_ms_per_step,
            r.floor_ms.map_or("-".into(), |f| format!("{f:.2}")),
            r.floor_frac
                .map_or("-".into(), |f| format!("{:.0}%", 100.0 * f)),
            r.graph_steps,
        );
    }
    Ok(())
}
