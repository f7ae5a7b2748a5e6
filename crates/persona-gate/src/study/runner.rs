//! Generating a study's missing results.
//!
//! The pending items (work items without a stored result, in this run's shard) are generated in
//! *waves* of a few batches: each wave is one [`Generator::run`], where every sequence carries its
//! own condition's plan and system prompt, so conditions share batches and the batch refills as
//! sequences finish. Each result is labelled and committed in the generator's completion callback,
//! the moment its sequence finishes. Between waves the `stop` flag is checked: a first Ctrl-C lets
//! the current wave finish and be written, then the run returns cleanly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::plan::{in_shard, Study, WorkItem};
use super::store::{now_ms, NewResult, Store, GENERATION_LABELER};
use crate::eval::judge::rule_leakage;
use crate::eval::Label;
use crate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use crate::model::Model;
use crate::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Generate at most this many items in this run.
    pub limit: Option<usize>,
    /// `(index, count)`: only items whose hash falls in this shard.
    pub shard: Option<(u64, u64)>,
    /// Items per wave (default 4 batches).
    pub wave: Option<usize>,
    /// The study file, recorded with the study.
    pub source_path: Option<std::path::PathBuf>,
    /// Endpoint studies: requests in flight (default: the endpoint's `concurrency`).
    pub concurrency: Option<usize>,
}

/// What happened in a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunSummary {
    /// Work items of the study.
    pub total: usize,
    /// Already stored before this run.
    pub already: usize,
    /// Left to other shards.
    pub other_shards: usize,
    /// Pending items this run set out to generate (after shard and limit).
    pub planned: usize,
    /// Results written by this run.
    pub written: usize,
    /// Stopped by the stop flag before finishing.
    pub interrupted: bool,
    pub secs: f64,
    pub decode_tokens: usize,
    /// Time inside the engine's decode steps (forward + sampling), seconds.
    pub decode_secs: f64,
    pub prefill_tokens: usize,
    /// Time inside prefill forwards, seconds.
    pub prefill_secs: f64,
    /// Endpoint studies: requests, failures, token usage (see [`super::remote`]).
    #[serde(default)]
    pub endpoint: Option<super::remote::EndpointRunStats>,
}

impl RunSummary {
    /// Share of the wall time spent outside the engine's forwards: tokenizing, labelling,
    /// scoring, writing rows, cache bookkeeping. What a study adds on top of `pgate bench`.
    pub fn overhead_fraction(&self) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        (1.0 - (self.decode_secs + self.prefill_secs) / self.secs).max(0.0)
    }
}

/// Events for progress displays.
#[derive(Debug, Clone)]
pub enum RunEvent<'a> {
    /// Before generating: how much there is to do.
    Planned {
        planned: usize,
        summary: &'a RunSummary,
    },
    /// A result was written.
    Written { condition: &'a str, label: Label },
}

/// The items of `study` still to run in this invocation (not stored, in this shard, within
/// `--limit`), with the summary's counts filled in. Local and endpoint runs share it, so both
/// resume and shard identically.
pub(crate) fn plan_pending(
    study: &Study,
    store: &Store,
    opts: &RunOptions,
) -> Result<(Vec<WorkItem>, RunSummary)> {
    let done = store.done_keys(&study.hash)?;
    let items = study.items();
    let mut summary = RunSummary {
        total: items.len(),
        ..Default::default()
    };
    let mut pending: Vec<WorkItem> = Vec::new();
    for it in items {
        let set = &study.prompt_sets[it.set];
        let key = (
            study.conditions[it.condition].hash.clone(),
            set.hash.clone(),
            set.items[it.prompt].id.clone(),
            it.sample as i64,
        );
        if done.contains(&key) {
            summary.already += 1;
        } else if opts
            .shard
            .is_some_and(|(i, k)| !in_shard(&it.item_hash, i, k))
        {
            summary.other_shards += 1;
        } else {
            pending.push(it);
        }
    }
    if let Some(n) = opts.limit {
        pending.truncate(n);
    }
    summary.planned = pending.len();
    Ok((pending, summary))
}

/// Generate and store the missing results of `study` with `model` (loaded from the study's model
/// spec by the caller). Registers the study in the store first.
pub fn run_study(
    study: &Study,
    store: &mut Store,
    model: &Model,
    opts: &RunOptions,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(RunEvent<'_>),
) -> Result<RunSummary> {
    let t0 = std::time::Instant::now();
    store.register(study, opts.source_path.as_deref())?;
    let (pending, mut summary) = plan_pending(study, store, opts)?;
    on_event(RunEvent::Planned {
        planned: pending.len(),
        summary: &summary,
    });
    if pending.is_empty() {
        summary.secs = t0.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let plans = study.compile_plans(model)?;
    let g = &study.file.generation;
    let stop_ids = model.tokenizer.stop_token_ids().to_vec();
    let wave = opts.wave.unwrap_or(g.batch_size * 4).max(1);
    // Prompt tokens per (condition, set, prompt): samples share them.
    let mut encoded: HashMap<(usize, usize, usize), Arc<Vec<u32>>> = HashMap::new();
    for chunk in pending.chunks(wave) {
        if stop.load(Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let mut reqs = Vec::with_capacity(chunk.len());
        for it in chunk {
            let c = &study.conditions[it.condition];
            let p = &study.prompt_sets[it.set].items[it.prompt];
            let toks = match encoded.get(&(it.condition, it.set, it.prompt)) {
                Some(t) => t.clone(),
                None => {
                    let t = Arc::new(encode_chat(
                        model,
                        &ChatPrompt {
                            id: Some(p.id.clone()),
                            system: c.system.clone(),
                            user: p.text.clone(),
                        },
                    )?);
                    encoded.insert((it.condition, it.set, it.prompt), t.clone());
                    t
                }
            };
            reqs.push(GenRequest {
                prompt: toks.to_vec(),
                max_new_tokens: g.max_new_tokens,
                sampling: Sampling {
                    temperature: g.temperature,
                    top_p: g.top_p,
                    seed: it.seed,
                },
                stop: stop_ids.clone(),
                plan: plans[it.condition].clone(),
            });
        }
        let started = now_ms();
        let mut gen = Generator::new(&model.decoder, g.batch_size);
        let store_ref: &Store = store;
        let written = &mut summary.written;
        gen.run(&reqs, None, |i, o| {
            let it = &chunk[i];
            let c = &study.conditions[it.condition];
            let set = &study.prompt_sets[it.set];
            let p = &set.items[it.prompt];
            let text = model.tokenizer.decode(&o.tokens, true)?;
            let rule = crate::label::rules::generation_label(&text, study.file.english);
            let leak = rule_leakage(&p.text, &text, rule.label);
            let finish = match o.finish {
                crate::generate::Finish::Stop => "stop",
                crate::generate::Finish::Length => "length",
            };
            let inserted = store_ref.insert_result(&NewResult {
                condition_hash: &c.hash,
                prompt_set: &set.hash,
                prompt_id: &p.id,
                sample: it.sample,
                item_hash: &it.item_hash,
                seed: it.seed,
                output: &text,
                n_tokens: o.tokens.len(),
                prompt_tokens: o.prompt_tokens,
                finish,
                label: rule.label.name(),
                labeler: GENERATION_LABELER,
                rule_json: serde_json::to_string(&rule).map_err(Error::from)?,
                leakage: leak.score,
                leakage_json: serde_json::to_string(&leak).map_err(Error::from)?,
                started_at: started,
                finished_at: now_ms(),
            })?;
            if inserted {
                *written += 1;
            }
            on_event(RunEvent::Written {
                condition: &c.name,
                label: rule.label,
            });
            Ok(())
        })?;
        summary.decode_tokens += gen.stats.decode_tokens;
        summary.decode_secs += gen.stats.decode_secs;
        summary.prefill_tokens += gen.stats.prefill_tokens;
        summary.prefill_secs += gen.stats.prefill_secs;
    }
    summary.secs = t0.elapsed().as_secs_f64();
    Ok(summary)
}
