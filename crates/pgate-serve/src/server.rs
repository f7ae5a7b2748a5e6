//! The HTTP side: routes, request checks, streaming, auth, limits, graceful shutdown.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI chat completions, `stream: true` as server-sent events |
//! | `GET /v1/models`, `GET /v1/models/{id}` | one entry per preset |
//! | `GET /health` | `{"status": "ok"}`; with the API key also model, presets, guard, queue |
//! | `GET /metrics` | Prometheus text (needs the API key unless `public_metrics`) |
//!
//! With the output guard ([`crate::output_guard`]) on for a preset, every finished answer is read
//! by the refusal probe before the response (or the stream's last chunk) goes out; the verdict is
//! `persona_gate.output_guard` (non-streaming: also the header `x-pgate-output-guard`).
//!
//! Every error is an OpenAI error object with a 4xx/5xx status: 400 malformed request (bad JSON,
//! wrong field type, too many tokens, unsupported value), 401 missing or wrong bearer token, 404
//! unknown preset (`model_not_found`) or route, 405 wrong method, 408 body not received in time,
//! 413 body over the limit, 429 queue full (`queue_full`, with `Retry-After: 1`), 503 shutting
//! down, 504 request timed out, 500 engine failure or handler bug ([`crate::layers`]).
//!
//! Order of work on a chat request, cheapest refusal first, so that a client without the key or
//! with an oversized body costs nothing: auth from the headers, then the declared length, then the
//! body (bounded in size, time and, across requests, total buffered bytes), then parsing, the chat
//! template and tokenization on the blocking pool ([`tokio::task::spawn_blocking`], a few at a
//! time), never on the async workers that answer `/health` and stream other requests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::{FutureExt, StreamExt};
use persona_gate::generate::Sampling;
use persona_gate::model::Model;
use persona_gate::tokenize::{ChatMessage, ChatTokenizer, DecodeStream};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conn::ConnLimits;
use crate::engine::{self, EngineConfig, Event, FinishReason, Job};
use crate::guard::{GuardCalibration, GuardReport, BLOCK_MESSAGE};
use crate::layers::{error_for_status, error_response, RequestId};
use crate::metrics::Metrics;
use crate::openai::{flatten_messages, now_secs, parse_chat_request, ApiError, Stop, Usage};
use crate::output_guard::{
    OutputCheck, OutputGuard, OutputVerdict, Reader, OUTPUT_BLOCK_MESSAGE, STREAM_FLAGGED_NOTE,
};
use crate::presets::{GuardMode, Preset};
use crate::projection::{Projector, WindowProjection};

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// Largest rendered prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Time from arrival to the last token, queueing included.
    pub timeout: Duration,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Time a client has to send the whole body once its headers arrived (408 beyond).
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens: 1024,
            default_max_tokens: 256,
            max_prompt_tokens: 4096,
            timeout: Duration::from_secs(300),
            max_body_bytes: 4 << 20,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Request bodies buffered at once across all requests, in bytes: many large bodies wait for room
/// instead of holding `max_connections` x `max_body_bytes` in memory.
const BODY_BUDGET_BYTES: usize = 64 << 20;

pub struct ServerConfig {
    /// Name the default preset also answers to (the model's name).
    pub model_id: String,
    pub presets: BTreeMap<String, Preset>,
    pub limits: Limits,
    /// Required `Authorization: Bearer` token for `/v1/*`, `/metrics` and `/health`'s details.
    pub api_key: Option<String>,
    /// Serve `/metrics` without the API key (for a scraper inside a trusted network).
    pub public_metrics: bool,
    /// Connection cap and header read timeout.
    pub conn: ConnLimits,
    /// Requests that may wait for a batch slot; one more is a 429.
    pub queue: usize,
    /// Sequences decoded together.
    pub batch_size: usize,
    pub guard: Option<Arc<GuardCalibration>>,
    /// The output guard (probe + refusal-intent calibration), for presets whose `output_guard` is on.
    pub output_guard: Option<Arc<OutputGuard>>,
    pub projector: Projector,
}

struct App {
    model_id: String,
    presets: BTreeMap<String, Preset>,
    limits: Limits,
    api_key: Option<String>,
    public_metrics: bool,
    tokenizer: ChatTokenizer,
    has_template: bool,
    /// Longest token spelling in bytes: a text of N bytes has at least N / this many tokens, so a
    /// body far over the prompt limit is refused without tokenizing it.
    max_token_bytes: usize,
    /// Requests parsed and tokenized at once on the blocking pool.
    prep: Arc<Semaphore>,
    /// Body bytes buffered at once, in KiB permits ([`BODY_BUDGET_BYTES`]).
    body_budget: Arc<Semaphore>,
    guard: Option<Arc<GuardCalibration>>,
    reader: Option<Reader>,
    tx: SyncSender<Job>,
    queue: usize,
    metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    started: u64,
}

/// Check the configuration against the loaded model: guard modes need a guard file, output guard
/// modes a loaded output guard.
pub fn check_config(cfg: &ServerConfig) -> persona_gate::Result<()> {
    if cfg.output_guard.is_none() {
        if let Some(p) = cfg
            .presets
            .values()
            .find(|p| p.output_guard != GuardMode::Off)
        {
            return Err(persona_gate::Error::InvalidValue(format!(
                "preset '{}' has output_guard '{}' but no output guard is loaded (--output-guard needs --guard-file and a probe)",
                p.name,
                p.output_guard.name()
            )));
        }
    }
    if cfg.guard.is_none() {
        if let Some(p) = cfg.presets.values().find(|p| p.guard != GuardMode::Off) {
            return Err(persona_gate::Error::InvalidValue(format!(
                "preset '{}' has guard '{}' but no guard file was given (--guard-file, from `pgate guard calibrate`)",
                p.name,
                p.guard.name()
            )));
        }
    }
    if cfg.batch_size == 0 || cfg.queue == 0 {
        return Err(persona_gate::Error::InvalidValue(
            "--max-batch and --queue must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The model side the HTTP layer talks to: the tokenizer, the engine's job queue and the threads
/// to join at the end. [`serve`] builds it from a model; tests can put a stand-in engine behind it.
pub struct Backend {
    tokenizer: ChatTokenizer,
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
    reader: Option<Reader>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// A backend whose jobs go to `jobs` (read by `thread`, which must end once every sender is
    /// gone). `metrics` is the one the engine updates.
    pub fn new(
        tokenizer: ChatTokenizer,
        jobs: SyncSender<Job>,
        metrics: Arc<Metrics>,
        thread: std::thread::JoinHandle<()>,
    ) -> Self {
        Self {
            tokenizer,
            jobs,
            metrics,
            reader: None,
            threads: vec![thread],
        }
    }
}

/// Serve on `listener` until `shutdown` resolves, then finish in-flight requests and return.
pub async fn serve(
    model: Arc<Model>,
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> persona_gate::Result<()> {
    check_config(&cfg)?;
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(cfg.queue);
    let engine_cfg = EngineConfig {
        batch_size: cfg.batch_size,
        stop: model.tokenizer.stop_token_ids().to_vec(),
        guard: cfg.guard.clone(),
        projector: cfg.projector.clone(),
        ..EngineConfig::default()
    };
    let m2 = model.clone();
    let met2 = metrics.clone();
    let engine = std::thread::Builder::new()
        .name("pgate-engine".into())
        .spawn(move || engine::run(m2, engine_cfg, rx, met2))
        .map_err(|e| persona_gate::Error::io("engine thread", e))?;
    let mut backend = Backend::new(model.tokenizer.clone(), tx, metrics, engine);
    if let Some(og) = &cfg.output_guard {
        let (r, h) = Reader::spawn(model.clone(), og.clone())?;
        backend.reader = Some(r);
        backend.threads.push(h);
    }
    serve_backend(backend, cfg, listener, shutdown).await
}

/// [`serve`] over a given backend.
pub async fn serve_backend(
    backend: Backend,
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> persona_gate::Result<()> {
    check_config(&cfg)?;
    let Backend {
        tokenizer,
        jobs,
        metrics,
        reader,
        threads,
    } = backend;
    let max_token_bytes = longest_token_bytes(&tokenizer);
    let prep = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
    let app = Arc::new(App {
        model_id: cfg.model_id.clone(),
        presets: cfg.presets,
        limits: cfg.limits,
        api_key: cfg.api_key,
        public_metrics: cfg.public_metrics,
        has_template: tokenizer.has_chat_template(),
        tokenizer,
        max_token_bytes,
        prep: Arc::new(Semaphore::new(prep)),
        body_budget: Arc::new(Semaphore::new(BODY_BUDGET_BYTES >> 10)),
        guard: cfg.guard,
        reader,
        tx: jobs,
        queue: cfg.queue,
        metrics: metrics.clone(),
        shutting_down: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
        started: now_secs(),
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/drift", get(drift_scores))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app.clone())
        .layer(axum::middleware::from_fn_with_state(
            metrics.clone(),
            crate::layers::guard,
        ));
    let flag = app.clone();
    let result = crate::conn::serve(listener, router, cfg.conn, metrics, async move {
        shutdown.await;
        flag.shutting_down.store(true, Ordering::SeqCst);
        eprintln!("[pgate serve] shutting down: finishing in-flight requests");
    })
    .await;
    // Every connection (and its router clone) is gone once serve returns; drop our sender too so
    // the engine stops.
    drop(app);
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    result.map_err(|e| persona_gate::Error::io("http server", e))
}

/// Bodies up to this size are prepared on the async worker (see [`receive`]).
const INLINE_BODY_BYTES: usize = 16 * 1024;

/// Parsing and tokenizing large request bodies yields the CPU to the engine thread and the async
/// workers: a flood of large bodies must not starve decoding or `/health` (measured: 4 MB bodies at
/// ~170/s took a core of a 2-core box). Linux applies `nice` per thread; done once per blocking thread.
fn lower_this_thread_priority() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if DONE.with(|d| d.replace(true)) {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes its nice
    // value (raising it needs no privilege).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Bytes of the longest token spelling (an upper bound on the text one token covers).
fn longest_token_bytes(t: &ChatTokenizer) -> usize {
    (0..t.vocab_size() as u32)
        .filter_map(|id| t.id_to_token(id))
        .map(|s| s.len())
        .max()
        .unwrap_or(0)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn check_auth(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match got {
        Some(k) if constant_eq(k.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::bad_request("invalid API key")
            .status(401)
            .kind("authentication_error")
            .code("invalid_api_key")),
        None => Err(
            ApiError::bad_request("missing API key: send 'Authorization: Bearer <key>'")
                .status(401)
                .kind("authentication_error")
                .code("invalid_api_key"),
        ),
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const ROUTES: &str =
    "POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics";

async fn not_found() -> Response {
    error_response(
        &ApiError::bad_request(format!("no such route ({ROUTES})"))
            .status(404)
            .code("not_found"),
    )
}

async fn method_not_allowed() -> Response {
    error_response(
        &ApiError::bad_request(format!("method not allowed on this route ({ROUTES})"))
            .status(405)
            .code("method_not_allowed"),
    )
}

fn model_entry(app: &App, p: &Preset) -> Value {
    json!({
        "id": p.name,
        "object": "model",
        "created": app.started,
        "owned_by": "pgate",
        "persona_gate": {
            "model": app.model_id,
            "description": p.spec.description,
            "system": p.spec.system,
            "steering": p.plan.is_some(),
            "add": p.spec.add, "add_raw": p.spec.add_raw, "ablate": p.spec.ablate, "cap": p.spec.cap,
            "guard": p.guard.name(),
            "output_guard": p.output_guard.name(),
        }
    })
}

async fn list_models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_auth(&app, &headers) {
        return error_response(&e);
    }
    let data: Vec<Value> = app.presets.values().map(|p| model_entry(&app, p)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = check_auth(&app, &headers) {
        return error_response(&e);
    }
    match resolve_preset(&app, &id) {
        Ok(p) => Json(model_entry(&app, p)).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Without the key only the status: preset names and guard thresholds tell an attacker what to
/// probe for, and a load balancer needs nothing more.
async fn health(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let status = if app.shutting_down.load(Ordering::SeqCst) {
        "shutting_down"
    } else {
        "ok"
    };
    if check_auth(&app, &headers).is_err() {
        return Json(json!({ "status": status })).into_response();
    }
    Json(json!({
        "status": status,
        "model": app.model_id,
        "presets": app.presets.keys().collect::<Vec<_>>(),
        "guard": app.guard.as_ref().map(|g| json!({
            "refusal_layer": g.refusal_layer,
            "threshold": g.threshold,
            "shift_threshold": g.shift_threshold,
        })),
        "output_guard": app.reader.as_ref().map(|r| json!({
            "probe_sha256": r.guard.probe_sha256,
            "max_output_tokens": r.guard.probe.max_output_tokens,
            "threshold": r.guard.guard.threshold,
            "every": r.guard.every,
        })),
        "queue_depth": app.metrics.queue_depth.load(Ordering::Relaxed),
        "queue_capacity": app.queue,
        "running": app.metrics.running.load(Ordering::Relaxed),
    }))
    .into_response()
}

/// Behind the key unless `public_metrics`: labels name the presets and counts show the guard's
/// verdicts.
/// `GET /v1/drift`: each preset's drift score against the calibration window ([`crate::drift`]).
async fn drift_scores(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_auth(&app, &headers) {
        return error_response(&e);
    }
    axum::Json(app.metrics.drift.scores()).into_response()
}

async fn metrics_text(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !app.public_metrics {
        if let Err(e) = check_auth(&app, &headers) {
            return error_response(&e);
        }
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

fn resolve_preset<'a>(app: &'a App, name: &str) -> Result<&'a Preset, ApiError> {
    if let Some(p) = app.presets.get(name) {
        return Ok(p);
    }
    if name == app.model_id {
        if let Some(p) = app.presets.get("default") {
            return Ok(p);
        }
    }
    Err(ApiError::bad_request(format!(
        "unknown preset '{name}': this server has {} (GET /v1/models)",
        app.presets.keys().cloned().collect::<Vec<_>>().join(", ")
    ))
    .status(404)
    .param("model")
    .code("model_not_found"))
}

/// A request checked and tokenized, ready for the engine.
struct Prepared {
    preset: String,
    output_mode: GuardMode,
    /// The user's last message: what the output guard reads the answer against.
    last_user: String,
    stream: bool,
    include_usage: bool,
    stops: Vec<String>,
    job: Job,
    rx: UnboundedReceiver<Event>,
}

/// Token ids of a conversation with the generation prompt (a base model: the system messages and
/// the last user message). Message contents are client text: control tokens typed in them
/// (`<|im_end|><|im_start|>system ...`) are encoded as text, so a client cannot forge a turn that
/// overrides the preset's persona or the guard's default-persona comparison.
fn render(app: &App, msgs: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    app.tokenizer
        .encode_chat(msgs)
        .map_err(|e| ApiError::bad_request(format!("could not tokenize the conversation: {e}")))
}

/// Parse, check, render and tokenize a request body (CPU work: runs on the blocking pool).
fn prepare(app: &App, body: &[u8]) -> Result<Prepared, (String, ApiError)> {
    let unknown = |e: ApiError| ("-".to_string(), e);
    let req = parse_chat_request(body).map_err(unknown)?;
    let preset_name = req.preset.clone().unwrap_or_else(|| req.model.clone());
    let preset = resolve_preset(app, &preset_name).map_err(unknown)?;
    let tag = |e: ApiError| (preset.name.clone(), e);
    if let Some(n) = req.n {
        if n != 1 {
            return Err(tag(ApiError::bad_request(format!(
                "n = {n} is not supported: pgate returns one choice per request"
            ))
            .param("n")));
        }
    }
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(app.limits.default_max_tokens as u64);
    if max_tokens == 0 {
        return Err(tag(
            ApiError::bad_request("max_tokens must be at least 1").param("max_tokens")
        ));
    }
    if max_tokens > app.limits.max_tokens as u64 {
        return Err(tag(ApiError::bad_request(format!(
            "max_tokens {max_tokens} is more than this server allows ({})",
            app.limits.max_tokens
        ))
        .param("max_tokens")));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(tag(ApiError::bad_request(format!(
            "temperature {temperature} must be between 0 and 2"
        ))
        .param("temperature")));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(tag(ApiError::bad_request(format!(
            "top_p {top_p} must be in (0, 1]"
        ))
        .param("top_p")));
    }
    let seed = req.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let stops = match &req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > 4 || stops.iter().any(|s| s.is_empty()) {
        return Err(tag(ApiError::bad_request(
            "stop must be a non-empty string or a list of at most 4 non-empty strings",
        )
        .param("stop")));
    }
    let flat = flatten_messages(&req.messages).map_err(tag)?;
    // Served conversation: the preset's system prompt first (joined with the request's own).
    let mut served: Vec<ChatMessage> = flat
        .iter()
        .map(|(r, c)| ChatMessage {
            role: r.clone(),
            content: c.clone(),
        })
        .collect();
    if let Some(sys) = &preset.spec.system {
        match served.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{sys}\n\n{}", m.content),
            _ => served.insert(0, ChatMessage::system(sys.clone())),
        }
    }
    check_text_size(app, &served).map_err(tag)?;
    let prompt = render(app, &served).map_err(tag)?;
    if prompt.len() > app.limits.max_prompt_tokens {
        return Err(tag(ApiError::bad_request(format!(
            "the conversation has {} tokens, more than this server allows ({})",
            prompt.len(),
            app.limits.max_prompt_tokens
        ))
        .param("messages")
        .code("context_length_exceeded")));
    }
    // Default-persona twin for the guard.
    let has_system = served.iter().any(|m| m.role == "system");
    let shadow = if preset.guard != GuardMode::Off && (has_system || preset.plan.is_some()) {
        let plain: Vec<ChatMessage> = served
            .iter()
            .filter(|m| m.role != "system")
            .cloned()
            .collect();
        Some(render(app, &plain).map_err(tag)?)
    } else {
        None
    };
    let (etx, erx) = unbounded_channel();
    let job = Job {
        prompt,
        shadow,
        plan: preset.plan.clone(),
        max_new_tokens: max_tokens as usize,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        guard: preset.guard,
        deadline: Instant::now() + app.limits.timeout,
        events: etx,
    };
    let last_user = flat
        .iter()
        .rev()
        .find(|(r, _)| r == "user")
        .map(|(_, c)| c.clone())
        .unwrap_or_default();
    Ok(Prepared {
        preset: preset.name.clone(),
        output_mode: preset.output_guard,
        last_user,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.map(|o| o.include_usage).unwrap_or(false),
        stops,
        job,
        rx: erx,
    })
}

/// Refuse a conversation whose text alone proves it is over the prompt limit, before tokenizing
/// it: tokenizing megabytes costs seconds of CPU for an answer known in advance.
fn check_text_size(app: &App, msgs: &[ChatMessage]) -> Result<(), ApiError> {
    if app.max_token_bytes == 0 {
        return Ok(());
    }
    // What reaches the prompt: every message under a chat template; a base model reads the
    // system messages and the last user message only. Templates may trim contents.
    let bytes: usize = if app.has_template {
        msgs.iter().map(|m| m.content.trim().len()).sum()
    } else {
        let sys: usize = msgs
            .iter()
            .filter(|m| m.role == "system")
            .map(|m| m.content.trim().len())
            .sum();
        let last = msgs
            .iter()
            .rev()
            .find(|m| m.role != "system")
            .map_or(0, |m| m.content.trim().len());
        sys + last
    };
    let at_least = bytes / app.max_token_bytes;
    if at_least > app.limits.max_prompt_tokens {
        return Err(ApiError::bad_request(format!(
            "the conversation has at least {at_least} tokens ({bytes} bytes of text), more than this server allows ({})",
            app.limits.max_prompt_tokens
        ))
        .param("messages")
        .code("context_length_exceeded"));
    }
    Ok(())
}

/// Holds back text that may be the start of a stop string; reports a hit.
struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopMatcher {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Add text; returns (text safe to emit now, whether a stop string was hit).
    fn push(&mut self, s: &str) -> (String, bool) {
        self.text.push_str(s);
        // A hit may start up to a stop's length before the new text. That offset is in bytes and
        // can fall inside a multibyte character: search from the character it falls in.
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|st| {
                let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(st.len()));
                self.text[from..].find(st.as_str()).map(|i| i + from)
            })
            .min()
        {
            let cut = cut.max(self.emitted);
            let out = self.text[self.emitted..cut].to_string();
            self.text.truncate(cut);
            self.emitted = cut;
            return (out, true);
        }
        // Longest suffix that is a proper prefix of some stop string stays back.
        let mut hold = 0;
        for st in &self.stops {
            for k in (1..st.len()).rev() {
                if k <= self.text.len() - self.emitted
                    && st.is_char_boundary(k)
                    && self.text.is_char_boundary(self.text.len() - k)
                    && self.text.ends_with(&st[..k])
                {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let end = self.text.len() - hold;
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        (out, false)
    }

    /// Whatever is held back, at the end.
    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    fn full(&self) -> &str {
        &self.text
    }
}

/// The largest character boundary of `s` at or before byte `i`.
fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

struct Meta {
    preset: String,
    mode: GuardMode,
    output_mode: GuardMode,
    last_user: String,
    prompt_tokens: usize,
    projections: Vec<WindowProjection>,
    guard: Option<GuardReport>,
    blocked: bool,
}

impl Meta {
    /// What the output guard reads for this request; the input guard's refusal intent when it ran.
    fn output_check(&self, text: &str) -> OutputCheck {
        OutputCheck {
            prompt: self.last_user.clone(),
            output: text.to_string(),
            refusal_intent: self.guard.as_ref().map(|g| g.refusal_intent),
        }
    }

    fn json(&self) -> Value {
        json!({
            "preset": self.preset,
            "projections": self.projections,
            "guard": self.guard.as_ref().map(|g| {
                let mut v = serde_json::to_value(g).unwrap_or(Value::Null);
                v["mode"] = json!(self.mode.name());
                v["blocked"] = json!(self.blocked);
                v
            }),
        })
    }

    fn headers(&self, h: &mut HeaderMap) {
        let mut put = |k: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(k), v);
            }
        };
        put("x-pgate-preset", self.preset.clone());
        match &self.guard {
            None => put("x-pgate-guard", "off".into()),
            Some(g) => {
                let state = if self.blocked {
                    "blocked"
                } else if g.flagged {
                    "flagged"
                } else {
                    "pass"
                };
                put("x-pgate-guard", state.into());
                put("x-pgate-refusal-intent", format!("{:.4}", g.refusal_intent));
                put("x-pgate-persona-shift", format!("{:.3}", g.persona_shift));
            }
        }
    }
}

async fn chat(
    State(app): State<Arc<App>>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let t0 = Instant::now();
    match receive(&app, &rid, &headers, body).await {
        Ok(p) => answer(app, p, t0).await,
        Err((preset, e)) => {
            app.metrics.request(&preset, e.status);
            error_response(&e)
        }
    }
}

/// Admit a chat request and prepare it: auth and the declared length from the headers first, then
/// the body, then parsing and tokenization on the blocking pool.
async fn receive(
    app: &Arc<App>,
    rid: &RequestId,
    headers: &HeaderMap,
    body: Body,
) -> Result<Prepared, (String, ApiError)> {
    let unknown = |e: ApiError| ("-".to_string(), e);
    check_auth(app, headers).map_err(unknown)?;
    if app.shutting_down.load(Ordering::SeqCst) {
        return Err(unknown(
            ApiError::bad_request("the server is shutting down")
                .status(503)
                .kind("server_error")
                .code("shutting_down"),
        ));
    }
    let max = app.limits.max_body_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(unknown(too_large(max)));
    }
    let deadline = tokio::time::Instant::now() + app.limits.body_timeout;
    let kib = declared
        .map_or(max, |n| n as usize)
        .div_ceil(1024)
        .clamp(1, BODY_BUDGET_BYTES >> 10) as u32;
    let budget = tokio::time::timeout_at(deadline, app.body_budget.clone().acquire_many_owned(kib))
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            unknown(
                ApiError::bad_request("the server is busy receiving other requests; retry later")
                    .status(429)
                    .kind("rate_limit_error")
                    .code("server_busy"),
            )
        })?;
    let bytes = read_body(body, max, declared, deadline, app.limits.body_timeout)
        .await
        .map_err(unknown)?;
    // A small body (every ordinary chat request) is parsed and tokenized in well under a
    // millisecond: do it here, so it never queues behind large bodies for the blocking pool.
    if bytes.len() <= INLINE_BODY_BYTES {
        drop(budget);
        return prepare(app, &bytes);
    }
    let prep: OwnedSemaphorePermit = app
        .prep
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| unknown(ApiError::bad_request("shutting down").status(503)))?;
    let a = app.clone();
    let r = tokio::task::spawn_blocking(move || {
        let _held = (budget, prep);
        lower_this_thread_priority();
        prepare(&a, &bytes)
    })
    .await;
    match r {
        Ok(r) => r,
        Err(e) => {
            let e = match e.try_into_panic() {
                Ok(p) => crate::layers::panic_error(
                    &app.metrics,
                    "preparing a chat request",
                    &rid.0,
                    p.as_ref(),
                ),
                Err(e) => ApiError::bad_request(format!("preparing the request: {e}"))
                    .status(500)
                    .kind("server_error"),
            };
            Err(unknown(e))
        }
    }
}

fn too_large(max: usize) -> ApiError {
    ApiError::bad_request(format!(
        "the request body is larger than this server accepts ({max} bytes)"
    ))
    .status(413)
    .code("request_too_large")
}

/// The body, at most `max` bytes, all of it before `deadline`.
async fn read_body(
    body: Body,
    max: usize,
    declared: Option<u64>,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| (n as usize).min(max)));
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                return Err(error_for_status(
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "the request body did not arrive within {} s",
                        timeout.as_secs_f64()
                    ),
                ))
            }
            Ok(None) => return Ok(Bytes::from(buf)),
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!(
                    "reading the request body: {e}"
                )))
            }
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > max {
                    return Err(too_large(max));
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

/// Queue a prepared request for the engine and answer it (whole or streamed).
async fn answer(app: Arc<App>, p: Prepared, t0: Instant) -> Response {
    let Prepared {
        preset,
        output_mode,
        last_user,
        stream,
        include_usage,
        stops,
        job,
        mut rx,
    } = p;
    let deadline = job.deadline;
    let mode = job.guard;
    app.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = app.tx.try_send(job) {
        app.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        let err = match e {
            TrySendError::Full(_) => {
                app.metrics.rejected("queue_full");
                ApiError::bad_request(format!(
                    "the server is busy: {} requests are already waiting; retry later",
                    app.queue
                ))
                .status(429)
                .kind("rate_limit_error")
                .code("queue_full")
            }
            TrySendError::Disconnected(_) => {
                app.metrics.rejected("shutting_down");
                ApiError::bad_request("the model engine has stopped")
                    .status(503)
                    .kind("server_error")
                    .code("shutting_down")
            }
        };
        app.metrics.request(&preset, err.status);
        return error_response(&err);
    }
    // Backstop in case the engine is stuck in a long step past the deadline.
    let hard = tokio::time::Instant::from_std(deadline + Duration::from_secs(10));
    let first = tokio::time::timeout_at(hard, rx.recv()).await;
    let meta = match first {
        Ok(Some(Event::Started {
            prompt_tokens,
            projections,
            guard,
            blocked,
        })) => Meta {
            preset: preset.clone(),
            mode,
            output_mode,
            last_user,
            prompt_tokens,
            projections,
            guard,
            blocked,
        },
        Ok(Some(Event::Done {
            finish: FinishReason::Timeout,
            ..
        }))
        | Err(_) => {
            let e = timeout_error(&app);
            app.metrics.request(&preset, e.status);
            return error_response(&e);
        }
        Ok(Some(Event::Error(msg))) => {
            let e = ApiError::bad_request(format!("generation failed: {msg}"))
                .status(500)
                .kind("server_error");
            app.metrics.request(&preset, 500);
            return error_response(&e);
        }
        Ok(_) => {
            let e = ApiError::bad_request("the model engine stopped before answering")
                .status(503)
                .kind("server_error");
            app.metrics.request(&preset, 503);
            return error_response(&e);
        }
    };
    if let Some(g) = &meta.guard {
        app.metrics.guard(&preset, mode.name(), g.flagged);
    }
    app.metrics.drift.observe(&preset, &meta.projections);
    let id = format!(
        "chatcmpl-pgate-{}",
        app.next_id.fetch_add(1, Ordering::Relaxed)
    );
    if stream {
        stream_response(app, meta, id, rx, stops, include_usage, t0, hard).await
    } else {
        full_response(app, meta, id, rx, stops, t0, hard).await
    }
}

fn timeout_error(app: &App) -> ApiError {
    ApiError::bad_request(format!(
        "the request timed out after {} s (queueing included); retry, or ask for fewer tokens",
        app.limits.timeout.as_secs()
    ))
    .status(504)
    .kind("timeout_error")
    .code("timeout")
}

/// Read tokens until done; text through the incremental decoder and the stop matcher.
struct Collector {
    decode: DecodeStream,
    stop: StopMatcher,
    completion_tokens: usize,
    /// A finish reason to report after the text just returned.
    pending: Option<&'static str>,
}

enum Step {
    Text(String),
    Finished(&'static str),
    Failed(ApiError),
}

impl Collector {
    fn new(app: &App, stops: Vec<String>) -> Self {
        Collector {
            decode: DecodeStream::new(&app.tokenizer, true),
            stop: StopMatcher::new(stops),
            completion_tokens: 0,
            pending: None,
        }
    }

    async fn next(
        &mut self,
        rx: &mut UnboundedReceiver<Event>,
        hard: tokio::time::Instant,
        app: &App,
    ) -> Step {
        loop {
            match tokio::time::timeout_at(hard, rx.recv()).await {
                Err(_) => return Step::Failed(timeout_error(app)),
                Ok(None) => {
                    return Step::Failed(
                        ApiError::bad_request("the model engine stopped while answering")
                            .status(503)
                            .kind("server_error"),
                    )
                }
                Ok(Some(Event::Token(t))) => {
                    self.completion_tokens += 1;
                    match self.decode.push(t) {
                        Ok(Some(s)) => {
                            let (out, hit) = self.stop.push(&s);
                            if hit {
                                return Step::Finished("stop");
                            }
                            if !out.is_empty() {
                                return Step::Text(out);
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            return Step::Failed(
                                ApiError::bad_request(format!("detokenizing: {e}"))
                                    .status(500)
                                    .kind("server_error"),
                            )
                        }
                    }
                }
                Ok(Some(Event::Done {
                    finish,
                    completion_tokens,
                })) => {
                    self.completion_tokens = completion_tokens;
                    if finish == FinishReason::Timeout {
                        return Step::Failed(timeout_error(app));
                    }
                    if let Ok(Some(s)) = self.decode.flush() {
                        let (out, hit) = self.stop.push(&s);
                        if hit {
                            self.pending = Some("stop");
                            return Step::Text(out);
                        }
                        if !out.is_empty() {
                            self.pending = Some(finish.openai());
                            let rest = self.stop.finish();
                            return Step::Text(out + &rest);
                        }
                    }
                    let rest = self.stop.finish();
                    if !rest.is_empty() {
                        // Emit the rest, then report the finish on the next call.
                        self.pending = Some(finish.openai());
                        return Step::Text(rest);
                    }
                    return Step::Finished(finish.openai());
                }
                Ok(Some(Event::Started { .. })) => {}
                Ok(Some(Event::Error(msg))) => {
                    return Step::Failed(
                        ApiError::bad_request(format!("generation failed: {msg}"))
                            .status(500)
                            .kind("server_error"),
                    )
                }
            }
        }
    }
}

/// What the output guard said about one answer, for the response, the log and the metrics.
struct OutputOutcome {
    mode: GuardMode,
    verdict: Option<OutputVerdict>,
    /// Why there is no verdict (the answer then goes out unflagged).
    error: Option<String>,
    blocked: bool,
    /// Completion tokens read by the streaming checkpoint that blocked, when one did.
    checkpoint_tokens: Option<usize>,
}

impl OutputOutcome {
    fn flagged(&self) -> bool {
        self.verdict.as_ref().is_some_and(|v| v.flagged)
    }

    /// `pass`, `flagged` (monitor), `blocked` or `error`: the metric's outcome and the header.
    fn state(&self) -> &'static str {
        if self.error.is_some() {
            "error"
        } else if self.blocked {
            "blocked"
        } else if self.flagged() {
            "flagged"
        } else {
            "pass"
        }
    }

    fn json(&self) -> Value {
        let mut v = match &self.verdict {
            Some(v) => serde_json::to_value(v).unwrap_or_else(|_| json!({})),
            None => json!({"flagged": false}),
        };
        v["mode"] = json!(self.mode.name());
        v["blocked"] = json!(self.blocked);
        if let Some(e) = &self.error {
            v["error"] = json!(e);
        }
        if let Some(n) = self.checkpoint_tokens {
            v["checkpoint_tokens"] = json!(n);
        }
        v
    }
}

/// Result of one read by the reader thread and how long it took (queueing included).
type ReadResult = (Result<OutputVerdict, String>, f64);

/// Read `text` with the output guard, waiting at most until `hard`.
async fn read_output(reader: Reader, check: OutputCheck, hard: tokio::time::Instant) -> ReadResult {
    let t = Instant::now();
    let r = match tokio::time::timeout_at(hard, reader.check(check)).await {
        Ok(r) => r,
        Err(_) => Err("timed out waiting for the output guard's reader".into()),
    };
    (r, t.elapsed().as_secs_f64())
}

/// Turn a read into an outcome; a failed read is logged and counted and leaves the answer unflagged.
fn outcome(app: &App, meta: &Meta, id: &str, read: ReadResult, at: Option<usize>) -> OutputOutcome {
    let (r, secs) = read;
    app.metrics.output_guard_seconds(&meta.preset, secs);
    let mode = meta.output_mode;
    match r {
        Ok(v) => {
            let blocked = v.flagged && mode == GuardMode::Block;
            OutputOutcome {
                mode,
                verdict: Some(v),
                error: None,
                blocked,
                checkpoint_tokens: at.filter(|_| blocked),
            }
        }
        Err(e) => {
            eprintln!(
                "[pgate serve] output guard error on {id} (preset {}): {e}; the answer is not flagged",
                meta.preset
            );
            app.metrics.output_guard_error(&meta.preset);
            OutputOutcome {
                mode,
                verdict: None,
                error: Some(e),
                blocked: false,
                checkpoint_tokens: None,
            }
        }
    }
}

/// The final read of an answer (no reader loaded: an error outcome).
async fn check_output(
    app: &App,
    meta: &Meta,
    id: &str,
    text: &str,
    hard: tokio::time::Instant,
) -> OutputOutcome {
    let read = match &app.reader {
        Some(r) => read_output(r.clone(), meta.output_check(text), hard).await,
        None => (Err("no output guard is loaded".into()), 0.0),
    };
    outcome(app, meta, id, read, None)
}

/// Count a request's output-guard outcome once, and log a flag.
fn record_outcome(app: &App, meta: &Meta, id: &str, o: &OutputOutcome) {
    app.metrics.output_guard(&meta.preset, o.state());
    if let (true, Some(v)) = (o.flagged(), &o.verdict) {
        eprintln!(
            "[pgate serve] output guard {} {id} (preset {}, mode {}): p_refusal {:.3}, p_degenerate {:.3}, refusal intent {:.3} ({}){}",
            if o.blocked { "blocked" } else { "flagged" },
            meta.preset,
            o.mode.name(),
            v.p_refusal,
            v.p_degenerate,
            v.refusal_intent,
            v.refusal_intent_source,
            o.checkpoint_tokens
                .map(|n| format!(", at the checkpoint after {n} tokens"))
                .unwrap_or_default()
        );
    }
}

async fn full_response(
    app: Arc<App>,
    meta: Meta,
    id: String,
    mut rx: UnboundedReceiver<Event>,
    stops: Vec<String>,
    t0: Instant,
    hard: tokio::time::Instant,
) -> Response {
    let preset = meta.preset.clone();
    let (mut text, mut finish, completion_tokens) = if meta.blocked {
        (BLOCK_MESSAGE.to_string(), "content_filter", 0)
    } else {
        let mut c = Collector::new(&app, stops);
        let mut first = true;
        let finish = loop {
            if let Some(f) = c.pending.take() {
                break f;
            }
            match c.next(&mut rx, hard, &app).await {
                Step::Text(_) => {
                    if first {
                        app.metrics.ttft(&preset, t0.elapsed().as_secs_f64());
                        first = false;
                    }
                }
                Step::Finished(f) => break f,
                Step::Failed(e) => {
                    app.metrics.request(&preset, e.status);
                    return error_response(&e);
                }
            }
        };
        drop(rx);
        (c.stop.full().to_string(), finish, c.completion_tokens)
    };
    let output = if !meta.blocked && meta.output_mode != GuardMode::Off {
        let o = check_output(&app, &meta, &id, &text, hard).await;
        record_outcome(&app, &meta, &id, &o);
        if o.blocked {
            text = OUTPUT_BLOCK_MESSAGE.to_string();
            finish = "content_filter";
        }
        Some(o)
    } else {
        None
    };
    let usage = Usage::new(meta.prompt_tokens, completion_tokens);
    app.metrics
        .tokens(&preset, meta.prompt_tokens, completion_tokens);
    app.metrics.duration(&preset, t0.elapsed().as_secs_f64());
    app.metrics.request(&preset, 200);
    let mut pg = meta.json();
    pg["output_guard"] = output.as_ref().map_or(Value::Null, OutputOutcome::json);
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": preset,
        "system_fingerprint": Value::Null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": Value::Null,
            "finish_reason": finish,
        }],
        "usage": usage,
        "persona_gate": pg,
    });
    let mut r = Json(body).into_response();
    meta.headers(r.headers_mut());
    if let Some(o) = &output {
        r.headers_mut().insert(
            HeaderName::from_static("x-pgate-output-guard"),
            HeaderValue::from_static(o.state()),
        );
    }
    r
}

fn chunk(id: &str, preset: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": now_secs(),
        "model": preset,
        "system_fingerprint": Value::Null,
        "choices": [{"index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish}],
    })
}

/// The SSE side of a streamed response.
struct Sink {
    otx: tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>,
    id: String,
    preset: String,
    /// A client that stops reading holds the stream no longer than the request's deadline.
    hard: tokio::time::Instant,
}

impl Sink {
    /// Send one event; false when the client has gone or stopped reading past the deadline.
    async fn send(&self, v: Value) -> bool {
        let ev = Ok(SseEvent::default().data(v.to_string()));
        matches!(
            tokio::time::timeout_at(self.hard, self.otx.send(ev)).await,
            Ok(Ok(()))
        )
    }

    async fn text(&self, s: &str) -> bool {
        s.is_empty()
            || self
                .send(chunk(&self.id, &self.preset, json!({"content": s}), None))
                .await
    }

    async fn done(&self) {
        let ev = Ok(SseEvent::default().data("[DONE]"));
        let _ = tokio::time::timeout_at(self.hard, self.otx.send(ev)).await;
    }
}

/// A checkpoint read in flight: it covers the first `covered` bytes of the held text.
struct Checkpoint {
    covered: usize,
    tokens: usize,
    task: tokio::task::JoinHandle<ReadResult>,
}

/// Text a block-mode stream holds back (output guard with checkpoints) until a check passes.
struct Held {
    /// Whether text is held back at all (block mode with `every > 0`).
    on: bool,
    every: usize,
    /// The probe reads at most this many answer tokens: past them, checkpoints tell nothing new.
    max_read: usize,
    sent: String,
    held: String,
    next_at: usize,
    pending: Option<Checkpoint>,
}

impl Held {
    fn new(app: &App, meta: &Meta) -> Self {
        let (every, max_read) = app
            .reader
            .as_ref()
            .map_or((0, 0), |r| (r.guard.every, r.guard.probe.max_output_tokens));
        Held {
            on: meta.output_mode == GuardMode::Block && every > 0 && app.reader.is_some(),
            every,
            max_read,
            sent: String::new(),
            held: String::new(),
            next_at: every,
            pending: None,
        }
    }

    /// Start a checkpoint read when one is due and none is in flight.
    fn maybe_check(&mut self, app: &App, meta: &Meta, tokens: usize, hard: tokio::time::Instant) {
        if !self.on || self.pending.is_some() || tokens < self.next_at {
            return;
        }
        let Some(reader) = app.reader.clone() else {
            return;
        };
        let check = meta.output_check(&format!("{}{}", self.sent, self.held));
        self.pending = Some(Checkpoint {
            covered: self.held.len(),
            tokens,
            task: tokio::spawn(read_output(reader, check, hard)),
        });
        self.next_at = tokens + self.every;
    }

    /// Move the first `n` held bytes to the sent text and return them.
    fn release(&mut self, n: usize) -> String {
        let out: String = self.held.drain(..n.min(self.held.len())).collect();
        self.sent.push_str(&out);
        out
    }
}

/// What the stream loop waits for next.
enum Next {
    Step(Step),
    Checkpoint(ReadResult),
}

/// Stream the answer. Without held text it goes out as it comes; with it (block mode, checkpoints)
/// each part goes out once a checkpoint covering it passed, and a flagged checkpoint ends the
/// stream. Returns the finish reason, the completion tokens and the output guard's outcome;
/// `None` when the client left or generation failed (the error was sent).
#[allow(clippy::too_many_arguments)]
async fn stream_answer(
    app: &App,
    meta: &Meta,
    sink: &Sink,
    rx: &mut UnboundedReceiver<Event>,
    stops: Vec<String>,
    t0: Instant,
    hard: tokio::time::Instant,
) -> Option<(&'static str, usize, Option<OutputOutcome>)> {
    let mut c = Collector::new(app, stops);
    let mut held = Held::new(app, meta);
    let mut first_tok = true;
    let finish = loop {
        if let Some(f) = c.pending.take() {
            break f;
        }
        let next = tokio::select! {
            biased;
            r = async {
                match held.pending.as_mut() {
                    Some(cp) => (&mut cp.task).await,
                    None => std::future::pending().await,
                }
            } => Next::Checkpoint(r.unwrap_or_else(|e| (Err(format!("checkpoint task: {e}")), 0.0))),
            s = c.next(rx, hard, app) => Next::Step(s),
        };
        match next {
            Next::Checkpoint(read) => {
                let Some(cp) = held.pending.take() else {
                    continue;
                };
                let o = outcome(app, meta, &sink.id, read, Some(cp.tokens));
                if o.blocked {
                    let sent = gone_unless(app, meta, sink.text(OUTPUT_BLOCK_MESSAGE).await);
                    return sent.then_some(("content_filter", c.completion_tokens, Some(o)));
                }
                let mut out = held.release(cp.covered);
                if cp.tokens >= held.max_read {
                    // Later checks would read the same first tokens: stop holding back.
                    held.on = false;
                    out.push_str(&held.release(usize::MAX));
                }
                if !sink.text(&out).await {
                    app.metrics.request(&meta.preset, 499);
                    return None;
                }
            }
            Next::Step(Step::Text(s)) => {
                if first_tok {
                    app.metrics.ttft(&meta.preset, t0.elapsed().as_secs_f64());
                    first_tok = false;
                }
                if held.on {
                    held.held.push_str(&s);
                    held.maybe_check(app, meta, c.completion_tokens, hard);
                } else {
                    held.sent.push_str(&s);
                    if !sink.text(&s).await {
                        app.metrics.request(&meta.preset, 499);
                        return None;
                    }
                }
            }
            Next::Step(Step::Finished(f)) => break f,
            Next::Step(Step::Failed(e)) => {
                app.metrics.request(&meta.preset, e.status);
                let _ = sink.send(e.body()).await;
                sink.done().await;
                return None;
            }
        }
    };
    if let Some(cp) = held.pending.take() {
        cp.task.abort(); // the final read below covers everything
    }
    let tokens = c.completion_tokens;
    if meta.output_mode == GuardMode::Off {
        let rest = held.release(usize::MAX);
        let sent = gone_unless(app, meta, sink.text(&rest).await);
        return sent.then_some((finish, tokens, None));
    }
    let full = format!("{}{}", held.sent, held.held);
    let o = check_output(app, meta, &sink.id, &full, hard).await;
    let (text, finish) = match (o.blocked, held.on) {
        (true, true) => (OUTPUT_BLOCK_MESSAGE.to_string(), "content_filter"),
        (true, false) => (STREAM_FLAGGED_NOTE.to_string(), "content_filter"),
        (false, _) => (held.release(usize::MAX), finish),
    };
    let sent = gone_unless(app, meta, sink.text(&text).await);
    sent.then_some((finish, tokens, Some(o)))
}

/// Count a stream whose client left (499) when `sent` is false; returns `sent`.
fn gone_unless(app: &App, meta: &Meta, sent: bool) -> bool {
    if !sent {
        app.metrics.request(&meta.preset, 499);
    }
    sent
}

#[allow(clippy::too_many_arguments)]
async fn stream_response(
    app: Arc<App>,
    meta: Meta,
    id: String,
    rx: UnboundedReceiver<Event>,
    stops: Vec<String>,
    include_usage: bool,
    t0: Instant,
    hard: tokio::time::Instant,
) -> Response {
    let (otx, orx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let mut hdrs = HeaderMap::new();
    meta.headers(&mut hdrs);
    let sink = Sink {
        otx: otx.clone(),
        id: id.clone(),
        preset: meta.preset.clone(),
        hard,
    };
    let preset = meta.preset.clone();
    tokio::spawn(async move {
        let task = stream_task(app.clone(), meta, sink, rx, stops, include_usage, t0);
        if let Err(p) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
            // A bug while streaming: the client still gets an error event and the end marker,
            // and the request is counted.
            let e = crate::layers::panic_error(&app.metrics, "a chat stream", &id, p.as_ref());
            app.metrics.request(&preset, 500);
            let sink = Sink {
                otx,
                id,
                preset,
                hard,
            };
            let _ = sink.send(e.body()).await;
            sink.done().await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(orx);
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut().extend(hdrs);
    r
}

/// Send a streamed answer: the role chunk, the text, the finish chunk, usage, `[DONE]`.
async fn stream_task(
    app: Arc<App>,
    meta: Meta,
    sink: Sink,
    mut rx: UnboundedReceiver<Event>,
    stops: Vec<String>,
    include_usage: bool,
    t0: Instant,
) {
    let hard = sink.hard;
    let mut first = chunk(
        &sink.id,
        &sink.preset,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    first["persona_gate"] = meta.json();
    if !sink.send(first).await {
        app.metrics.request(&meta.preset, 499);
        return;
    }
    let (finish, completion_tokens, output) = if meta.blocked {
        if !sink.text(BLOCK_MESSAGE).await {
            app.metrics.request(&meta.preset, 499);
            return;
        }
        ("content_filter", 0, None)
    } else {
        match stream_answer(&app, &meta, &sink, &mut rx, stops, t0, hard).await {
            Some(r) => r,
            None => return,
        }
    };
    drop(rx);
    let mut last = chunk(&sink.id, &sink.preset, json!({}), Some(finish));
    if let Some(o) = &output {
        record_outcome(&app, &meta, &sink.id, o);
        last["persona_gate"] = json!({"output_guard": o.json()});
    }
    if !sink.send(last).await {
        app.metrics.request(&meta.preset, 499);
        return;
    }
    if include_usage {
        let mut u = chunk(&sink.id, &sink.preset, json!({}), None);
        u["choices"] = json!([]);
        u["usage"] = serde_json::to_value(Usage::new(meta.prompt_tokens, completion_tokens))
            .unwrap_or(Value::Null);
        let _ = sink.send(u).await;
    }
    sink.done().await;
    app.metrics
        .tokens(&meta.preset, meta.prompt_tokens, completion_tokens);
    app.metrics
        .duration(&meta.preset, t0.elapsed().as_secs_f64());
    app.metrics.request(&meta.preset, 200);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_prefixes() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("N"), (String::new(), false));
        assert_eq!(m.push("Dx"), (String::new(), true));
        assert_eq!(m.full(), "hello ");
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(m.push("x"), ("Ex".to_string(), false));
        assert_eq!(m.finish(), "");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("abc"), ("abc".to_string(), false));
    }

    /// Finding (issue 17): non-ASCII output with `stop` set panicked ("byte index 4 is not a char
    /// boundary"): the search window's start fell inside a multibyte character.
    #[test]
    fn stop_matcher_multibyte_text_and_stops() {
        let mut m = StopMatcher::new(vec!["xyz".into()]);
        assert_eq!(m.push("ééé"), ("ééé".to_string(), false));
        assert_eq!(m.push("a"), ("a".to_string(), false));
        let text = "Grüße 世界! Ça va? ここは日本です。👋🏽 ok — ñandú";
        let stop_sets: [&[&str]; 8] = [
            &["#", "@@", "~~~", "%%%%", "$$$$$"],
            &["日本"],
            &["ü"],
            &["👋"],
            &["va?", "界"],
            &["ñandú"],
            &["ú"],
            &["—", "ok"],
        ];
        let chars: Vec<char> = text.chars().collect();
        for stops in stop_sets {
            let cut = stops.iter().filter_map(|s| text.find(s)).min();
            let want = &text[..cut.unwrap_or(text.len())];
            for per_push in 1..=5 {
                let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
                let (mut out, mut hit) = (String::new(), false);
                for piece in chars.chunks(per_push) {
                    let (o, h) = m.push(&piece.iter().collect::<String>());
                    out.push_str(&o);
                    if h {
                        hit = true;
                        break;
                    }
                }
                if !hit {
                    out.push_str(&m.finish());
                }
                assert_eq!(out, want, "stops {stops:?}, {per_push} chars per push");
                assert_eq!(hit, cut.is_some(), "stops {stops:?}");
                assert_eq!(m.full(), want);
            }
        }
    }

    #[test]
    fn floor_char_boundary_stays_on_characters() {
        let s = "aé日👋";
        let got: Vec<usize> = (0..=s.len() + 1)
            .map(|i| floor_char_boundary(s, i))
            .collect();
        assert_eq!(got, [0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10, 10]);
    }
}
