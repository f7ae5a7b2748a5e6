//! A client for OpenAI-compatible `POST {base_url}/chat/completions` endpoints (vLLM, TGI,
//! SGLang, llama.cpp's server, Ollama, a hosted provider, or `pgate serve`), shared by the HTTP
//! judge ([`crate::eval::judge_http`]) and endpoint studies ([`crate::study::remote`]).
//!
//! Reliability is the point: a study may send tens of thousands of requests to a shared server.
//! - every try has a wall-clock timeout (`timeout_s`, connect + answer);
//! - 408, 429, 5xx, timeouts and connection errors are retried up to `max_attempts` tries in all,
//!   waiting `backoff_ms * 2^(try-1)` (capped at `max_backoff_ms`) times a random factor in
//!   [0.5, 1) so that many clients do not retry in lockstep; a `Retry-After` header in seconds is
//!   honoured when it is longer (still capped);
//! - other 4xx (bad key, unknown model, a prompt over the context) are not retried: they will not
//!   get better;
//! - an optional [`RateLimiter`] holds every try (retries included) to a requests-per-minute and a
//!   tokens-per-minute budget;
//! - every failed try is reported to the caller ([`Failure`]) as it happens, so a study can store
//!   it; the caller decides how many requests are in flight (worker threads).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// `[model.endpoint]` of a study file: the server, the model id it serves, and how to talk to it.
/// Only `base_url` and `model` identify the target (they are part of every condition hash); the
/// rest are client settings that can change between runs without recomputing anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The API root, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended).
    pub base_url: String,
    /// The model id sent with every request (vLLM: the served model name; `pgate serve`: a
    /// preset or the served model's name).
    pub model: String,
    /// Environment variable holding the API key (sent as a Bearer token); the key is never stored.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Seconds per try (connect + full answer).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Tries per item, the first included.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First backoff in ms; doubles every retry, times a random factor in [0.5, 1).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Start at most this many tries per minute (retries count).
    #[serde(default)]
    pub requests_per_minute: Option<f64>,
    /// Spend at most this many tokens per minute (prompt + completion; estimated before a try as
    /// prompt characters / 4 + max_tokens, corrected with the reported usage after it).
    #[serde(default)]
    pub tokens_per_minute: Option<f64>,
    /// Price of a million prompt tokens (any currency; used for the cost estimate only).
    #[serde(default)]
    pub price_input_per_mtok: Option<f64>,
    /// Price of a million completion tokens.
    #[serde(default)]
    pub price_output_per_mtok: Option<f64>,
}

fn default_timeout() -> f64 {
    120.0
}
fn default_attempts() -> u32 {
    6
}
fn default_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    30_000
}
fn default_concurrency() -> usize {
    8
}

impl EndpointConfig {
    /// Field checks that need no network.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Error::InvalidValue(format!("[model.endpoint]: {m}"));
        let url = self.base_url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad(format!(
                "base_url '{url}' must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)"
            )));
        }
        if self.model.trim().is_empty() {
            return Err(bad(
                "model is empty (the model id the server serves, see GET /v1/models)".into(),
            ));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(bad("timeout_s must be > 0".into()));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts must be at least 1".into()));
        }
        if self.concurrency == 0 {
            return Err(bad("concurrency must be at least 1".into()));
        }
        for (k, v) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
        ] {
            if let Some(x) = v {
                if !(x.is_finite() && x > 0.0) {
                    return Err(bad(format!("{k} must be > 0 (leave it out for no limit)")));
                }
            }
        }
        for (k, v) in [
            ("price_input_per_mtok", self.price_input_per_mtok),
            ("price_output_per_mtok", self.price_output_per_mtok),
        ] {
            if let Some(x) = v {
                if !(x.is_finite() && x >= 0.0) {
                    return Err(bad(format!("{k} must be >= 0")));
                }
            }
        }
        Ok(())
    }

    /// The API root without a trailing `/` or `/chat/completions`: what the condition hash covers.
    pub fn normalized_base(&self) -> String {
        normalize_base(&self.base_url)
    }

    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            timeout: Duration::from_secs_f64(self.timeout_s),
            max_attempts: self.max_attempts,
            backoff_ms: self.backoff_ms,
            max_backoff_ms: self.max_backoff_ms,
        }
    }

    /// The API key from `api_key_env` (an error naming the variable when it is not set).
    pub fn api_key(&self) -> Result<Option<String>> {
        read_key(self.api_key_env.as_deref(), "[model.endpoint]")
    }

    /// Estimated cost of a token count, when both prices are given.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Option<f64> {
        Some(
            prompt_tokens as f64 / 1e6 * self.price_input_per_mtok?
                + completion_tokens as f64 / 1e6 * self.price_output_per_mtok?,
        )
    }
}

/// `http://h:8000/v1/` and `http://h:8000/v1/chat/completions` -> `http://h:8000/v1`.
pub fn normalize_base(url: &str) -> String {
    let t = url.trim().trim_end_matches('/');
    t.strip_suffix("/chat/completions")
        .unwrap_or(t)
        .trim_end_matches('/')
        .to_string()
}

/// Read an API key from an environment variable (`what` names the config in the error).
pub fn read_key(var: Option<&str>, what: &str) -> Result<Option<String>> {
    match var {
        None => Ok(None),
        Some(v) => std::env::var(v).map(Some).map_err(|_| {
            Error::InvalidValue(format!(
                "{what}: environment variable {v} (api_key_env) is not set"
            ))
        }),
    }
}

/// Timeouts and retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl RetryPolicy {
    /// Wait before try `attempt + 1` after try `attempt` failed.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .backoff_ms
            .saturating_mul(1u64 << (attempt.max(1) - 1).min(20))
            .min(self.max_backoff_ms);
        let jitter: f64 = rand::rng().random_range(0.5..1.0);
        let mut wait = Duration::from_secs_f64(exp as f64 * jitter / 1000.0);
        if let Some(ra) = retry_after {
            wait = wait.max(ra.min(Duration::from_millis(self.max_backoff_ms)));
        }
        wait
    }
}

/// What kind of failure a try was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No full answer within the timeout.
    Timeout,
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx (and 408).
    Server,
    /// Other HTTP 4xx: not retried.
    Client,
    /// Connection refused or reset, DNS, TLS.
    Transport,
    /// A 200 answer that is not a chat completion.
    BadAnswer,
}

impl FailureKind {
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Server => "server",
            FailureKind::Client => "client",
            FailureKind::Transport => "transport",
            FailureKind::BadAnswer => "bad_answer",
        }
    }
}

/// One failed try.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    /// 1-based try number.
    pub attempt: u32,
    pub kind: FailureKind,
    /// HTTP status, if there was one.
    pub status: Option<u16>,
    pub message: String,
    /// Whether another try follows (false: the item was given up, or the failure is permanent).
    pub will_retry: bool,
    pub elapsed_ms: u64,
}

/// A chat completion as the server returned it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub content: String,
    /// `model` of the answer: what the server says it ran.
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub id: Option<String>,
}

/// The result of a call with retries.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// The completion, or the errors of every try joined (`try 1: HTTP 500: ...; try 2: ...`).
    pub result: std::result::Result<Completion, String>,
    /// Tries made.
    pub attempts: u32,
    /// Wall time of the successful try (ms), or of all tries.
    pub latency_ms: u64,
}

/// Why one try failed.
struct TryError {
    kind: FailureKind,
    status: Option<u16>,
    msg: String,
    retry_after: Option<Duration>,
}

impl TryError {
    fn retry(&self) -> bool {
        !matches!(self.kind, FailureKind::Client | FailureKind::BadAnswer)
    }
}

/// A token bucket per limit: requests per minute and tokens per minute. Each bucket holds one
/// second's worth (at least one request; a request larger than a second's tokens waits for a full
/// bucket and leaves it in debt), so the long-run rate never exceeds the limit and bursts stay short.
pub struct RateLimiter {
    rpm: Option<f64>,
    tpm: Option<f64>,
    state: Mutex<Buckets>,
}

struct Buckets {
    req: f64,
    tok: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(requests_per_minute: Option<f64>, tokens_per_minute: Option<f64>) -> Self {
        let s = Self {
            rpm: requests_per_minute,
            tpm: tokens_per_minute,
            state: Mutex::new(Buckets {
                req: 0.0,
                tok: 0.0,
                last: Instant::now(),
            }),
        };
        {
            let mut b = s.state.lock().unwrap_or_else(|e| e.into_inner());
            b.req = s.req_cap();
            b.tok = s.tok_cap();
        }
        s
    }

    fn req_cap(&self) -> f64 {
        self.rpm.map(|r| (r / 60.0).max(1.0)).unwrap_or(0.0)
    }

    fn tok_cap(&self) -> f64 {
        self.tpm.map(|t| (t / 60.0).max(1.0)).unwrap_or(0.0)
    }

    /// Block until a try of about `tokens` tokens may start (returns early when `stop` is set).
    pub fn acquire(&self, tokens: u64, stop: &AtomicBool) {
        if self.rpm.is_none() && self.tpm.is_none() {
            return;
        }
        loop {
            let wait = {
                let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let dt = now.duration_since(b.last).as_secs_f64();
                b.last = now;
                if let Some(r) = self.rpm {
                    b.req = (b.req + dt * r / 60.0).min(self.req_cap());
                }
                if let Some(t) = self.tpm {
                    b.tok = (b.tok + dt * t / 60.0).min(self.tok_cap());
                }
                let need_tok = (tokens as f64).min(self.tok_cap());
                let req_ok = self.rpm.is_none() || b.req >= 1.0;
                let tok_ok = self.tpm.is_none() || b.tok >= need_tok;
                if req_ok && tok_ok {
                    if self.rpm.is_some() {
                        b.req -= 1.0;
                    }
                    if self.tpm.is_some() {
                        b.tok -= tokens as f64;
                    }
                    return;
                }
                let wr = self.rpm.map(|r| (1.0 - b.req) / (r / 60.0)).unwrap_or(0.0);
                let wt = self
                    .tpm
                    .map(|t| (need_tok - b.tok) / (t / 60.0))
                    .unwrap_or(0.0);
                wr.max(wt).clamp(0.001, 0.25)
            };
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }

    /// Correct a try's token estimate with what the server reported.
    pub fn settle(&self, estimated: u64, actual: u64) {
        if self.tpm.is_none() {
            return;
        }
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.tok = (b.tok + estimated as f64 - actual as f64).min(self.tok_cap());
    }
}

/// An OpenAI-compatible chat-completions client with retries and an optional rate limiter. Shared
/// by reference between worker threads (`ureq::Agent` pools connections).
pub struct Client {
    base: String,
    url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    pub policy: RetryPolicy,
    limiter: Option<RateLimiter>,
}

impl Client {
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        policy: RetryPolicy,
        limiter: Option<RateLimiter>,
    ) -> Self {
        let base = normalize_base(base_url);
        let agent = ureq::AgentBuilder::new()
            .timeout(policy.timeout)
            .max_idle_connections_per_host(64)
            .build();
        Self {
            url: format!("{base}/chat/completions"),
            base,
            api_key,
            agent,
            policy,
            limiter,
        }
    }

    /// The client of a study's `[model.endpoint]`.
    pub fn for_endpoint(ep: &EndpointConfig) -> Result<Self> {
        ep.check()?;
        let limiter = (ep.requests_per_minute.is_some() || ep.tokens_per_minute.is_some())
            .then(|| RateLimiter::new(ep.requests_per_minute, ep.tokens_per_minute));
        Ok(Self::new(&ep.base_url, ep.api_key()?, ep.policy(), limiter))
    }

    /// The API root (normalized).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET {base}/models`: the model ids the server lists (one try, for the record).
    pub fn list_models(&self) -> std::result::Result<Vec<String>, String> {
        let mut req = self.agent.get(&format!("{}/models", self.base));
        if let Some(k) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = req.call().map_err(|e| e.to_string())?;
        let v: Value = resp
            .into_json()
            .map_err(|e| format!("GET /models: not JSON: {e}"))?;
        Ok(v.get("data")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn try_once(&self, body: &str) -> std::result::Result<Completion, TryError> {
        let mut req = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        match req.send_string(body) {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| TryError {
                    kind: if is_timeout(&e.to_string()) {
                        FailureKind::Timeout
                    } else {
                        FailureKind::Transport
                    },
                    status: None,
                    msg: format!("reading the answer: {e}"),
                    retry_after: None,
                })?;
                parse_completion(&text).map_err(|msg| TryError {
                    kind: FailureKind::BadAnswer,
                    status: Some(200),
                    msg,
                    retry_after: None,
                })
            }
            Err(ureq::Error::Status(code, resp)) => {
                let retry_after = resp
                    .header("Retry-After")
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64);
                let text = resp.into_string().unwrap_or_default();
                let kind = match code {
                    429 => FailureKind::RateLimited,
                    408 => FailureKind::Timeout,
                    c if c >= 500 => FailureKind::Server,
                    _ => FailureKind::Client,
                };
                Err(TryError {
                    kind,
                    status: Some(code),
                    msg: format!("HTTP {code}: {}", snippet(&text)),
                    retry_after,
                })
            }
            Err(ureq::Error::Transport(t)) => {
                let msg = t.to_string();
                Err(TryError {
                    kind: if is_timeout(&msg) {
                        FailureKind::Timeout
                    } else {
                        FailureKind::Transport
                    },
                    status: None,
                    msg: format!("transport: {msg}"),
                    retry_after: None,
                })
            }
        }
    }

    /// POST one chat-completions body with retries. `est_tokens` feeds the rate limiter;
    /// `on_failure` sees every failed try as it happens. When `stop` is set no further try starts.
    pub fn chat(
        &self,
        body: &Value,
        est_tokens: u64,
        stop: &AtomicBool,
        on_failure: &mut dyn FnMut(&Failure),
    ) -> CallOutcome {
        let text = body.to_string();
        let mut errors: Vec<String> = Vec::new();
        let t_all = Instant::now();
        let max = self.policy.max_attempts.max(1);
        for attempt in 1..=max {
            if let Some(l) = &self.limiter {
                l.acquire(est_tokens, stop);
            }
            let t0 = Instant::now();
            match self.try_once(&text) {
                Ok(c) => {
                    if let Some(l) = &self.limiter {
                        let actual =
                            c.prompt_tokens.unwrap_or(0) + c.completion_tokens.unwrap_or(0);
                        if actual > 0 {
                            l.settle(est_tokens, actual);
                        }
                    }
                    return CallOutcome {
                        result: Ok(c),
                        attempts: attempt,
                        latency_ms: t0.elapsed().as_millis() as u64,
                    };
                }
                Err(e) => {
                    let last = !e.retry() || attempt == max || stop.load(Ordering::SeqCst);
                    errors.push(format!("try {attempt}: {}", e.msg));
                    on_failure(&Failure {
                        attempt,
                        kind: e.kind,
                        status: e.status,
                        message: e.msg.clone(),
                        will_retry: !last,
                        elapsed_ms: t0.elapsed().as_millis() as u64,
                    });
                    if last {
                        return CallOutcome {
                            result: Err(errors.join("; ")),
                            attempts: attempt,
                            latency_ms: t_all.elapsed().as_millis() as u64,
                        };
                    }
                    std::thread::sleep(self.policy.backoff(attempt, e.retry_after));
                }
            }
        }
        CallOutcome {
            result: Err(errors.join("; ")),
            attempts: max,
            latency_ms: t_all.elapsed().as_millis() as u64,
        }
    }
}

fn is_timeout(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("timed out") || m.contains("timeout") || m.contains("would block")
}

/// Parse a non-streaming chat-completions answer.
pub fn parse_completion(text: &str) -> std::result::Result<Completion, String> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| format!("answer is not JSON ({e}): {}", snippet(text)))?;
    let content = v
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "answer has no choices[0].message.content: {}",
                snippet(text)
            )
        })?;
    let u = |k: &str| v.pointer(&format!("/usage/{k}")).and_then(Value::as_u64);
    Ok(Completion {
        content,
        model: v.get("model").and_then(Value::as_str).map(str::to_string),
        finish_reason: v
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string),
        prompt_tokens: u("prompt_tokens"),
        completion_tokens: u("completion_tokens"),
        id: v.get("id").and_then(Value::as_str).map(str::to_string),
    })
}

/// The first 200 characters of a text, whitespace collapsed (for error messages).
pub fn snippet(s: &str) -> String {
    let t: String = s.chars().take(200).collect();
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}
