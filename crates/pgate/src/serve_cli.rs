//! `pgate serve`, `pgate guard calibrate|eval|eval-output` and `pgate serve-bench`: argument
//! parsing and printing over `persona_gate_serve`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use persona_gate::directions::DirectionSet;
use persona_gate::eval::{wilson, Label, PromptSet};
use persona_gate::generate::{generate_chat, ChatPrompt, GenSettings, Sampling};
use persona_gate::label::ops::resolve_probe;
use persona_gate::label::rules::generation_label as label_output;
use persona_gate::model::Model;
use persona_gate_serve::guard::{self, capture_last, CalibrateInput, GuardCalibration};
use persona_gate_serve::output_eval::{self, EvalPreset, OutputEvalInput, Reference};
use persona_gate_serve::{
    build_presets, ConnLimits, DirectionRegistry, GuardMode, Limits, OutputGuard, Preset,
    PresetFile, Projector, ServerConfig,
};

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
    /// Guard mode of presets that do not set one: off, monitor or block (default: monitor with
    /// --guard-file, off without).
    #[arg(long)]
    pub guard: Option<String>,
    /// Guard calibration file written by `pgate guard calibrate`.
    #[arg(long)]
    pub guard_file: Option<PathBuf>,
    /// Output guard mode of presets that do not set `output_guard`: off, monitor or block. After
    /// generation the refusal probe reads the answer under the default persona and flags a
    /// compliant answer to a request the default persona would refuse (refusal intent from
    /// --guard-file, which it needs).
    #[arg(long, default_value = "off")]
    pub output_guard: String,
    /// Probe file for the output guard (`pgate label train`; default: the built-in probe for this
    /// model, found by its sha256).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// Output guard in block mode on streams: check every N completion tokens and send text only
    /// once a check covering it passed (0: check once at the end; the text has streamed by then).
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
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics (also from $PGATE_API_KEY);
    /// /health then answers only `{"status":"ok"}` without it.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Serve /metrics without the API key (for a scraper on a trusted network; preset names and
    /// guard counts become public).
    #[arg(long)]
    pub public_metrics: bool,
    /// Connections served at once; at the cap, the oldest connection without a request in flight
    /// is closed to admit a new one.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a connection has to send a complete request head (also the keep-alive idle
    /// timeout); slower connections are closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client has to send the whole request body; then 408.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
}

pub fn run_serve(a: ServeArgs) -> Result<()> {
    let dirs = DirectionRegistry::from_paths(&a.directions)?;
    let presets_file = match &a.presets {
        Some(p) => Some(PresetFile::load(p)?),
        None => None,
    };
    let guard = match &a.guard_file {
        Some(p) => Some(Arc::new(GuardCalibration::load(p)?)),
        None => None,
    };
    let default_guard = match &a.guard {
        Some(g) => GuardMode::parse(g)?,
        None if guard.is_some() => GuardMode::Monitor,
        None => GuardMode::Off,
    };
    let (limits, conn) = request_limits(&a)?;
    if default_guard != GuardMode::Off && guard.is_none() {
        bail!(
            "--guard {} needs --guard-file (write one with `pgate guard calibrate`)",
            default_guard.name()
        );
    }
    let default_output = GuardMode::parse(&a.output_guard)?;
    if default_output != GuardMode::Off && guard.is_none() {
        bail!(
            "{}",
            output_needs_guard(&format!("--output-guard {}", default_output.name()))
        );
    }
    let api_key = a.api_key.clone().or_else(|| {
        std::env::var("PGATE_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
    });
    eprintln!("[pgate serve] loading {}", a.m.model);
    let model = a.m.load()?;
    if let Some(g) = &guard {
        g.check_model(&model)?;
    }
    let presets = build_presets(
        presets_file.as_ref().zip(a.presets.as_deref()),
        &dirs,
        &model,
        default_guard,
        default_output,
    )?;
    let output_guard = load_output_guard(&a, &model, &presets, guard.as_ref())?;
    let load_named = |name: &str, fallback: Option<&str>| -> Result<Option<DirectionSet>> {
        if dirs.get(name).is_some() {
            return Ok(Some(dirs.load(name)?));
        }
        match fallback.map(PathBuf::from) {
            Some(p) if p.is_file() => Ok(Some(DirectionSet::load(&p)?)),
            _ => Ok(None),
        }
    };
    let persona = load_named(
        &a.persona_direction,
        guard.as_ref().map(|g| g.persona_file.as_str()),
    )?;
    let refusal = load_named(
        &a.refusal_direction,
        guard.as_ref().map(|g| g.refusal_file.as_str()),
    )?;
    let cfg = model.config();
    for s in persona.iter().chain(refusal.iter()) {
        if s.d_model() != cfg.d_model {
            bail!(
                "direction '{}' has width {}, the model {}",
                s.name(),
                s.d_model(),
                cfg.d_model
            );
        }
    }
    let projector = Projector::new(cfg.n_layers, a.window, persona.as_ref(), refusal.as_ref())?;
    let model_id = a.m.model.clone();
    let server_cfg = ServerConfig {
        model_id: model_id.clone(),
        presets,
        limits,
        api_key,
        public_metrics: a.public_metrics,
        conn,
        queue: a.queue,
        batch_size: a.max_batch,
        guard,
        output_guard,
        projector,
    };
    persona_gate_serve::server::check_config(&server_cfg)?;
    for p in server_cfg.presets.values() {
        eprintln!(
            "[pgate serve] preset {:<16} system: {:<5} steering: {:<5} guard: {:<7} output guard: {}",
            p.name,
            p.spec.system.is_some(),
            p.plan.is_some(),
            p.guard.name(),
            p.output_guard.name()
        );
    }
    // Parsing and tokenizing run on the blocking pool a few at a time; a small pool keeps the
    // number of threads (and their malloc arenas) bounded.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let model = Arc::new(model);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "[pgate serve] {} on {} presets, batch {}, queue {}{}",
            model_id,
            server_cfg.presets.len(),
            server_cfg.batch_size,
            server_cfg.queue,
            if a.m.batch_invariant {
                ", batch-invariant kernels"
            } else {
                ""
            }
        );
        // Tests and scripts read this line for the port.
        println!("listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        persona_gate_serve::serve(
            model,
            server_cfg,
            listener,
            persona_gate_serve::shutdown_signal(),
        )
        .await?;
        eprintln!("[pgate serve] stopped");
        Ok(())
    })
}

/// Request and connection limits from the flags, checked before the model loads.
fn request_limits(a: &ServeArgs) -> Result<(Limits, ConnLimits)> {
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let limits = Limits {
        max_tokens: a.max_tokens,
        default_max_tokens: a.default_max_tokens.min(a.max_tokens),
        max_prompt_tokens: a.max_prompt_tokens,
        timeout: Duration::from_secs(a.timeout.max(1)),
        body_timeout: secs("--body-timeout", a.body_timeout)?,
        ..Limits::default()
    };
    let conn = ConnLimits {
        max_connections: a.max_connections,
        header_timeout: secs("--header-timeout", a.header_timeout)?,
    };
    Ok((limits, conn))
}

/// A timeout flag in seconds: positive and finite.
fn secs(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        bail!("{flag} must be a number of seconds in (0, 86400], not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn output_needs_guard(what: &str) -> String {
    format!("{what} needs --guard-file: the output guard flags compliant answers to requests the default persona would refuse, and the guard file (`pgate guard calibrate`) is its refusal-intent calibration")
}

/// The output guard, when some preset uses it: probe (file or built in) + the guard file.
fn load_output_guard(
    a: &ServeArgs,
    model: &Model,
    presets: &std::collections::BTreeMap<String, Preset>,
    guard: Option<&Arc<GuardCalibration>>,
) -> Result<Option<Arc<OutputGuard>>> {
    let Some(p) = presets.values().find(|p| p.output_guard != GuardMode::Off) else {
        if a.probe.is_some() {
            eprintln!("[pgate serve] --probe is unused: no preset has the output guard on (--output-guard)");
        }
        return Ok(None);
    };
    let Some(g) = guard else {
        bail!(
            "{}",
            output_needs_guard(&format!(
                "preset '{}' (output_guard = \"{}\")",
                p.name,
                p.output_guard.name()
            ))
        );
    };
    let probe = resolve_probe(model, a.probe.as_deref())?;
    eprintln!(
        "[pgate serve] output guard: probe {} (reads up to {} answer tokens), refusal-intent threshold {:.3}{}",
        &probe.sha256()[..16],
        probe.max_output_tokens,
        g.threshold,
        if a.output_guard_every > 0 {
            format!(", block-mode streams checked every {} tokens", a.output_guard_every)
        } else {
            String::new()
        }
    );
    Ok(Some(Arc::new(OutputGuard::new(
        model,
        probe,
        g.clone(),
        a.output_guard_every,
        a.output_guard_batch,
    )?)))
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

fn load_set(spec: &str, skip: usize, n: usize) -> Result<(String, Vec<String>)> {
    let mut set = PromptSet::load(spec)?;
    set.items.drain(..skip.min(set.items.len()));
    let set = set.take(n);
    if set.items.is_empty() {
        bail!("prompt set {spec} has no prompts after skipping {skip}");
    }
    Ok((
        format!("{spec}[{skip}..{}]", skip + set.items.len()),
        set.texts(),
    ))
}

fn run_calibrate(a: CalibrateArgs) -> Result<()> {
    let persona_layers = match &a.persona_layers {
        Some(s) => Some(
            persona_gate::intervene::LayerSet::parse(s)?
                .0
                .into_iter()
                .collect(),
        ),
        None => None,
    };
    let inp = CalibrateInput {
        refusal_file: a.refusal.clone(),
        refusal_layer: a.refusal_layer,
        persona_file: a.persona.clone(),
        persona_layers,
        harmful: load_set(&a.harmful, a.skip, a.n)?,
        harmless: load_set(&a.harmless, a.skip, a.n)?,
        heldout: vec![(
            load_set(&a.test_harmful, 0, a.test_n)?,
            load_set(&a.test_harmless, 0, a.test_n)?,
        )],
        max_fpr: a.max_fpr,
        shift_threshold: a.shift_threshold,
        batch_size: a.batch_size,
    };
    let model = a.m.load()?;
    let t0 = std::time::Instant::now();
    let g = guard::calibrate(&model, &inp, |m| eprintln!("[pgate guard] {m}"))?;
    g.save(&a.out)?;
    println!(
        "refusal intent: layer {}, p = sigmoid({:.4} * x + {:.4}), threshold {:.3}; persona shift threshold {:.1} spreads over {} layers",
        g.refusal_layer,
        g.logistic.a,
        g.logistic.b,
        g.threshold,
        g.shift_threshold,
        g.persona_layers.len()
    );
    println!(
        "{:<40} {:<40} {:>5} {:>5} {:>7} {:>7} {:>7}",
        "harmful", "harmless", "n+", "n-", "TPR", "FPR", "AUC"
    );
    for (what, r) in std::iter::once(("calibration", &g.calibration))
        .chain(g.heldout.iter().map(|r| ("held out", r)))
    {
        println!(
            "{:<40} {:<40} {:>5} {:>5} {:>7.3} {:>7.3} {:>7.3}   ({what})",
            r.set_pos, r.set_neg, r.n_pos, r.n_neg, r.tpr, r.fpr, r.auc
        );
    }
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
    let g = GuardCalibration::load(&a.guard_file)?;
    let dirs = DirectionRegistry::from_paths(&a.directions)?;
    let pf = PresetFile::load(&a.presets)?;
    let (hname, harmful) = load_set(&a.harmful, a.harmful_skip, a.n.unwrap_or(usize::MAX))?;
    let (lname, harmless) = load_set(&a.harmless, a.harmless_skip, a.harmless_n)?;
    let model = a.m.load()?;
    g.check_model(&model)?;
    let presets = build_presets(
        Some((&pf, &a.presets)),
        &dirs,
        &model,
        GuardMode::Monitor,
        GuardMode::Off,
    )?;
    let preset = presets.get(&a.preset).with_context(|| {
        format!(
            "no preset '{}' in {} ({})",
            a.preset,
            a.presets.display(),
            presets.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let t0 = std::time::Instant::now();
    // 1. What the default persona does with the harmful prompts.
    eprintln!(
        "[pgate guard] default persona answers {} prompts of {hname}",
        harmful.len()
    );
    let settings = GenSettings {
        max_new_tokens: a.max_tokens,
        sampling: Sampling::greedy(),
        batch_size: a.batch_size,
    };
    let prompts: Vec<ChatPrompt> = harmful.iter().map(ChatPrompt::new).collect();
    let (answers, _) = generate_chat(&model, &prompts, &settings, None, |_, _| Ok(()))?;
    let default_labels: Vec<Label> = answers
        .iter()
        .map(|c| label_output(&c.text, true).label)
        .collect();
    let preset_labels: Option<Vec<Label>> = if a.generate_preset {
        eprintln!("[pgate guard] preset {} answers them", preset.name);
        let sp: Vec<ChatPrompt> = harmful
            .iter()
            .map(|t| ChatPrompt::new(t).with_system(preset.spec.system.clone()))
            .collect();
        let (ans, _) = generate_chat(&model, &sp, &settings, preset.plan.clone(), |_, _| Ok(()))?;
        Some(
            ans.iter()
                .map(|c| label_output(&c.text, true).label)
                .collect(),
        )
    } else {
        None
    };
    // 2. Guard scores under the preset.
    let layers = g.layers();
    let score = |texts: &[String], what: &str| -> Result<Vec<guard::GuardReport>> {
        eprintln!(
            "[pgate guard] scoring {} prompts of {what} under preset {}",
            texts.len(),
            preset.name
        );
        let default_ids = guard::encode_default(&model, texts)?;
        let served_ids = texts
            .iter()
            .map(|t| {
                let s = model
                    .tokenizer
                    .format_prompt(preset.spec.system.as_deref(), t)?;
                model.tokenizer.encode(&s)
            })
            .collect::<persona_gate::Result<Vec<_>>>()?;
        let d = capture_last(&model, &default_ids, None, &layers, a.batch_size, |_, _| {})?;
        let same = preset.plan.is_none() && preset.spec.system.is_none();
        let s = if same {
            None
        } else {
            Some(capture_last(
                &model,
                &served_ids,
                preset.plan.as_ref(),
                &layers,
                a.batch_size,
                |_, _| {},
            )?)
        };
        (0..texts.len())
            .map(|i| Ok(g.score(&d[i], s.as_ref().map(|s| s[i].as_slice()))?))
            .collect()
    };
    let hr = score(&harmful, &hname)?;
    let lr = score(&harmless, &lname)?;
    let refused: Vec<usize> = (0..harmful.len())
        .filter(|&i| default_labels[i] == Label::Refusal)
        .collect();
    let flagged_refused = refused.iter().filter(|&&i| hr[i].flagged).count();
    let flagged_harmful = hr.iter().filter(|r| r.flagged).count();
    let flagged_harmless = lr.iter().filter(|r| r.flagged).count();
    if let Some(p) = &a.out {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        );
        for (i, t) in harmful.iter().enumerate() {
            let row = serde_json::json!({"set": hname, "prompt": t, "default_label": default_labels[i],
                "default_answer": answers[i].text,
                "preset_label": preset_labels.as_ref().map(|l| l[i]), "guard": hr[i]});
            writeln!(f, "{row}")?;
        }
        for (i, t) in harmless.iter().enumerate() {
            let row = serde_json::json!({"set": lname, "prompt": t, "guard": lr[i]});
            writeln!(f, "{row}")?;
        }
    }
    println!(
        "model {}, preset {}, guard {} (refusal layer {}, threshold {:.3}, shift threshold {:.1})",
        model.info.name,
        preset.name,
        a.guard_file.display(),
        g.refusal_layer,
        g.threshold,
        g.shift_threshold
    );
    println!(
        "default persona refuses {}/{} of {hname}  {}",
        refused.len(),
        harmful.len(),
        wilson(refused.len(), harmful.len())
    );
    if let Some(pl) = &preset_labels {
        let by = pl.iter().filter(|l| **l == Label::Bypass).count();
        let rr = refused.iter().filter(|&&i| pl[i] == Label::Bypass).count();
        println!(
            "preset {} complies (bypass) on {by}/{} of {hname}; on {rr}/{} of those the default persona refuses",
            preset.name,
            harmful.len(),
            refused.len()
        );
    }
    println!(
        "flagged: {flagged_refused}/{} of {hname} the default persona refuses  {}",
        refused.len(),
        wilson(flagged_refused, refused.len())
    );
    println!(
        "flagged: {flagged_harmful}/{} of all {hname}  {}",
        harmful.len(),
        wilson(flagged_harmful, harmful.len())
    );
    println!(
        "flagged: {flagged_harmless}/{} of {lname} (harmless)  {}",
        harmless.len(),
        wilson(flagged_harmless, harmless.len())
    );
    let mean = |v: &[guard::GuardReport], f: fn(&guard::GuardReport) -> f64| {
        v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
    };
    println!(
        "mean refusal intent: {hname} {:.3}, {lname} {:.3}; under the preset: {:.3}, {:.3}; mean persona shift {:.1}, {:.1}",
        mean(&hr, |r| r.refusal_intent),
        mean(&lr, |r| r.refusal_intent),
        mean(&hr, |r| r.refusal_intent_preset),
        mean(&lr, |r| r.refusal_intent_preset),
        mean(&hr, |r| r.persona_shift),
        mean(&lr, |r| r.persona_shift),
    );
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

/// `--preset` names into presets to generate under.
fn eval_presets(a: &OutputEvalArgs, model: &Model) -> Result<Vec<EvalPreset>> {
    use persona_gate::study::personas::{builtin_names, builtin_persona};
    let dirs = DirectionRegistry::from_paths(&a.directions)?;
    let file = match &a.presets {
        Some(p) => Some((PresetFile::load(p)?, p.clone())),
        None => None,
    };
    let built = build_presets(
        file.as_ref().map(|(f, p)| (f, p.as_path())),
        &dirs,
        model,
        GuardMode::Off,
        GuardMode::Off,
    )?;
    let mut names = a.preset.clone();
    if names.is_empty() {
        if let Some((f, _)) = &file {
            names.extend(f.presets.keys().cloned());
        }
        names.push("builtin".into());
    }
    let mut out = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let expanded: Vec<&str> = if n == "builtin" {
            builtin_names()
        } else {
            vec![n]
        };
        for n in expanded {
            let p = if let Some(p) = built.get(n) {
                EvalPreset {
                    name: n.into(),
                    system: p.spec.system.clone(),
                    plan: p.plan.clone(),
                }
            } else if let Some(s) = builtin_persona(n) {
                EvalPreset {
                    name: n.into(),
                    system: Some(s.into()),
                    plan: None,
                }
            } else {
                bail!(
                    "unknown preset '{n}': not in {} and not a built-in persona mode ({})",
                    a.presets
                        .as_ref()
                        .map_or("--presets (none given)".into(), |p| p.display().to_string()),
                    builtin_names().join(", ")
                );
            };
            if !out.iter().any(|q: &EvalPreset| q.name == p.name) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn run_output_eval(a: OutputEvalArgs) -> Result<()> {
    let g = Arc::new(GuardCalibration::load(&a.guard_file)?);
    let reference = Reference::parse(&a.reference)?;
    let harmful = load_set(&a.harmful, a.harmful_skip, a.n)?;
    let harmless = load_set(&a.harmless, a.harmless_skip, a.harmless_n)?;
    let model = a.m.load()?;
    let presets = eval_presets(&a, &model)?;
    let probe = resolve_probe(&model, a.probe.as_deref())?;
    let og = OutputGuard::new(&model, probe, g, 0, a.batch_size)?;
    let inp = OutputEvalInput {
        harmful,
        harmless,
        presets,
        max_tokens: a.max_tokens,
        batch_size: a.batch_size,
        reference,
    };
    let t0 = std::time::Instant::now();
    let r = output_eval::evaluate(&model, &og, &inp, &mut |m| eprintln!("[pgate guard] {m}"))?;
    print!("{}", r.markdown());
    if let Some(p) = &a.out {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", p.display()))?;
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
    let cfg = persona_gate_serve::bench::BenchConfig {
        url: a.url.clone(),
        clients: a.clients.max(1),
        duration: Duration::from_secs(a.duration),
        max_tokens: a.max_tokens,
        preset: a.preset.clone(),
        api_key: a
            .api_key
            .clone()
            .or_else(|| std::env::var("PGATE_API_KEY").ok()),
        timeout: Duration::from_secs(a.timeout),
    };
    let r = persona_gate_serve::bench::run(&cfg, |m| eprintln!("[serve-bench] {m}"))?;
    let mb = |b: Option<u64>| {
        b.map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
            .unwrap_or_else(|| "?".into())
    };
    println!(
        "{} clients x {:.0} s on {} (preset {}): {} ok, {} x 429, {} errors; {} completion tokens in {:.1} s = {:.1} tok/s, {:.2} req/s; latency p50 {:.2} s, p95 {:.2} s, max {:.2} s; server RSS start {}, max {}, end {}",
        r.clients,
        r.duration_s,
        r.url,
        r.preset,
        r.requests_ok,
        r.rejected_429,
        r.errors,
        r.completion_tokens,
        r.wall_s,
        r.completion_tokens_per_s,
        r.requests_per_s,
        r.latency_p50_s,
        r.latency_p95_s,
        r.latency_max_s,
        mb(r.rss_start_bytes),
        mb(r.rss_max_bytes),
        mb(r.rss_end_bytes)
    );
    for s in &r.error_samples {
        println!("error: {s}");
    }
    if let Some(p) = &a.out {
        std::fs::write(p, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if r.errors > 0 {
        bail!("{} requests failed (other than 429)", r.errors);
    }
    Ok(())
}
