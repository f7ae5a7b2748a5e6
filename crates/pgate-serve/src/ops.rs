//! Whole operations behind `pgate serve`, `pgate guard ...` and `pgate serve-bench`, with typed
//! results and an event sink ([`persona_gate::events`]).
//!
//! Why here and not in the binary: the server's configuration (presets compiled for the model, the
//! guard, the output guard, the projections it reports) and the guard's calibration and evaluation
//! are what a Python caller or another front end needs too; the binary only parses flags into these
//! options, makes one call and prints the result.
//!
//! Each operation that loads a model comes in two steps, so that a typo in a flag or a missing file
//! fails before a model of several GB is loaded: a `prepare`/`new` that reads and checks every file,
//! then a call with the loaded model.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use persona_gate::directions::DirectionSet;
use persona_gate::eval::PromptSet;
use persona_gate::events::{Event, EventSink};
use persona_gate::intervene::LayerSet;
use persona_gate::label::ops::resolve_probe;
use persona_gate::model::{Model, ModelArgs};
use persona_gate::{Error, Result};

use crate::conn::ConnLimits;
use crate::guard::{self, CalibrateInput, GuardCalibration, NamedPrompts};
use crate::output_eval::{self, EvalPreset, OutputEvalInput, OutputEvalReport, Reference};
use crate::output_guard::OutputGuard;
use crate::presets::{build_presets, DirectionRegistry, GuardMode, Preset, PresetFile};
use crate::projection::Projector;
use crate::server::{check_config, Limits, ServerConfig};

pub use crate::guard_eval::{evaluate_guard, GuardEval, GuardEvalJob, GuardEvalReport};

fn note(sink: &mut dyn EventSink, s: String) {
    sink.event(Event::Note(s));
}

/// A slice of a prompt set: `skip` prompts dropped, then at most `n`.
#[derive(Debug, Clone)]
pub struct PromptSlice {
    /// A prompt set file or built-in name (`harmful_train`, `strongreject`, ...).
    pub spec: String,
    pub skip: usize,
    pub n: usize,
}

impl PromptSlice {
    pub fn new(spec: impl Into<String>, skip: usize, n: usize) -> Self {
        Self {
            spec: spec.into(),
            skip,
            n,
        }
    }

    /// The prompts, named `spec[skip..end]` (the name reports and guard files show).
    pub fn load(&self) -> Result<NamedPrompts> {
        let mut set = PromptSet::load(&self.spec)?;
        set.items.drain(..self.skip.min(set.items.len()));
        let set = set.take(self.n);
        if set.items.is_empty() {
            return Err(Error::Empty(format!(
                "prompt set {} has no prompts after skipping {}",
                self.spec, self.skip
            )));
        }
        Ok((
            format!(
                "{}[{}..{}]",
                self.spec,
                self.skip,
                self.skip + set.items.len()
            ),
            set.texts(),
        ))
    }
}

/// A timeout in seconds: positive, finite, at most a day.
pub fn seconds(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(Error::InvalidValue(format!(
            "{flag} must be a number of seconds in (0, 86400], not {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Request and connection limits as given on the command line.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RequestFlags {
    /// Largest max_tokens a request may ask for.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1024))]
    pub max_tokens: usize,
    /// max_tokens of requests that give none.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 256))]
    pub default_max_tokens: usize,
    /// Largest conversation, in tokens after the chat template.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4096))]
    pub max_prompt_tokens: usize,
    /// Seconds from arrival to the last token (queueing included); then 504.
    #[cfg_attr(
        feature = "cli",
        arg(long = "timeout", value_name = "TIMEOUT", default_value_t = 300)
    )]
    pub timeout_s: u64,
    /// Seconds a client has to send the whole request body; then 408.
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "body-timeout",
            value_name = "BODY_TIMEOUT",
            default_value_t = 30.0
        )
    )]
    pub body_timeout_s: f64,
    /// Connections at once; at the cap the oldest idle connection is closed for a new one.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 256))]
    pub max_connections: usize,
    /// Seconds to send a request head (also the keep-alive idle timeout), else closed.
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "header-timeout",
            value_name = "HEADER_TIMEOUT",
            default_value_t = 10.0
        )
    )]
    pub header_timeout_s: f64,
}

impl RequestFlags {
    /// The server's limits, checked.
    pub fn limits(&self) -> Result<(Limits, ConnLimits)> {
        if self.max_connections == 0 {
            return Err(Error::InvalidValue(
                "--max-connections must be at least 1".into(),
            ));
        }
        let limits = Limits {
            max_tokens: self.max_tokens,
            default_max_tokens: self.default_max_tokens.min(self.max_tokens),
            max_prompt_tokens: self.max_prompt_tokens,
            timeout: Duration::from_secs(self.timeout_s.max(1)),
            body_timeout: seconds("--body-timeout", self.body_timeout_s)?,
            ..Limits::default()
        };
        let conn = ConnLimits {
            max_connections: self.max_connections,
            header_timeout: seconds("--header-timeout", self.header_timeout_s)?,
        };
        Ok((limits, conn))
    }
}

/// Everything `pgate serve` is told besides the model (the flags of `pgate serve`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ServeOptions {
    /// The name the default preset also answers to (the model as given; not a flag).
    #[cfg_attr(feature = "cli", arg(skip))]
    pub model_id: String,
    /// Presets file (TOML, `[presets.NAME]` tables: system, add, add_raw, ablate, cap, plan, guard).
    #[cfg_attr(feature = "cli", arg(long))]
    pub presets: Option<PathBuf>,
    /// Direction files or folders of them (`*.safetensors`); presets name them by file stem.
    #[cfg_attr(feature = "cli", arg(long, num_args = 1..))]
    pub directions: Vec<PathBuf>,
    /// Guard mode of presets that set none: off, monitor, block (default: monitor with --guard-file).
    #[cfg_attr(feature = "cli", arg(long))]
    pub guard: Option<String>,
    /// Guard calibration file written by `pgate guard calibrate`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub guard_file: Option<PathBuf>,
    /// Output guard mode of presets that set none: off, monitor, block. The probe reads each answer
    /// and flags compliance with a request the default persona would refuse (needs --guard-file).
    #[cfg_attr(feature = "cli", arg(long, default_value = "off"))]
    pub output_guard: String,
    /// Probe file for the output guard (`pgate label train`; default: the model's built-in probe).
    #[cfg_attr(feature = "cli", arg(long))]
    pub probe: Option<PathBuf>,
    /// Block-mode streams: check every N tokens, send text only once checked (0: once at the end).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub output_guard_every: usize,
    /// Answers per forward of the output guard's reader.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4))]
    pub output_guard_batch: usize,
    /// Direction (by name among --directions) whose projections responses report as `persona`.
    #[cfg_attr(feature = "cli", arg(long, default_value = "compliant"))]
    pub persona_direction: String,
    /// Direction reported as `refusal`.
    #[cfg_attr(feature = "cli", arg(long, default_value = "refusal"))]
    pub refusal_direction: String,
    /// Layers per window of the reported projections.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4))]
    pub window: usize,
    /// Sequences decoded together (continuous batching); 1 serves one request at a time.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub max_batch: usize,
    /// Requests that may wait for a batch slot; beyond that, 429.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub queue: usize,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub requests: RequestFlags,
    /// Require `Authorization: Bearer KEY` on /v1/*, /metrics, /health details ($PGATE_API_KEY).
    #[cfg_attr(feature = "cli", arg(long))]
    pub api_key: Option<String>,
    /// Serve /metrics without the API key (trusted networks: preset names become public).
    #[cfg_attr(feature = "cli", arg(long))]
    pub public_metrics: bool,
}

impl ServeOptions {
    /// `--api-key`, else a non-empty `$PGATE_API_KEY`.
    pub fn key_from_env(mut self) -> Self {
        self.api_key = self.api_key.or_else(|| {
            std::env::var("PGATE_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
        });
        self
    }
}

/// The flags of `pgate serve` besides the model: [`ServeOptions`] and where to listen.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ServeFlags {
    #[cfg_attr(feature = "cli", command(flatten))]
    pub opts: ServeOptions,
    #[cfg_attr(feature = "cli", arg(long, default_value = "127.0.0.1"))]
    pub host: String,
    /// Port (0: any free port; the line `listening on http://HOST:PORT` says which).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8080))]
    pub port: u16,
}

impl ServeFlags {
    /// Check the flags and read their files, load the model `m` names (a note says so), build the
    /// server and [`serve_blocking`] until stopped. The default preset also answers to `m.model`.
    pub fn serve(
        self,
        m: &ModelArgs,
        sink: &mut dyn EventSink,
        on_listening: impl FnOnce(SocketAddr),
    ) -> Result<()> {
        let opts = ServeOptions {
            model_id: m.model.clone(),
            ..self.opts
        };
        let setup = ServeSetup::prepare(opts.key_from_env())?;
        note(sink, format!("loading {}", m.model));
        let model = m.load()?;
        let cfg = setup.build(&model, sink)?;
        serve_blocking(model, cfg, &self.host, self.port, sink, on_listening)
    }
}

/// What the output guard needs its guard file for, in an error message.
fn output_needs_guard(what: &str) -> Error {
    Error::InvalidValue(format!("{what} needs --guard-file: the output guard flags compliant answers to requests the default persona would refuse, and the guard file (`pgate guard calibrate`) is its refusal-intent calibration"))
}

/// [`ServeOptions`] with every file read and every flag checked, waiting for the model.
pub struct ServeSetup {
    opts: ServeOptions,
    dirs: DirectionRegistry,
    presets_file: Option<PresetFile>,
    guard: Option<Arc<GuardCalibration>>,
    default_guard: GuardMode,
    default_output: GuardMode,
    limits: Limits,
    conn: ConnLimits,
}

impl ServeSetup {
    /// Read the directions, presets and guard files and check the flags (no model yet).
    pub fn prepare(opts: ServeOptions) -> Result<Self> {
        let dirs = DirectionRegistry::from_paths(&opts.directions)?;
        let presets_file = opts.presets.as_deref().map(PresetFile::load).transpose()?;
        let guard = match &opts.guard_file {
            Some(p) => Some(Arc::new(GuardCalibration::load(p)?)),
            None => None,
        };
        let default_guard = match &opts.guard {
            Some(g) => GuardMode::parse(g)?,
            None if guard.is_some() => GuardMode::Monitor,
            None => GuardMode::Off,
        };
        let (limits, conn) = opts.requests.limits()?;
        if default_guard != GuardMode::Off && guard.is_none() {
            return Err(Error::InvalidValue(format!(
                "--guard {} needs --guard-file (write one with `pgate guard calibrate`)",
                default_guard.name()
            )));
        }
        let default_output = GuardMode::parse(&opts.output_guard)?;
        if default_output != GuardMode::Off && guard.is_none() {
            return Err(output_needs_guard(&format!(
                "--output-guard {}",
                default_output.name()
            )));
        }
        Ok(Self {
            opts,
            dirs,
            presets_file,
            guard,
            default_guard,
            default_output,
            limits,
            conn,
        })
    }

    /// The server configuration for `model`: presets compiled, guard and output guard loaded,
    /// projector built, all checked together. Notes say what each preset does.
    pub fn build(self, model: &Model, sink: &mut dyn EventSink) -> Result<ServerConfig> {
        let o = &self.opts;
        if let Some(g) = &self.guard {
            g.check_model(model)?;
        }
        let presets = build_presets(
            self.presets_file.as_ref().zip(o.presets.as_deref()),
            &self.dirs,
            model,
            self.default_guard,
            self.default_output,
        )?;
        let output_guard = self.output_guard(model, &presets, sink)?;
        let persona = self.named_direction(
            &o.persona_direction,
            self.guard.as_ref().map(|g| g.persona_file.as_str()),
        )?;
        let refusal = self.named_direction(
            &o.refusal_direction,
            self.guard.as_ref().map(|g| g.refusal_file.as_str()),
        )?;
        let cfg = model.config();
        for s in persona.iter().chain(refusal.iter()) {
            if s.d_model() != cfg.d_model {
                return Err(Error::InvalidValue(format!(
                    "direction '{}' has width {}, the model {}",
                    s.name(),
                    s.d_model(),
                    cfg.d_model
                )));
            }
        }
        let projector = Projector::new(cfg.n_layers, o.window, persona.as_ref(), refusal.as_ref())?;
        let server_cfg = ServerConfig {
            model_id: o.model_id.clone(),
            presets,
            limits: self.limits.clone(),
            api_key: o.api_key.clone(),
            public_metrics: o.public_metrics,
            conn: self.conn.clone(),
            queue: o.queue,
            batch_size: o.max_batch,
            guard: self.guard.clone(),
            output_guard,
            projector,
        };
        check_config(&server_cfg)?;
        for p in server_cfg.presets.values() {
            note(
                sink,
                format!(
                    "preset {:<16} system: {:<5} steering: {:<5} guard: {:<7} output guard: {}",
                    p.name,
                    p.spec.system.is_some(),
                    p.plan.is_some(),
                    p.guard.name(),
                    p.output_guard.name()
                ),
            );
        }
        Ok(server_cfg)
    }

    /// A direction by its `--directions` name, else the file the guard was calibrated with.
    fn named_direction(&self, name: &str, fallback: Option<&str>) -> Result<Option<DirectionSet>> {
        if self.dirs.get(name).is_some() {
            return Ok(Some(self.dirs.load(name)?));
        }
        match fallback.map(PathBuf::from) {
            Some(p) if p.is_file() => Ok(Some(DirectionSet::load(&p)?)),
            _ => Ok(None),
        }
    }

    /// The output guard, when some preset uses it: probe (file or built in) + the guard file.
    fn output_guard(
        &self,
        model: &Model,
        presets: &BTreeMap<String, Preset>,
        sink: &mut dyn EventSink,
    ) -> Result<Option<Arc<OutputGuard>>> {
        let o = &self.opts;
        let Some(p) = presets.values().find(|p| p.output_guard != GuardMode::Off) else {
            if o.probe.is_some() {
                note(
                    sink,
                    "--probe is unused: no preset has the output guard on (--output-guard)".into(),
                );
            }
            return Ok(None);
        };
        let Some(g) = &self.guard else {
            return Err(output_needs_guard(&format!(
                "preset '{}' (output_guard = \"{}\")",
                p.name,
                p.output_guard.name()
            )));
        };
        let probe = resolve_probe(model, o.probe.as_deref())?;
        note(sink, format!(
            "output guard: probe {} (reads up to {} answer tokens), refusal-intent threshold {:.3}{}",
            &probe.sha256()[..16],
            probe.max_output_tokens,
            g.threshold,
            if o.output_guard_every > 0 {
                format!(", block-mode streams checked every {} tokens", o.output_guard_every)
            } else {
                String::new()
            }
        ));
        Ok(Some(Arc::new(OutputGuard::new(
            model,
            probe,
            g.clone(),
            o.output_guard_every,
            o.output_guard_batch,
        )?)))
    }
}

/// [`ServeSetup::prepare`] then [`ServeSetup::build`] for a model already loaded.
pub fn build_server_config(
    opts: ServeOptions,
    model: &Model,
    sink: &mut dyn EventSink,
) -> Result<ServerConfig> {
    ServeSetup::prepare(opts)?.build(model, sink)
}

/// Serve `model` on `host:port` until SIGINT/SIGTERM, on a runtime of its own; `on_listening`
/// hears the bound address (port 0 picks a free one) before the first request is accepted.
pub fn serve_blocking(
    model: Model,
    cfg: ServerConfig,
    host: &str,
    port: u16,
    sink: &mut dyn EventSink,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    // Parsing and tokenizing run on the blocking pool a few at a time; a small pool keeps the
    // number of threads (and their malloc arenas) bounded.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let batch_invariant = model.decoder.batch_invariant();
    let model = Arc::new(model);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| Error::io(format!("binding {host}:{port}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("listening socket", e))?;
        note(
            sink,
            format!(
                "{} on {} presets, batch {}, queue {}{}",
                cfg.model_id,
                cfg.presets.len(),
                cfg.batch_size,
                cfg.queue,
                if batch_invariant {
                    ", batch-invariant kernels"
                } else {
                    ""
                }
            ),
        );
        on_listening(addr);
        crate::serve(model, cfg, listener, crate::shutdown_signal()).await?;
        note(sink, "stopped".into());
        Ok(())
    })
}

/// What `pgate guard calibrate` is told besides the model (its flags).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CalibrateJob {
    /// Refusal direction file (`pgate extract refusal`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub refusal: PathBuf,
    /// Layer to read refusal intent at (default: the file's selected layer).
    #[cfg_attr(feature = "cli", arg(long))]
    pub refusal_layer: Option<usize>,
    /// Persona (compliant) direction file (`pgate extract trait --trait compliant`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub persona: PathBuf,
    /// Layers to read the persona shift at, e.g. 8-20 (default: all).
    #[cfg_attr(feature = "cli", arg(long))]
    pub persona_layers: Option<String>,
    // Where the calibration is written (no help text: `-o` reads as such).
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
    /// Harmful calibration prompts (file or name).
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmful_train"))]
    pub harmful: String,
    /// Harmless calibration prompts.
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmless_train"))]
    pub harmless: String,
    /// Skip the first K calibration prompts of each set (those the directions were extracted from).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub skip: usize,
    /// Calibration prompts per set.
    #[cfg_attr(feature = "cli", arg(short = 'n', long, default_value_t = 128))]
    pub n: usize,
    /// Held-out harmful prompts.
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmful_val"))]
    pub test_harmful: String,
    /// Held-out harmless prompts.
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmless_val"))]
    pub test_harmless: String,
    /// Held-out prompts per set.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 100))]
    pub test_n: usize,
    /// Highest false positive rate of refusal intent on the harmless calibration set.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.02))]
    pub max_fpr: f64,
    /// Persona shift (in calibrated spreads) that counts as a different persona.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 4.0))]
    pub shift_threshold: f64,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub batch_size: usize,
}

impl CalibrateJob {
    /// The calibration's input: layers parsed, every prompt set read (no model yet).
    pub fn input(&self) -> Result<CalibrateInput> {
        let persona_layers = match &self.persona_layers {
            Some(s) => Some(LayerSet::parse(s)?.0.into_iter().collect()),
            None => None,
        };
        Ok(CalibrateInput {
            refusal_file: self.refusal.clone(),
            refusal_layer: self.refusal_layer,
            persona_file: self.persona.clone(),
            persona_layers,
            harmful: PromptSlice::new(&self.harmful, self.skip, self.n).load()?,
            harmless: PromptSlice::new(&self.harmless, self.skip, self.n).load()?,
            heldout: vec![(
                PromptSlice::new(&self.test_harmful, 0, self.test_n).load()?,
                PromptSlice::new(&self.test_harmless, 0, self.test_n).load()?,
            )],
            max_fpr: self.max_fpr,
            shift_threshold: self.shift_threshold,
            batch_size: self.batch_size,
        })
    }
}

/// Fit the guard on `model` and write it to `out` (atomically); progress as notes.
pub fn calibrate_guard(
    model: &Model,
    input: &CalibrateInput,
    out: &Path,
    sink: &mut dyn EventSink,
) -> Result<GuardCalibration> {
    let g = guard::calibrate(model, input, |m| note(sink, m.into()))?;
    g.save(out)?;
    Ok(g)
}

impl GuardCalibration {
    /// The fit and its rates as a few lines of text (what `pgate guard calibrate` prints).
    pub fn to_text(&self) -> String {
        let mut o = format!(
            "refusal intent: layer {}, p = sigmoid({:.4} * x + {:.4}), threshold {:.3}; persona shift threshold {:.1} spreads over {} layers\n",
            self.refusal_layer,
            self.logistic.a,
            self.logistic.b,
            self.threshold,
            self.shift_threshold,
            self.persona_layers.len()
        );
        o.push_str(&format!(
            "{:<40} {:<40} {:>5} {:>5} {:>7} {:>7} {:>7}\n",
            "harmful", "harmless", "n+", "n-", "TPR", "FPR", "AUC"
        ));
        for (what, r) in std::iter::once(("calibration", &self.calibration))
            .chain(self.heldout.iter().map(|r| ("held out", r)))
        {
            o.push_str(&format!(
                "{:<40} {:<40} {:>5} {:>5} {:>7.3} {:>7.3} {:>7.3}   ({what})\n",
                r.set_pos, r.set_neg, r.n_pos, r.n_neg, r.tpr, r.fpr, r.auc
            ));
        }
        o
    }
}

/// What `pgate guard eval-output` is told besides the model (its flags).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct OutputEvalJob {
    /// Guard calibration file (refusal intent, `pgate guard calibrate`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub guard_file: PathBuf,
    /// Probe file (default: the built-in probe for this model).
    #[cfg_attr(feature = "cli", arg(long))]
    pub probe: Option<PathBuf>,
    /// Presets file; a --preset name not in it is a built-in persona mode or `default`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub presets: Option<PathBuf>,
    /// Direction files or folders the presets name.
    #[cfg_attr(feature = "cli", arg(long, num_args = 1..))]
    pub directions: Vec<PathBuf>,
    /// Presets to evaluate, comma-separated: names in --presets, `default`, a built-in persona mode
    /// (friendly, direct, supportive, creative, customer-success, companion), or `builtin` for all
    /// six (default: every preset of --presets, then `builtin`).
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ','))]
    pub preset: Vec<String>,
    // Harmful prompt set (file or name).
    #[cfg_attr(feature = "cli", arg(long, default_value = "strongreject"))]
    pub harmful: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub harmful_skip: usize,
    /// Harmful prompts.
    #[cfg_attr(feature = "cli", arg(short = 'n', long, default_value_t = 50))]
    pub n: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmless_val"))]
    pub harmless: String,
    /// Skip harmless prompts used as held-out by calibration.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 100))]
    pub harmless_skip: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 50))]
    pub harmless_n: usize,
    /// New tokens per answer.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub max_tokens: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Reference labeler: ensemble (shares the probe with the guard) or rules (shares nothing).
    #[cfg_attr(feature = "cli", arg(long, default_value = "ensemble"))]
    pub reference: String,
    /// Write the report (rates and every answer with its labels and verdict) as JSON here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<PathBuf>,
}

/// [`OutputEvalJob`] with its files read, waiting for the model.
pub struct OutputEval {
    job: OutputEvalJob,
    guard: Arc<GuardCalibration>,
    reference: Reference,
    harmful: NamedPrompts,
    harmless: NamedPrompts,
}

impl OutputEval {
    pub fn new(job: OutputEvalJob) -> Result<Self> {
        Ok(Self {
            guard: Arc::new(GuardCalibration::load(&job.guard_file)?),
            reference: Reference::parse(&job.reference)?,
            harmful: PromptSlice::new(&job.harmful, job.harmful_skip, job.n).load()?,
            harmless: PromptSlice::new(&job.harmless, job.harmless_skip, job.harmless_n).load()?,
            job,
        })
    }

    /// Generate under every preset, label, check; progress as notes.
    pub fn run(self, model: &Model, sink: &mut dyn EventSink) -> Result<OutputEvalReport> {
        let presets = eval_presets(&self.job, model)?;
        let probe = resolve_probe(model, self.job.probe.as_deref())?;
        let og = OutputGuard::new(model, probe, self.guard, 0, self.job.batch_size)?;
        let inp = OutputEvalInput {
            harmful: self.harmful,
            harmless: self.harmless,
            presets,
            max_tokens: self.job.max_tokens,
            batch_size: self.job.batch_size,
            reference: self.reference,
        };
        output_eval::evaluate(model, &og, &inp, &mut |m| note(sink, m.into()))
    }
}

/// [`OutputEval::new`] then [`OutputEval::run`] for a model already loaded.
pub fn evaluate_output_guard(
    job: OutputEvalJob,
    model: &Model,
    sink: &mut dyn EventSink,
) -> Result<OutputEvalReport> {
    OutputEval::new(job)?.run(model, sink)
}

/// Preset names into presets to generate under.
fn eval_presets(job: &OutputEvalJob, model: &Model) -> Result<Vec<EvalPreset>> {
    use persona_gate::study::personas::{builtin_names, builtin_persona};
    let dirs = DirectionRegistry::from_paths(&job.directions)?;
    let file = job.presets.as_deref().map(PresetFile::load).transpose()?;
    let built = build_presets(
        file.as_ref().zip(job.presets.as_deref()),
        &dirs,
        model,
        GuardMode::Off,
        GuardMode::Off,
    )?;
    let mut names = job.preset.clone();
    if names.is_empty() {
        if let Some(f) = &file {
            names.extend(f.presets.keys().cloned());
        }
        names.push("builtin".into());
    }
    let mut out: Vec<EvalPreset> = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        let expanded = if n == "builtin" {
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
                return Err(Error::InvalidValue(format!(
                    "unknown preset '{n}': not in {} and not a built-in persona mode ({})",
                    job.presets
                        .as_ref()
                        .map_or("--presets (none given)".into(), |p| p.display().to_string()),
                    builtin_names().join(", ")
                )));
            };
            if !out.iter().any(|q| q.name == p.name) {
                out.push(p);
            }
        }
    }
    Ok(out)
}
