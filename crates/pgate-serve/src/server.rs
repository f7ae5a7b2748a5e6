//! The HTTP side: routes, request checks, streaming, auth, limits, graceful shutdown.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/chat/completions` | OpenAI chat completions, `stream: true` as server-sent events |
//! | `GET /v1/models`, `GET /v1/models/{id}` | one entry per preset |
//! | `GET /health` | status, model, presets, queue |
//! | `GET /metrics` | Prometheus text |
//!
//! Every error is an OpenAI error object with a 4xx/5xx status: 400 malformed request (bad JSON,
//! wrong field type, too many tokens, unsupported value), 401 missing or wrong bearer token, 404
//! unknown preset (`model_not_found`) or route, 413 body over 4 MiB, 429 queue full (`queue_full`,
//! with `Retry-After: 1`), 503 shutting down, 504 request timed out, 500 engine failure.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use persona_gate::generate::Sampling;
use persona_gate::model::Model;
use persona_gate::tokenize::{ChatMessage, ChatTokenizer, DecodeStream};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::{self, EngineConfig, Event, FinishReason, Job, Projector, WindowProjection};
use crate::guard::{GuardCalibration, GuardReport, BLOCK_MESSAGE};
use crate::metrics::Metrics;
use crate::openai::{flatten_messages, now_secs, parse_chat_request, ApiError, Stop, Usage};
use crate::presets::{GuardMode, Preset};

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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tokens: 1024,
            default_max_tokens: 256,
            max_prompt_tokens: 4096,
            timeout: Duration::from_secs(300),
        }
    }
}

pub struct ServerConfig {
    /// Name the default preset also answers to (the model's name).
    pub model_id: String,
    pub presets: BTreeMap<String, Preset>,
    pub limits: Limits,
    /// Required `Authorization: Bearer` token for `/v1/*`.
    pub api_key: Option<String>,
    /// Requests that may wait for a batch slot; one more is a 429.
    pub queue: usize,
    /// Sequences decoded together.
    pub batch_size: usize,
    pub guard: Option<Arc<GuardCalibration>>,
    pub projector: Projector,
}

struct App {
    model_id: String,
    presets: BTreeMap<String, Preset>,
    limits: Limits,
    api_key: Option<String>,
    tokenizer: ChatTokenizer,
    has_template: bool,
    guard: Option<Arc<GuardCalibration>>,
    tx: SyncSender<Job>,
    queue: usize,
    metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    started: u64,
}

/// Check the configuration against the loaded model: guard modes need a guard file.
pub fn check_config(cfg: &ServerConfig) -> persona_gate::Result<()> {
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
    };
    let m2 = model.clone();
    let met2 = metrics.clone();
    let engine = std::thread::Builder::new()
        .name("pgate-engine".into())
        .spawn(move || engine::run(m2, engine_cfg, rx, met2))
        .map_err(|e| persona_gate::Error::io("engine thread", e))?;
    let app = Arc::new(App {
        model_id: cfg.model_id.clone(),
        presets: cfg.presets,
        limits: cfg.limits,
        api_key: cfg.api_key,
        tokenizer: model.tokenizer.clone(),
        has_template: model.tokenizer.has_chat_template(),
        guard: cfg.guard,
        tx,
        queue: cfg.queue,
        metrics,
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
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(4 << 20))
        .with_state(app.clone());
    let flag = app.clone();
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            flag.shutting_down.store(true, Ordering::SeqCst);
            eprintln!("[pgate serve] shutting down: finishing in-flight requests");
        })
        .await;
    // The router (and its sender) is gone once serve returns; drop ours so the engine stops.
    drop(app);
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    result.map_err(|e| persona_gate::Error::io("http server", e))
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

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 429 {
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    r
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

async fn not_found() -> Response {
    error_response(
        &ApiError::bad_request(
            "no such route (POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics)",
        )
        .status(404)
        .code("not_found"),
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

async fn health(State(app): State<Arc<App>>) -> Response {
    let status = if app.shutting_down.load(Ordering::SeqCst) {
        "shutting_down"
    } else {
        "ok"
    };
    Json(json!({
        "status": status,
        "model": app.model_id,
        "presets": app.presets.keys().collect::<Vec<_>>(),
        "guard": app.guard.as_ref().map(|g| json!({
            "refusal_layer": g.refusal_layer,
            "threshold": g.threshold,
            "shift_threshold": g.shift_threshold,
        })),
        "queue_depth": app.metrics.queue_depth.load(Ordering::Relaxed),
        "queue_capacity": app.queue,
        "running": app.metrics.running.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
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
    stream: bool,
    include_usage: bool,
    stops: Vec<String>,
    job: Job,
    rx: UnboundedReceiver<Event>,
}

fn render(app: &App, msgs: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    let text = if app.has_template {
        app.tokenizer.render_chat(msgs, true)
    } else {
        // Base model: system and the last user message as plain text.
        let sys = msgs
            .iter()
            .filter(|m| m.role == "system")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        let user = msgs.last().map(|m| m.content.as_str()).unwrap_or("");
        app.tokenizer
            .format_prompt((!sys.is_empty()).then_some(sys.as_str()), user)
    }
    .map_err(|e| ApiError::bad_request(format!("could not render the conversation: {e}")))?;
    app.tokenizer
        .encode(&text)
        .map_err(|e| ApiError::bad_request(format!("could not tokenize the conversation: {e}")))
}

fn prepare(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<Prepared, (String, ApiError)> {
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
    Ok(Prepared {
        preset: preset.name.clone(),
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.map(|o| o.include_usage).unwrap_or(false),
        stops,
        job,
        rx: erx,
    })
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
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|st| {
                self.text[self.emitted.saturating_sub(st.len())..]
                    .find(st.as_str())
                    .map(|i| i + self.emitted.saturating_sub(st.len()))
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

struct Meta {
    preset: String,
    mode: GuardMode,
    prompt_tokens: usize,
    projections: Vec<WindowProjection>,
    guard: Option<GuardReport>,
    blocked: bool,
}

impl Meta {
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

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let t0 = Instant::now();
    let p = match prepare(&app, &headers, &body) {
        Ok(p) => p,
        Err((preset, e)) => {
            app.metrics.request(&preset, e.status);
            return error_response(&e);
        }
    };
    let Prepared {
        preset,
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
    let (text, finish, completion_tokens) = if meta.blocked {
        (BLOCK_MESSAGE.to_string(), "content_filter", 0)
    } else {
        let mut c = Collector {
            decode: DecodeStream::new(&app.tokenizer, true),
            stop: StopMatcher::new(stops),
            completion_tokens: 0,
            pending: None,
        };
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
    let usage = Usage::new(meta.prompt_tokens, completion_tokens);
    app.metrics
        .tokens(&preset, meta.prompt_tokens, completion_tokens);
    app.metrics.duration(&preset, t0.elapsed().as_secs_f64());
    app.metrics.request(&preset, 200);
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
        "persona_gate": meta.json(),
    });
    let mut r = Json(body).into_response();
    meta.headers(r.headers_mut());
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

#[allow(clippy::too_many_arguments)]
async fn stream_response(
    app: Arc<App>,
    meta: Meta,
    id: String,
    mut rx: UnboundedReceiver<Event>,
    stops: Vec<String>,
    include_usage: bool,
    t0: Instant,
    hard: tokio::time::Instant,
) -> Response {
    let (otx, orx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let mut hdrs = HeaderMap::new();
    meta.headers(&mut hdrs);
    let preset = meta.preset.clone();
    tokio::spawn(async move {
        let send = |v: Value| {
            let otx = otx.clone();
            async move {
                otx.send(Ok(SseEvent::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        let mut first = chunk(
            &id,
            &preset,
            json!({"role": "assistant", "content": ""}),
            None,
        );
        first["persona_gate"] = meta.json();
        if !send(first).await {
            return;
        }
        let mut completion_tokens = 0;
        let finish = if meta.blocked {
            if !send(chunk(&id, &preset, json!({"content": BLOCK_MESSAGE}), None)).await {
                return;
            }
            "content_filter"
        } else {
            let mut c = Collector {
                decode: DecodeStream::new(&app.tokenizer, true),
                stop: StopMatcher::new(stops),
                completion_tokens: 0,
                pending: None,
            };
            let mut first_tok = true;
            let f = loop {
                if let Some(f) = c.pending.take() {
                    break f;
                }
                match c.next(&mut rx, hard, &app).await {
                    Step::Text(s) => {
                        if first_tok {
                            app.metrics.ttft(&preset, t0.elapsed().as_secs_f64());
                            first_tok = false;
                        }
                        if !send(chunk(&id, &preset, json!({"content": s}), None)).await {
                            app.metrics.request(&preset, 499);
                            return;
                        }
                    }
                    Step::Finished(f) => break f,
                    Step::Failed(e) => {
                        app.metrics.request(&preset, e.status);
                        let _ = send(e.body()).await;
                        let _ = otx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                        return;
                    }
                }
            };
            completion_tokens = c.completion_tokens;
            f
        };
        drop(rx);
        if !send(chunk(&id, &preset, json!({}), Some(finish))).await {
            return;
        }
        if include_usage {
            let mut u = chunk(&id, &preset, json!({}), None);
            u["choices"] = json!([]);
            u["usage"] = serde_json::to_value(Usage::new(meta.prompt_tokens, completion_tokens))
                .unwrap_or(Value::Null);
            let _ = send(u).await;
        }
        let _ = otx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        app.metrics
            .tokens(&preset, meta.prompt_tokens, completion_tokens);
        app.metrics.duration(&preset, t0.elapsed().as_secs_f64());
        app.metrics.request(&preset, 200);
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(orx);
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut().extend(hdrs);
    r
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
}
