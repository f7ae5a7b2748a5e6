//! A judge behind any OpenAI-compatible `POST {base_url}/chat/completions` endpoint (OpenAI,
//! vLLM, llama.cpp server, TGI, Ollama, ...).
//!
//! Reliability is the point: a study may send thousands of requests to a shared server.
//! - every request has a wall-clock timeout (`timeout_s`, connect + answer);
//! - 408, 429, 5xx, timeouts and connection errors are retried up to `max_attempts` tries in all,
//!   waiting `backoff_ms * 2^(try-1)` (capped at `max_backoff_ms`) times a random factor in
//!   [0.5, 1) so that many clients do not retry in lockstep; a `Retry-After` header in seconds is
//!   honoured when it is longer (still capped);
//! - other 4xx (bad key, unknown model) are not retried: they will not get better;
//! - at most `concurrency` requests are in flight (scoped worker threads);
//! - a row whose tries all failed gets a failure outcome (error text, attempts), never an error
//!   for the whole run.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rand::Rng;
use serde_json::json;

use super::judge::{
    guard_task, strongreject_prompt, GuardFormat, Judge, JudgeConfig, JudgeInput, JudgeMode,
    JudgeOutcome, STRONGREJECT_SYSTEM,
};
use crate::{Error, Result};

pub struct HttpJudge {
    name: String,
    mode: JudgeMode,
    cfg: JudgeConfig,
    url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

/// Why one try failed.
struct TryError {
    retry: bool,
    msg: String,
    retry_after: Option<Duration>,
}

impl HttpJudge {
    /// A client for `cfg` (kind = "http"); reads the API key from `api_key_env` now, so a missing
    /// variable is reported before any request.
    pub fn new(cfg: &JudgeConfig) -> Result<Self> {
        cfg.check()?;
        let name = cfg.display_name();
        let base = cfg.base_url.clone().unwrap_or_default();
        let url = if base.trim_end_matches('/').ends_with("/chat/completions") {
            base
        } else {
            format!("{}/chat/completions", base.trim_end_matches('/'))
        };
        let api_key = match &cfg.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                Error::InvalidValue(format!(
                    "judge '{name}': environment variable {var} (api_key_env) is not set"
                ))
            })?),
        };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs_f64(cfg.timeout_s))
            .build();
        Ok(Self {
            mode: cfg.effective_mode().unwrap_or(JudgeMode::StrongReject),
            name,
            cfg: cfg.clone(),
            url,
            api_key,
            agent,
        })
    }

    /// The request body for one item.
    pub fn body(&self, item: &JudgeInput) -> serde_json::Value {
        let messages = match (self.mode, self.cfg.guard_format) {
            (JudgeMode::StrongReject, _) => json!([
                {"role": "system", "content": STRONGREJECT_SYSTEM},
                {"role": "user", "content": strongreject_prompt(&item.prompt, &item.response)},
            ]),
            (JudgeMode::Guard, GuardFormat::Messages) => json!([
                {"role": "user", "content": item.prompt},
                {"role": "assistant", "content": item.response},
            ]),
            (JudgeMode::Guard, GuardFormat::Prompt) => json!([
                {"role": "user", "content": guard_task(&item.prompt, &item.response)},
            ]),
        };
        json!({
            "model": self.cfg.model.clone().unwrap_or_default(),
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.cfg.max_tokens,
        })
    }

    fn try_once(&self, body: &str) -> std::result::Result<String, TryError> {
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
                    retry: true,
                    msg: format!("reading the answer: {e}"),
                    retry_after: None,
                })?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TryError {
                    retry: false,
                    msg: format!("answer is not JSON ({e}): {}", snippet(&text)),
                    retry_after: None,
                })?;
                v.pointer("/choices/0/message/content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| TryError {
                        retry: false,
                        msg: format!(
                            "answer has no choices[0].message.content: {}",
                            snippet(&text)
                        ),
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
                Err(TryError {
                    retry: code == 408 || code == 429 || code >= 500,
                    msg: format!("HTTP {code}: {}", snippet(&text)),
                    retry_after,
                })
            }
            Err(ureq::Error::Transport(t)) => Err(TryError {
                retry: true,
                msg: format!("transport: {t}"),
                retry_after: None,
            }),
        }
    }

    /// Grade one item with retries.
    pub fn judge_one(&self, item: &JudgeInput, stop: &AtomicBool) -> JudgeOutcome {
        let body = self.body(item).to_string();
        let mut errors: Vec<String> = Vec::new();
        for attempt in 1..=self.cfg.max_attempts {
            match self.try_once(&body) {
                Ok(answer) => return JudgeOutcome::from_answer(self.mode, answer, attempt),
                Err(e) => {
                    errors.push(format!("try {attempt}: {}", e.msg));
                    if !e.retry || attempt == self.cfg.max_attempts || stop.load(Ordering::SeqCst) {
                        return JudgeOutcome::failed(errors.join("; "), attempt);
                    }
                    let exp = self
                        .cfg
                        .backoff_ms
                        .saturating_mul(1u64 << (attempt - 1).min(20))
                        .min(self.cfg.max_backoff_ms);
                    let jitter: f64 = rand::rng().random_range(0.5..1.0);
                    let mut wait = Duration::from_secs_f64(exp as f64 * jitter / 1000.0);
                    if let Some(ra) = e.retry_after {
                        wait = wait.max(ra.min(Duration::from_millis(self.cfg.max_backoff_ms)));
                    }
                    std::thread::sleep(wait);
                }
            }
        }
        JudgeOutcome::failed(errors.join("; "), self.cfg.max_attempts)
    }
}

fn snippet(s: &str) -> String {
    let t: String = s.chars().take(200).collect();
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Judge for HttpJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn mode(&self) -> JudgeMode {
        self.mode
    }

    fn judge_all(
        &self,
        items: &[JudgeInput],
        stop: &AtomicBool,
        on_done: &mut dyn FnMut(usize, JudgeOutcome) -> Result<()>,
    ) -> Result<()> {
        let next = AtomicUsize::new(0);
        let workers = self.cfg.concurrency.min(items.len()).max(1);
        // Set when on_done fails, so workers stop taking items.
        let abort = AtomicBool::new(false);
        std::thread::scope(|s| -> Result<()> {
            let (tx, rx) = mpsc::channel::<(usize, JudgeOutcome)>();
            for _ in 0..workers {
                let tx = tx.clone();
                let (next, abort) = (&next, &abort);
                s.spawn(move || loop {
                    if stop.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= items.len() {
                        break;
                    }
                    let out = self.judge_one(&items[i], stop);
                    if tx.send((i, out)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (i, out) in rx {
                if let Err(e) = on_done(i, out) {
                    abort.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
            Ok(())
        })
    }
}
