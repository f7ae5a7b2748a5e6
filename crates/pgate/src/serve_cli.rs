//! `pgate serve`, `pgate guard calibrate|eval|eval-output` and `pgate serve-bench`: argument
//! parsing and printing over `persona_gate_serve`.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use persona_gate::events::Event;
use persona_gate_serve::bench::BenchConfig;
use persona_gate_serve::ops::{
    self, CalibrateJob, GuardEval, GuardEvalJob, OutputEval, OutputEvalJob, PromptSlice,
    RequestFlags, ServeOptions, ServeSetup,
};

use crate::args::write_json;
use crate::ModelArgs;

/// Serve a chat model over an OpenAI-compatible HTTP API with persona presets and the guard.
///
/// Example: pgate serve q15 --presets examples/serve/presets.toml --directions examples/directions/q15 --guard-file q15-guard.json --port 8080
#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Presets file (TOML, `[presets.NAME]` tables: system, add, add_raw, ablate, cap, plan, guard).
    #[arg(long)]
    pub presets: Option<PathBuf>,
    /// Direction files or folders of them (`*.safetensors`); presets name them by file stem.
    #[arg(long, num_args = 1..)]
    pub directions: Vec<PathBuf>,
    /// Guard mode of presets that set none: off, monitor, block (default: monitor with --guard-file).
    #[arg(long)]
    pub guard: Option<String>,
    /// Guard calibration file written by `pgate guard calibrate`.
    #[arg(long)]
    pub guard_file: Option<PathBuf>,
    /// Output guard mode of presets that set none: off, monitor, block. The probe reads each answer
    /// and flags compliance with a request the default persona would refuse (needs --guard-file).
    #[arg(long, default_value = "off")]
    pub output_guard: String,
    /// Probe file for the output guard (`pgate label train`; default: the model's built-in probe).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// Block-mode streams: check every N tokens, send text only once checked (0: once at the end).
    #[arg(long, default_value_t = 0)]
    pub output_guard_every: usize,
    /// Answers per forward of the output guard's reader.
    #[arg(long, default_value_t = 4)]
    pub output_guard_batch: usize,
    /// Direction (by name among --directions) whose projections responses report as `persona`.
    #[arg(long, default_value = "compliant")]
    pub persona_direction: String,
    /// Direction reported as `refusal`.
    #[arg(long, default_value = "refusal")]
    pub refusal_direction: String,
    /// Layers per window of the reported projections.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the line `listening on http://HOST:PORT` says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together (continuous batching); 1 serves one request at a time.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Requests that may wait for a batch slot; beyond that, 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Largest conversation, in tokens after the chat template.
    #[arg(long, default_value_t = 4096)]
    pub max_prompt_tokens: usize,
    /// Seconds from arrival to the last token (queueing included); then 504.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Require `Authorization: Bearer KEY` on /v1/*, /metrics, /health details ($PGATE_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Serve /metrics without the API key (trusted networks: preset names become public).
    #[arg(long)]
    pub public_metrics: bool,
    /// Connections at once; at the cap the oldest idle connection is closed for a new one.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds to send a request head (also the keep-alive idle timeout), else closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client has to send the whole request body; then 408.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
}

pub fn run_serve(a: ServeArgs) -> Result<()> {
    let requests = RequestFlags {
        max_tokens: a.max_tokens,
        default_max_tokens: a.default_max_tokens,
        max_prompt_tokens: a.max_prompt_tokens,
        timeout_s: a.timeout,
        body_timeout_s: a.body_timeout,
        max_connections: a.max_connections,
        header_timeout_s: a.header_timeout,
    };
    let api_key = a.api_key.or_else(|| env_key().filter(|k| !k.is_empty()));
    let setup = ServeSetup::prepare(ServeOptions {
        model_id: a.m.model.clone(),
        presets: a.presets,
        directions: a.directions,
        guard: a.guard,
        guard_file: a.guard_file,
        output_guard: a.output_guard,
        probe: a.probe,
        output_guard_every: a.output_guard_every,
        output_guard_batch: a.output_guard_batch,
        persona_direction: a.persona_direction,
        refusal_direction: a.refusal_direction,
        window: a.window,
        requests,
        queue: a.queue,
        max_batch: a.max_batch,
        api_key,
        public_metrics: a.public_metrics,
    })?;
    eprintln!("[pgate serve] loading {}", a.m.model);
    let model = a.m.load()?;
    let mut log = notes("[pgate serve]");
    let cfg = setup.build(&model, &mut log)?;
    ops::serve_blocking(model, cfg, &a.host, a.port, &mut log, |addr| {
        // Tests and scripts read this line for the port.
        println!("listening on http://{addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}

fn env_key() -> Option<String> {
    std::env::var("PGATE_API_KEY").ok()
}

/// A sink printing the notes and warnings of an operation on stderr after `prefix`.
fn notes(prefix: &'static str) -> impl FnMut(Event) {
    move |e| match e {
        Event::Note(s) => eprintln!("{prefix} {s}"),
        Event::Warning(s) => eprintln!("{prefix} warning: {s}"),
        _ => {}
    }
}

#[derive(Subcommand)]
pub enum GuardCmd {
    /// Fit the guard: a logistic refusal-intent probability from the refusal direction's
    /// projection under the default persona, and the spread of the persona direction's projection
    /// per layer; report true and false positive rates on held-out sets.
    ///
    /// Example: pgate guard calibrate q15 --refusal refusal.safetensors --persona compliant.safetensors -o q15-guard.json
    Calibrate(CalibrateArgs),
    /// Guard flag rates under a preset: on harmful prompts the default persona refuses (it
    /// generates them first) and on harmless prompts.
    ///
    /// Example: pgate guard eval q15 --guard-file q15-guard.json --presets presets.toml --preset compliant --harmful strongreject --harmless harmless_val --harmless-skip 200
    Eval(GuardEvalArgs),
    /// Output guard rates: generate under each preset, label the answers, and report the share
    /// flagged among compliant answers to requests the default persona refuses (true positives)
    /// and among refusals and answers to harmless requests (false positives), as a Markdown table.
    ///
    /// Example: pgate guard eval-output q15 --guard-file examples/serve/q15-guard.json --presets examples/serve/presets.toml --directions examples/directions/q15 --preset compliant,builtin -n 50
    EvalOutput(OutputEvalArgs),
}

#[derive(Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Refusal direction file (`pgate extract refusal`).
    #[arg(long)]
    pub refusal: PathBuf,
    /// Layer to read refusal intent at (default: the file's selected layer).
    #[arg(long)]
    pub refusal_layer: Option<usize>,
    /// Persona (compliant) direction file (`pgate extract trait --trait compliant`).
    #[arg(long)]
    pub persona: PathBuf,
    /// Layers to read the persona shift at, e.g. 8-20 (default: all).
    #[arg(long)]
    pub persona_layers: Option<String>,
    #[arg(short, long)]
    pub out: PathBuf,
    /// Harmful calibration prompts (file or name).
    #[arg(long, default_value = "harmful_train")]
    pub harmful: String,
    /// Harmless calibration prompts.
    #[arg(long, default_value = "harmless_train")]
    pub harmless: String,
    /// Skip the first K calibration prompts of each set (those the directions were extracted from).
    #[arg(long, default_value_t = 128)]
    pub skip: usize,
    /// Calibration prompts per set.
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n: usize,
    /// Held-out harmful prompts.
    #[arg(long, default_value = "harmful_val")]
    pub test_harmful: String,
    /// Held-out harmless prompts.
    #[arg(long, default_value = "harmless_val")]
    pub test_harmless: String,
    /// Held-out prompts per set.
    #[arg(long, default_value_t = 100)]
    pub test_n: usize,
    /// Highest false positive rate of refusal intent on the harmless calibration set.
    #[arg(long, default_value_t = 0.02)]
    pub max_fpr: f64,
    /// Persona shift (in calibrated spreads) that counts as a different persona.
    #[arg(long, default_value_t = 4.0)]
    pub shift_threshold: f64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

fn run_calibrate(a: CalibrateArgs) -> Result<()> {
    let input = CalibrateJob {
        refusal: a.refusal,
        refusal_layer: a.refusal_layer,
        persona: a.persona,
        persona_layers: a.persona_layers,
        harmful: PromptSlice::new(a.harmful, a.skip, a.n),
        harmless: PromptSlice::new(a.harmless, a.skip, a.n),
        test_harmful: PromptSlice::new(a.test_harmful, 0, a.test_n),
        test_harmless: PromptSlice::new(a.test_harmless, 0, a.test_n),
        max_fpr: a.max_fpr,
        shift_threshold: a.shift_threshold,
        batch_size: a.batch_size,
    }
    .input()?;
    let model = a.m.load()?;
    let t0 = Instant::now();
    let g = ops::calibrate_guard(&model, &input, &a.out, &mut notes("[pgate guard]"))?;
    print!("{}", g.to_text());
    println!(
        "wrote {} ({:.0} s)",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct GuardEvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long)]
    pub guard_file: PathBuf,
    #[arg(long)]
    pub presets: PathBuf,
    /// Preset to score under.
    #[arg(long)]
    pub preset: String,
    /// Direction files or folders the presets name.
    #[arg(long, num_args = 1..)]
    pub directions: Vec<PathBuf>,
    #[arg(long, default_value = "strongreject")]
    pub harmful: String,
    #[arg(long, default_value_t = 0)]
    pub harmful_skip: usize,
    /// Harmful prompts (all when absent).
    #[arg(short = 'n', long)]
    pub n: Option<usize>,
    #[arg(long, default_value = "harmless_val")]
    pub harmless: String,
    /// Skip harmless prompts used as held-out by calibration.
    #[arg(long, default_value_t = 100)]
    pub harmless_skip: usize,
    #[arg(long, default_value_t = 100)]
    pub harmless_n: usize,
    /// New tokens of the default persona's answers (labelled refusal / bypass / degenerate).
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also generate under the preset and label those answers (shows the preset complies).
    #[arg(long)]
    pub generate_preset: bool,
    /// Write one JSON line per prompt (scores, flag, labels) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn run_guard_eval(a: GuardEvalArgs) -> Result<()> {
    let eval = GuardEval::new(GuardEvalJob {
        guard_file: a.guard_file,
        presets: a.presets,
        preset: a.preset,
        directions: a.directions,
        harmful: PromptSlice::new(a.harmful, a.harmful_skip, a.n.unwrap_or(usize::MAX)),
        harmless: PromptSlice::new(a.harmless, a.harmless_skip, a.harmless_n),
        max_tokens: a.max_tokens,
        batch_size: a.batch_size,
        generate_preset: a.generate_preset,
    })?;
    let model = a.m.load()?;
    let t0 = Instant::now();
    let r = eval.run(&model, &mut notes("[pgate guard]"))?;
    if let Some(p) = &a.out {
        r.write_rows(p)?;
    }
    print!("{}", r.to_text());
    println!("({:.0} s)", t0.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Args)]
pub struct OutputEvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Guard calibration file (refusal intent, `pgate guard calibrate`).
    #[arg(long)]
    pub guard_file: PathBuf,
    /// Probe file (default: the built-in probe for this model).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// Presets file; a --preset name not in it is a built-in persona mode or `default`.
    #[arg(long)]
    pub presets: Option<PathBuf>,
    /// Direction files or folders the presets name.
    #[arg(long, num_args = 1..)]
    pub directions: Vec<PathBuf>,
    /// Presets to evaluate, comma-separated: names in --presets, `default`, a built-in persona mode
    /// (friendly, direct, supportive, creative, customer-success, companion), or `builtin` for all
    /// six (default: every preset of --presets, then `builtin`).
    #[arg(long, value_delimiter = ',')]
    pub preset: Vec<String>,
    #[arg(long, default_value = "strongreject")]
    pub harmful: String,
    #[arg(long, default_value_t = 0)]
    pub harmful_skip: usize,
    /// Harmful prompts.
    #[arg(short = 'n', long, default_value_t = 50)]
    pub n: usize,
    #[arg(long, default_value = "harmless_val")]
    pub harmless: String,
    /// Skip harmless prompts used as held-out by calibration.
    #[arg(long, default_value_t = 100)]
    pub harmless_skip: usize,
    #[arg(long, default_value_t = 50)]
    pub harmless_n: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Reference labeler: ensemble (shares the probe with the guard) or rules (shares nothing).
    #[arg(long, default_value = "ensemble")]
    pub reference: String,
    /// Write the report (rates and every answer with its labels and verdict) as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn run_output_eval(a: OutputEvalArgs) -> Result<()> {
    let eval = OutputEval::new(OutputEvalJob {
        guard_file: a.guard_file,
        probe: a.probe,
        presets: a.presets,
        directions: a.directions,
        preset: a.preset,
        harmful: PromptSlice::new(a.harmful, a.harmful_skip, a.n),
        harmless: PromptSlice::new(a.harmless, a.harmless_skip, a.harmless_n),
        max_tokens: a.max_tokens,
        batch_size: a.batch_size,
        reference: a.reference,
    })?;
    let model = a.m.load()?;
    let t0 = Instant::now();
    let r = eval.run(&model, &mut notes("[pgate guard]"))?;
    print!("{}", r.markdown());
    if let Some(p) = &a.out {
        write_json(p, &r)?;
        println!("wrote {}", p.display());
    }
    println!("({:.0} s)", t0.elapsed().as_secs_f64());
    Ok(())
}

pub fn run_guard(cmd: GuardCmd) -> Result<()> {
    match cmd {
        GuardCmd::Calibrate(a) => run_calibrate(a),
        GuardCmd::Eval(a) => run_guard_eval(a),
        GuardCmd::EvalOutput(a) => run_output_eval(a),
    }
}

/// Load a running `pgate serve` with concurrent clients.
///
/// Example: pgate serve-bench --url http://127.0.0.1:8080 --clients 32 --duration 60
#[derive(Args)]
pub struct ServeBenchArgs {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Seconds of load (requests in flight then finish).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value = "default")]
    pub preset: String,
    #[arg(long)]
    pub api_key: Option<String>,
    /// Per-request client timeout, seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run_serve_bench(a: ServeBenchArgs) -> Result<()> {
    let cfg = BenchConfig {
        url: a.url,
        clients: a.clients.max(1),
        duration: Duration::from_secs(a.duration),
        max_tokens: a.max_tokens,
        preset: a.preset,
        api_key: a.api_key.or_else(env_key),
        timeout: Duration::from_secs(a.timeout),
    };
    let r = persona_gate_serve::bench::run(&cfg, |m| eprintln!("[serve-bench] {m}"))?;
    print!("{}", r.summary());
    if let Some(p) = &a.out {
        write_json(p, &r)?;
    }
    if r.errors > 0 {
        bail!("{} requests failed (other than 429)", r.errors);
    }
    Ok(())
}
