//! Generating a study's missing results through an OpenAI-compatible endpoint.
//!
//! Same work items, keys and store as a local run ([`super::runner`]): each pending item becomes
//! one `POST /chat/completions` (the condition's system prompt, the prompt as the user message,
//! the study's `max_new_tokens`, `temperature`, `top_p` and the item's seed), sent by
//! `concurrency` worker threads through [`crate::endpoint::Client`] (rate limits, timeouts,
//! retries with backoff and jitter). The main thread labels every answer with the same rules as a
//! local run and commits it at once with its call record (`endpoint_results`); every failed try is
//! committed to `endpoint_failures` as it happens. An item whose tries all fail is left missing
//! (the next run tries it again), so a killed or interrupted run resumes without duplicating rows.
//!
//! Steering conditions never get here: [`super::file::StudyFile`] rejects them for endpoint
//! studies, because a server does not expose the residual stream.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde_json::{json, Value};

use super::plan::{Study, WorkItem};
use super::store::{
    now_ms, EndpointCall, EndpointFailureRow, NewResult, Store, GENERATION_LABELER,
};
pub use super::work::EndpointRunStats;
use super::work::{plan_pending, RunEvent, RunOptions, RunSummary};
use crate::endpoint::{Client, Completion, EndpointConfig, Failure};
use crate::eval::judge::rule_leakage;
use crate::eval::Label;
use crate::{Error, Result};

/// White-box fields of a local study's record that an endpoint study cannot have.
pub const NOT_APPLICABLE: &[&str] = &[
    "model files and their sha256",
    "architecture, layers, width, parameter count",
    "dtype / quantization",
    "tokenizer and chat-template hashes",
    "directions and interventions (add, ablate, cap)",
    "residual-stream measurements",
];

/// The target record of an endpoint study (stored in `study_targets`, copied into receipts).
pub fn target_json(ep: &EndpointConfig) -> Value {
    json!({
        "kind": "endpoint",
        "api": "openai-chat-completions",
        "base_url": ep.normalized_base(),
        "model": ep.model,
        "api_key_env": ep.api_key_env,
        "white_box": false,
        "not_applicable": NOT_APPLICABLE,
        "conditions": "black-box only: system prompts (persona modes) under the study's sampling settings",
    })
}

/// The chat-completions body of one work item.
pub fn request_body(study: &Study, it: &WorkItem) -> Value {
    let ep = study.endpoint().expect("endpoint study");
    let c = &study.conditions[it.condition];
    let p = &study.prompt_sets[it.set].items[it.prompt];
    let g = &study.file.generation;
    let mut messages = Vec::new();
    if let Some(s) = &c.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": p.text}));
    json!({
        "model": ep.model,
        "messages": messages,
        "max_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "seed": it.seed,
        "stream": false,
    })
}

/// What a worker thread reports to the thread that owns the store.
enum Msg {
    /// A try of item `i` failed (retried or not).
    Failure(usize, Failure),
    /// Item `i` was answered: the completion, tries, latency in ms, start time in ms.
    Done(usize, Completion, u32, u64, i64),
    /// An item's tries all failed (or the run was stopped while it waited).
    GaveUp,
}

/// Generate and store the missing results of an endpoint study. Registers the study and records
/// its target first.
pub fn run_endpoint_study(
    study: &Study,
    store: &mut Store,
    opts: &RunOptions,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<RunSummary> {
    let t0 = std::time::Instant::now();
    let ep = study.endpoint().ok_or_else(|| {
        Error::InvalidValue(format!(
            "study {} targets local weights ([model] spec), not an endpoint",
            study.name
        ))
    })?;
    let client = Client::for_endpoint(ep)?;
    store.register(study, opts.source_path.as_deref())?;
    let target = target_json(ep);
    let server_models = client.list_models().ok();
    store.set_target(&study.hash, &target, &[], server_models.as_deref())?;
    let concurrency = opts.concurrency.unwrap_or(ep.concurrency).max(1);
    let stats = EndpointRunStats {
        base_url: ep.normalized_base(),
        model: ep.model.clone(),
        concurrency,
        server_models,
        ..Default::default()
    };

    let (pending, summary) = plan_pending(study, store, opts)?;
    on_event(RunEvent::Planned {
        planned: pending.len(),
        summary: &summary,
    });
    let mut rec = Recorder {
        study,
        store,
        pending: &pending,
        stop,
        stats,
        summary,
        reported: BTreeSet::new(),
    };
    if !pending.is_empty() {
        let bodies = request_bodies(study, &pending);
        let res = send_all(&client, &bodies, concurrency, stop, &mut |msg| {
            rec.handle(msg, on_event)
        });
        // Record the names the server reported even when the run failed half-way.
        let reported: Vec<String> = rec.reported.iter().cloned().collect();
        rec.store
            .set_target(&study.hash, &target, &reported, None)?;
        res?;
        rec.stats.reported_models = reported;
        rec.stats.cost = ep.cost(rec.stats.prompt_tokens, rec.stats.completion_tokens);
        rec.summary.interrupted = stop.load(Ordering::SeqCst)
            && rec.summary.written + rec.stats.gave_up < rec.summary.planned;
    }
    let mut summary = rec.summary;
    summary.secs = t0.elapsed().as_secs_f64();
    summary.endpoint = Some(rec.stats);
    Ok(summary)
}

/// The request body of every pending item, with its token estimate for the rate limiter (about
/// four characters a token for the prompt, plus the answer's budget).
fn request_bodies(study: &Study, pending: &[WorkItem]) -> Vec<(Value, u64)> {
    let g = &study.file.generation;
    pending
        .iter()
        .map(|it| {
            let c = &study.conditions[it.condition];
            let p = &study.prompt_sets[it.set].items[it.prompt];
            let chars = c.system.as_deref().map(str::len).unwrap_or(0) + p.text.len();
            (
                request_body(study, it),
                (chars / 4 + 8 + g.max_new_tokens) as u64,
            )
        })
        .collect()
}

/// Send every body from `concurrency` worker threads; `handle` sees each outcome on this thread
/// (the one that owns the store). An error from `handle` stops the workers and is returned.
fn send_all(
    client: &Client,
    bodies: &[(Value, u64)],
    concurrency: usize,
    stop: &AtomicBool,
    handle: &mut dyn FnMut(Msg) -> Result<()>,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let workers = concurrency.min(bodies.len());
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = mpsc::channel::<Msg>();
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, abort) = (&next, &abort);
            s.spawn(move || loop {
                if stop.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= bodies.len() {
                    break;
                }
                let started = now_ms();
                let (body, est) = &bodies[i];
                let out = client.chat(body, *est, stop, &mut |f| {
                    let _ = tx.send(Msg::Failure(i, f.clone()));
                });
                let msg = match out.result {
                    Ok(c) => Msg::Done(i, c, out.attempts, out.latency_ms, started),
                    Err(_) => Msg::GaveUp,
                };
                if tx.send(msg).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        for msg in rx {
            if let Err(e) = handle(msg) {
                abort.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    })
}

/// Commits what the workers report: failed tries to `endpoint_failures`, answers (labelled like a
/// local run's) to the results with their call record, and keeps the run's counts.
struct Recorder<'a> {
    study: &'a Study,
    store: &'a mut Store,
    pending: &'a [WorkItem],
    stop: &'a AtomicBool,
    stats: EndpointRunStats,
    summary: RunSummary,
    /// Distinct `model` names in the answers.
    reported: BTreeSet<String>,
}

impl Recorder<'_> {
    fn handle(&mut self, msg: Msg, on_event: &mut dyn FnMut(RunEvent<'_>)) -> Result<()> {
        match msg {
            Msg::Failure(i, f) => self.failure(i, &f),
            Msg::GaveUp => {
                if !self.stop.load(Ordering::SeqCst) {
                    self.stats.gave_up += 1;
                }
                Ok(())
            }
            Msg::Done(i, c, attempts, latency_ms, started) => {
                let label = self.answer(i, &c, attempts, latency_ms, started)?;
                let it = &self.pending[i];
                on_event(RunEvent::Written {
                    condition: &self.study.conditions[it.condition].name,
                    label,
                });
                Ok(())
            }
        }
    }

    fn failure(&mut self, i: usize, f: &Failure) -> Result<()> {
        self.stats.requests += 1;
        self.stats.failed_tries += 1;
        let it = &self.pending[i];
        let set = &self.study.prompt_sets[it.set];
        self.store.insert_endpoint_failure(&EndpointFailureRow {
            study_hash: self.study.hash.clone(),
            condition_hash: self.study.conditions[it.condition].hash.clone(),
            prompt_set: set.hash.clone(),
            prompt_id: set.items[it.prompt].id.clone(),
            sample: it.sample as i64,
            attempt: f.attempt,
            kind: f.kind.name().to_string(),
            status: f.status,
            error: f.message.clone(),
            will_retry: f.will_retry,
            elapsed_ms: f.elapsed_ms,
            at: now_ms(),
        })
    }

    /// Label and store one answer; returns its label.
    fn answer(
        &mut self,
        i: usize,
        c: &Completion,
        attempts: u32,
        latency_ms: u64,
        started: i64,
    ) -> Result<Label> {
        self.stats.requests += 1;
        let study = self.study;
        let it = &self.pending[i];
        let cond = &study.conditions[it.condition];
        let set = &study.prompt_sets[it.set];
        let p = &set.items[it.prompt];
        let text = c.content.as_str();
        let rule = crate::label::rules::generation_label(text, study.file.english);
        let leak = rule_leakage(&p.text, text, rule.label);
        let usage = c.prompt_tokens.is_some() && c.completion_tokens.is_some();
        let (pt, ct) = (
            c.prompt_tokens.unwrap_or(0),
            c.completion_tokens.unwrap_or(0),
        );
        if let Some(m) = &c.model {
            self.reported.insert(m.clone());
        }
        let inserted = self.store.insert_endpoint_result(
            &NewResult {
                condition_hash: &cond.hash,
                prompt_set: &set.hash,
                prompt_id: &p.id,
                sample: it.sample,
                item_hash: &it.item_hash,
                seed: it.seed,
                output: text,
                n_tokens: ct as usize,
                prompt_tokens: pt as usize,
                finish: c.finish_reason.as_deref().unwrap_or("unknown"),
                label: rule.label.name(),
                labeler: GENERATION_LABELER,
                rule_json: serde_json::to_string(&rule).map_err(Error::from)?,
                leakage: leak.score,
                leakage_json: serde_json::to_string(&leak).map_err(Error::from)?,
                started_at: started,
                finished_at: now_ms(),
            },
            &EndpointCall {
                base_url: &self.stats.base_url,
                model_requested: &self.stats.model,
                model_reported: c.model.as_deref(),
                response_id: c.id.as_deref(),
                attempts,
                latency_ms,
                usage_reported: usage,
            },
        )?;
        if inserted {
            self.summary.written += 1;
            self.stats.prompt_tokens += pt;
            self.stats.completion_tokens += ct;
            self.summary.decode_tokens += ct as usize;
            self.summary.prefill_tokens += pt as usize;
            if !usage {
                self.stats.without_usage += 1;
            }
        }
        Ok(rule.label)
    }
}
