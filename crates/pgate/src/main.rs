//! `pgate`: the persona-gate command line. Parses arguments, calls the library, prints results.
//! Errors print as one line (`error: ...`) with a non-zero exit code.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use persona_gate::chat_job::{stats_line, ChatJob};
use persona_gate::generate::generate_chat;
use progress::Progress;

mod args;
mod directions_cli;
mod drift_cli;
mod export_cli;
mod label_cli;
mod output;
mod progress;
mod refusal_cli;
mod report_cli;
mod serve_cli;
mod study_cli;
mod synth_cli;

pub(crate) use args::ModelArgs;

#[derive(Parser)]
#[command(
    name = "pgate",
    version,
    about = "Measure and control how a chat model's persona gates its refusal"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// CPU threads for every command (default: PGATE_THREADS, else RAYON_NUM_THREADS, else the cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe a model: architecture, shape, tensor types, chat template, file sha256.
    ///
    /// Example: pgate inspect q15
    Inspect {
        /// Model file, directory, short name or hub repo id.
        model: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Skip hashing the model files (fast on large files).
        #[arg(long)]
        no_hash: bool,
    },
    /// Chat-generate for one or more prompts, in batches.
    ///
    /// Example: pgate generate q15 --prompt "How do I bake cookies?" --max-tokens 64
    Generate(args::WithModel<ChatJob>),
    /// Prefill and decode throughput at several batch sizes.
    ///
    /// Example: pgate bench q15 --dtype q --batches 1,16
    Bench(synth_cli::BenchArgs),
    /// Write a model of a real shape with seeded random weights (config.json, bf16 safetensors,
    /// tokenizer.json) that pgate and transformers load.
    ///
    /// Example: pgate synth-model --like llama-3.1-8b --seed 0 -o /tmp/llama8b
    SynthModel(synth_cli::SynthArgs),
    /// Last-token logits (and greedy tokens) of token-id prompts as JSON, for checks against other
    /// implementations.
    ///
    /// Example: pgate logits DIR --dtype f32 --device cuda --tokens 1,2,3 --greedy 16
    Logits(args::WithModel<persona_gate::bench::LogitsFlags>),
    /// Label rates (refusal / bypass / degenerate, Wilson 95% intervals) of a prompt set under an
    /// optional persona (system prompt) and intervention plan.
    ///
    /// Example: pgate eval q15 --prompts harmful_val -n 50 --ablate refusal.safetensors[12]@0-27
    Eval(args::WithModel<persona_gate::refusal::rates::RateFlags>),
    /// OpenAI-compatible chat server: persona presets (system prompt + steering), continuous
    /// batching, residual projections and the refusal guard on every response.
    ///
    /// Example: pgate serve q15 --presets examples/serve/presets.toml --directions examples/directions/q15 --guard-file q15-guard.json
    Serve(args::WithModel<persona_gate_serve::ops::ServeFlags>),
    /// The serving guard: calibrate it, measure its flag rates under a preset.
    #[command(subcommand)]
    Guard(serve_cli::GuardCmd),
    /// Load a running `pgate serve` with concurrent clients: throughput, latency, 429s, memory.
    ///
    /// Example: pgate serve-bench --url http://127.0.0.1:8080 --clients 32 --duration 60
    ServeBench(persona_gate_serve::bench::BenchFlags),
    /// Extract directions: persona traits, random controls.
    #[command(subcommand)]
    Extract(directions_cli::ExtractCmd),
    /// Norms and cosines of direction files, per layer and across layers (table, CSV, JSON).
    ///
    /// Example: pgate geometry compliant.safetensors refusal.safetensors rand.safetensors --csv geo.csv
    Geometry(persona_gate::directions::GeometryFlags),
    /// Direction files: llama.cpp control-vector export/import, info.
    #[command(subcommand)]
    Directions(directions_cli::DirectionsCmd),
    /// Studies: conditions x prompt sets x samples into a SQLite results database; status,
    /// tables with paired statistics, judges, exports.
    ///
    /// Example: pgate study run examples/demo_study.toml --db demo.sqlite
    #[command(subcommand)]
    Study(study_cli::StudyCmd),
    /// Label outputs as refusal / bypass / degenerate with a measured labeler; train and measure
    /// the labelers (docs/labels.md).
    ///
    /// Example: pgate label q15 --in outputs.jsonl -o labeled.jsonl
    Label(label_cli::LabelCmd),
    /// Refusal receipts: one JSON audit record per condition of a study (`pgate receipt DB -o DIR`),
    /// and `pgate receipt verify RECEIPT` to recompute every hash they record.
    ///
    /// Example: pgate receipt demo.sqlite -o receipts/ --policy acme-2026.11
    Receipt(report_cli::ReceiptArgs),
    /// The offline HTML report (SVG plots, example table) and a Markdown summary of a study.
    ///
    /// Example: pgate report demo.sqlite -o report/
    Report(persona_gate::report::ops::ReportFlags),
    /// Deployment gate over receipts: exit 1 when a persona mode lowers refusal too far.
    ///
    /// Example: pgate check receipts/ --max-refusal-drop 10 --max-benign-refusal 0.2
    Check(report_cli::CheckArgs),
    /// Make an Ed25519 key pair for signing receipt bundles: KEY (private, mode 0600) and
    /// KEY.pub. Refuses to overwrite. Keep the private key out of any repository.
    ///
    /// Example: pgate keygen -o ~/.config/pgate/receipts.key
    Keygen(report_cli::KeygenArgs),
    /// Write a model as a Hugging Face safetensors directory, optionally with a direction
    /// orthogonalized out of the weights (the permanent form of ablating it everywhere).
    ///
    /// Example: pgate export q15 -o q15-norefusal --orthogonalize refusal.safetensors[21]
    Export(export_cli::ExportArgs),
    /// Compare two versions of a model: persona and refusal directions across versions, their
    /// geometry, and refusal / bypass / degenerate per persona mode, paired over the same prompts;
    /// one verdict line per mode. Example: pgate drift q15 q15-baked.gguf -o drift/ -n 24
    Drift(drift_cli::DriftArgs),
    /// What activation capture costs: prefill with the last token's residual read at every layer
    /// (the direction-extraction path) against plain batched prefill of the same prompts.
    ///
    /// Example: pgate bench-capture q15 --batch 16 --prompts 64
    BenchCapture {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        sizes: persona_gate::capture_bench::CaptureBench,
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    // SAFETY: at startup, before any thread exists (it sets the thread-count environment variables).
    if let Err(e) = unsafe { persona_gate::kernels::init_threads(cli.threads) } {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    if writes_only_to_stdout(&cli.cmd) {
        restore_sigpipe();
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {}", persona_gate::error::chain_line(e.as_ref()));
        std::process::exit(1);
    }
}

/// Commands that talk to no network peer. Rust ignores SIGPIPE, so `pgate study table | head` would
/// panic on the closed pipe; these commands get the default disposition back (the process ends
/// quietly, like any Unix filter). Servers and HTTP clients keep SIGPIPE ignored: a peer closing its
/// socket must be an error they handle, not the end of the process.
fn writes_only_to_stdout(cmd: &Cmd) -> bool {
    use study_cli::StudyCmd;
    !matches!(
        cmd,
        Cmd::Serve(_) | Cmd::ServeBench(_) | Cmd::Study(StudyCmd::Run(_) | StudyCmd::Judge(_))
    )
}

#[cfg(unix)]
fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to its default at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect {
            model,
            json,
            no_hash,
        } => {
            let found = persona_gate::model::inspect::inspect(&model, !no_hash)?;
            output::show(json, &found.to_json()?, || found.to_text())
        }
        Cmd::Generate(a) => run_generate(a),
        Cmd::Bench(a) => synth_cli::run_bench(a),
        Cmd::SynthModel(a) => synth_cli::run_synth(a),
        Cmd::Logits(a) => synth_cli::run_logits(a),
        Cmd::Eval(a) => refusal_cli::run_eval(a),
        Cmd::Serve(a) => serve_cli::run_serve(a),
        Cmd::Guard(cmd) => serve_cli::run_guard(cmd),
        Cmd::ServeBench(a) => serve_cli::run_serve_bench(a),
        Cmd::Extract(cmd) => directions_cli::run_extract(cmd),
        Cmd::Geometry(args) => directions_cli::run_geometry(args),
        Cmd::Directions(cmd) => directions_cli::run_directions(cmd),
        Cmd::Study(cmd) => study_cli::run_study_cmd(cmd),
        Cmd::Label(cmd) => label_cli::run(cmd),
        Cmd::Receipt(a) => report_cli::run_receipt(a),
        Cmd::Report(a) => report_cli::run_report(a),
        Cmd::Check(a) => report_cli::run_check(a),
        Cmd::Keygen(a) => report_cli::run_keygen(a),
        Cmd::Export(a) => export_cli::run(a),
        Cmd::Drift(a) => drift_cli::run(a),
        Cmd::BenchCapture { m, sizes, json } => {
            let model = m.load()?;
            let r = sizes.run(&model)?;
            output::show(json, &r, || r.to_text(&model, &m.dtype))
        }
    }
}

/// Generate for every prompt, writing each completion to `--out` (JSONL) or stdout as it finishes.
fn run_generate(a: args::WithModel<ChatJob>) -> Result<()> {
    let list = a.job.conversations()?;
    if list.is_empty() {
        bail!("no prompts: give --prompt TEXT or --prompts FILE.jsonl");
    }
    a.job.plan.check()?;
    let model = a.m.load()?;
    let plan = args::load_plan(&a.job.plan, &model)?;
    let mut out = a.job.out_file()?;
    let many = a.job.prompts.is_some() || list.len() > 4;
    let bar = many.then(|| Progress::bar(list.len(), "prompts"));
    let (_, stats) = generate_chat(&model, &list, &a.job.settings(), plan, |_, c| {
        match out.as_mut() {
            Some(f) => f.write(c)?,
            None => {
                let text = format!("### {}\n{}\n", c.user, c.text.trim());
                match &bar {
                    Some(b) => b.print(&text),
                    None => println!("{text}"),
                }
            }
        }
        if let Some(b) = &bar {
            b.inc();
        }
        Ok(())
    })?;
    drop(bar);
    eprintln!("[pgate] {}", stats_line(list.len(), &stats));
    Ok(())
}
