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

use super::plan::Study;
use super::store::{now_ms, NewResult, Store, GENERATION_LABELER};
use super::work::plan_pending;
pub use super::work::{RunEvent, RunOptions, RunSummary};
use crate::eval::judge::rule_leakage;
use crate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use crate::model::Model;
use crate::{Error, Result};

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
