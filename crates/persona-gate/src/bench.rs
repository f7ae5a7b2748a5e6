//! `pgate bench`: prefill and decode throughput of the engine at several batch sizes.
//!
//! Decode is timed over `new_tokens` steps with end-of-sequence ignored, so every batch row runs the
//! same number of steps; aggregate decode tok/s = batch * steps / decode time.

use std::sync::Arc;

use serde::Serialize;

use crate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use crate::intervene::CompiledPlan;
use crate::model::Model;
use crate::{Error, Result};

/// The prompt the CPU anchor (`llama_cpp_bench.py`) uses, so both engines see the same tokens.
pub const DEFAULT_PROMPT: &str = "Write a detailed explanation of how a compiler turns source code into machine code, covering lexing, parsing, and code generation.";

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub batches: Vec<usize>,
    pub new_tokens: usize,
    /// Prompt length in tokens; `None` uses the chat-rendered default prompt as is.
    pub prompt_tokens: Option<usize>,
    pub reps: usize,
    pub plan: Option<Arc<CompiledPlan>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub decode_ms_per_step: f64,
}

pub fn run(model: &Model, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    if cfg.batches.is_empty() || cfg.batches.contains(&0) {
        return Err(Error::InvalidValue("batch sizes must be >= 1".into()));
    }
    let mut prompt = encode_chat(model, &ChatPrompt::new(DEFAULT_PROMPT))?;
    if let Some(n) = cfg.prompt_tokens {
        if n == 0 {
            return Err(Error::InvalidValue("prompt tokens must be >= 1".into()));
        }
        let base = prompt.clone();
        while prompt.len() < n {
            prompt.extend_from_slice(&base);
        }
        prompt.truncate(n);
    }
    let mut rows = Vec::new();
    for &b in &cfg.batches {
        let reqs: Vec<GenRequest> = (0..b)
            .map(|_| GenRequest {
                prompt: prompt.clone(),
                max_new_tokens: cfg.new_tokens,
                sampling: Sampling::greedy(),
                stop: Vec::new(),
                plan: cfg.plan.clone(),
            })
            .collect();
        // One warm-up (allocations, page faults on mmapped weights), then the best of `reps`.
        let mut best: Option<BenchRow> = None;
        for rep in 0..cfg.reps.max(1) + 1 {
            let mut gen = Generator::new(&model.decoder, b);
            gen.run(&reqs, None, |_, _| Ok(()))?;
            if rep == 0 {
                continue;
            }
            let s = &gen.stats;
            let row = BenchRow {
                batch: b,
                prompt_tokens: prompt.len(),
                new_tokens: cfg.new_tokens,
                prefill_tok_s: s.prefill_tokens as f64 / s.prefill_secs.max(1e-9),
                decode_tok_s: s.decode_tokens as f64 / s.decode_secs.max(1e-9),
                decode_ms_per_step: 1e3 * s.decode_secs / s.decode_steps.max(1) as f64,
            };
            if best
                .as_ref()
                .is_none_or(|x| row.decode_tok_s > x.decode_tok_s)
            {
                best = Some(row);
            }
        }
        rows.extend(best);
    }
    Ok(rows)
}
