//! A judge behind any OpenAI-compatible `POST {base_url}/chat/completions` endpoint (OpenAI,
//! vLLM, llama.cpp server, TGI, Ollama, ...).
//!
//! The client itself (timeouts, retries with exponential backoff and jitter on 408/429/5xx,
//! timeouts and connection errors; no retry on other 4xx) is [`crate::endpoint::Client`], shared
//! with endpoint studies. Here: at most `concurrency` rows are graded at once (scoped worker
//! threads), and a row whose tries all failed gets a failure outcome (error text, attempts), never
//! an error for the whole run.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;

use super::judge::{
    guard_task, strongreject_prompt, GuardFormat, Judge, JudgeConfig, JudgeInput, JudgeMode,
    JudgeOutcome, STRONGREJECT_SYSTEM,
};
use crate::endpoint::{read_key, Client, RetryPolicy};
use crate::Result;

pub struct HttpJudge {
    name: String,
    mode: JudgeMode,
    cfg: JudgeConfig,
    client: Client,
}

impl HttpJudge {
    /// A client for `cfg` (kind = "http"); reads the API key from `api_key_env` now, so a missing
    /// variable is reported before any request.
    pub fn new(cfg: &JudgeConfig) -> Result<Self> {
        cfg.check()?;
        let name = cfg.display_name();
        let api_key = read_key(cfg.api_key_env.as_deref(), &format!("judge '{name}'"))?;
        let client = Client::new(
            cfg.base_url.as_deref().unwrap_or_default(),
            api_key,
            RetryPolicy {
                timeout: Duration::from_secs_f64(cfg.timeout_s),
                max_attempts: cfg.max_attempts,
                backoff_ms: cfg.backoff_ms,
                max_backoff_ms: cfg.max_backoff_ms,
            },
            None,
        );
        Ok(Self {
            mode: cfg.effective_mode().unwrap_or(JudgeMode::StrongReject),
            name,
            cfg: cfg.clone(),
            client,
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

    /// Grade one item with retries.
    pub fn judge_one(&self, item: &JudgeInput, stop: &AtomicBool) -> JudgeOutcome {
        let body = self.body(item);
        let out = self.client.chat(&body, 0, stop, &mut |_| {});
        match out.result {
            Ok(c) => JudgeOutcome::from_answer(self.mode, c.content, out.attempts),
            Err(errors) => JudgeOutcome::failed(errors, out.attempts),
        }
    }
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
