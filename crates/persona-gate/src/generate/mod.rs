//! Batched generation with a KV cache, per-sequence intervention plans and sampling.
//!
//! Everything runs on one stepping [`Engine`] (`engine/`): sequences join and leave at any step,
//! prefill groups feed in chunks, decode steps replay CUDA graphs. [`Generator`] is its batch
//! front: a list of requests in, outputs in request order out.

pub mod capture;
pub mod chat;
pub mod engine;
mod fixed_step;
pub mod prefill;
pub mod sampling;

use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use capture::capture_last;
pub use chat::{encode_chat, generate_chat, ChatPrompt, Completion, GenSettings};
pub use engine::{Engine, EngineConfig, EngineEvent, LastToken, SeqId, SeqSpec};
pub use fixed_step::graphs_enabled;
pub use prefill::{Chunk, ChunkedPrefill};
pub use sampling::{Sampler, Sampling};

use fixed_step::FixedStepper;

use crate::intervene::hook::reborrow;
use crate::intervene::{CompiledPlan, ResidualHook, RowCtx};
use crate::model::Decoder;
use crate::{Error, Result};

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end the sequence (included in the output).
    pub stop: Vec<u32>,
    pub plan: Option<Arc<CompiledPlan>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenOutput {
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
}

/// Counters for benchmarks.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prefill_tokens: usize,
    pub prefill_secs: f64,
    pub decode_tokens: usize,
    pub decode_secs: f64,
    pub decode_steps: usize,
    /// Host time spent issuing decode forwards (on a GPU: launching kernels, before the step's one
    /// wait for the next tokens). Close to `decode_secs` means the host, not the device, sets the pace.
    pub decode_issue_secs: f64,
    /// Decode steps replayed from a recorded CUDA graph, and graphs recorded.
    pub graph_replays: usize,
    pub graph_captures: usize,
    /// Fixed-slot steppers made (each new batch shape or cache storage needs one, and on a GPU
    /// records its graphs anew).
    pub steppers: usize,
    /// Sequences placed into the rows of ended ones, keeping the stepper.
    pub slots_reused: usize,
    /// Host time of the decode steps that made a stepper or recorded a CUDA graph (what a join
    /// that changes the batch shape costs the sequences already running).
    pub graph_record_secs: f64,
    /// Host time of joining prefilled rows to a running lane (placed into holes, or merged):
    /// copies of every layer's K/V that the running sequences wait behind.
    pub join_secs: f64,
}

impl GenStats {
    /// Add another run's counters.
    pub fn add(&mut self, o: &GenStats) {
        self.prefill_tokens += o.prefill_tokens;
        self.prefill_secs += o.prefill_secs;
        self.decode_tokens += o.decode_tokens;
        self.decode_secs += o.decode_secs;
        self.decode_steps += o.decode_steps;
        self.decode_issue_secs += o.decode_issue_secs;
        self.graph_replays += o.graph_replays;
        self.graph_captures += o.graph_captures;
        self.steppers += o.steppers;
        self.slots_reused += o.slots_reused;
        self.graph_record_secs += o.graph_record_secs;
        self.join_secs += o.join_secs;
    }

    /// Count a retired stepper's graph replays and recordings.
    fn absorb(&mut self, stepper: Option<FixedStepper>) {
        if let Some(s) = stepper {
            self.graph_replays += s.replays;
            self.graph_captures += s.captures;
        }
    }
}

/// When decode steps take the fixed-slot path ([`Decoder::forward_fixed_slot`]), the one CUDA
/// graphs record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FixedSlot {
    /// On CUDA, for greedy batches without extra hooks, unless `PGATE_CUDA_GRAPHS=0`.
    #[default]
    Auto,
    /// Whenever possible, on any device (tests compare it with the ordinary path on the CPU).
    Always,
    Never,
}

/// A fixed batch needs at least this many more steps before recording graphs pays off.
const MIN_FIXED_STEPS: usize = 8;

/// Drives a [`Decoder`] over a queue of requests.
pub struct Generator<'m> {
    model: &'m Decoder,
    batch_size: usize,
    pub stats: GenStats,
    pub fixed_slot: FixedSlot,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Decoder, batch_size: usize) -> Self {
        Self {
            model,
            batch_size: batch_size.max(1),
            stats: GenStats::default(),
            fixed_slot: FixedSlot::Auto,
        }
    }

    /// Generate every request; `on_done(index, output)` is called as each finishes (results can be
    /// stored before the whole run ends). Returns outputs in request order. Runs on the stepping
    /// [`Engine`] with whole-prompt prefill ([`EngineConfig::batch`]); `extra_hook` sees every
    /// forward, with `RowCtx::seq` = the request's index.
    pub fn run(
        &mut self,
        reqs: &[GenRequest],
        mut extra_hook: Option<&mut dyn ResidualHook>,
        mut on_done: impl FnMut(usize, &GenOutput) -> Result<()>,
    ) -> Result<Vec<GenOutput>> {
        self.validate(reqs)?;
        let mut cfg = EngineConfig::batch(self.batch_size);
        cfg.fixed_slot = self.fixed_slot;
        let mut engine = Engine::new(self.model, cfg);
        for r in reqs {
            engine.submit(SeqSpec {
                plan: r.plan.clone(),
                sampling: r.sampling,
                stop: r.stop.clone(),
                ..SeqSpec::new(r.prompt.clone(), r.max_new_tokens)
            });
        }
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
        let mut results: Vec<Option<GenOutput>> = vec![None; reqs.len()];
        while !engine.is_idle() {
            for ev in engine.step(reborrow(&mut extra_hook)) {
                match ev {
                    EngineEvent::Token { id, token } => tokens[id].push(token),
                    EngineEvent::Finished { id, finish, .. } => {
                        let o = GenOutput {
                            tokens: std::mem::take(&mut tokens[id]),
                            finish,
                            prompt_tokens: reqs[id].prompt.len(),
                        };
                        on_done(id, &o)?;
                        results[id] = Some(o);
                    }
                    EngineEvent::Failed { id, error } => {
                        return Err(Error::Generation(format!("request {id}: {error}")))
                    }
                    EngineEvent::Prefilled { .. } | EngineEvent::TimedOut { .. } => {}
                }
            }
        }
        self.stats.add(engine.finish_stats());
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| Error::InvalidValue(format!("request {i} produced no output")))
            })
            .collect()
    }

    /// Every prompt non-empty and inside the vocabulary, every sampling setting valid: checked
    /// before any work, so a bad request costs nothing.
    fn validate(&self, reqs: &[GenRequest]) -> Result<()> {
        for (i, r) in reqs.iter().enumerate() {
            if r.prompt.is_empty() {
                return Err(Error::Empty(format!("prompt {i} has no tokens")));
            }
            r.sampling.validate()?;
            if let Some(&bad) = r
                .prompt
                .iter()
                .find(|&&t| t as usize >= self.model.cfg.vocab_size)
            {
                return Err(Error::InvalidValue(format!(
                    "prompt {i} has token id {bad} outside the vocabulary ({})",
                    self.model.cfg.vocab_size
                )));
            }
        }
        Ok(())
    }
}

/// One left-padded batch `[n, max_len]` of token ids with a [`RowCtx`] per row (`seq` = row index):
/// padding repeats each prompt's first token, and the attention mask hides it. Every batched
/// prefill (generation, capture, scoring, serving) starts here.
pub fn left_padded<P: AsRef<[u32]>>(
    prompts: &[P],
    dev: &candle_core::Device,
) -> Result<(Tensor, Vec<RowCtx>)> {
    let lmax = prompts.iter().map(|p| p.as_ref().len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * lmax);
    let mut rows = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_ref();
        let Some(&first) = p.first() else {
            return Err(Error::Empty(format!("prompt {i} has no tokens")));
        };
        let pad = lmax - p.len();
        ids.extend(std::iter::repeat_n(first, pad));
        ids.extend_from_slice(p);
        rows.push(RowCtx {
            seq: i,
            chunk_pad: pad,
            start_pos: 0,
            prompt_len: p.len(),
        });
    }
    if prompts.is_empty() {
        return Err(Error::Empty("no prompts to batch".into()));
    }
    Ok((Tensor::from_vec(ids, (prompts.len(), lmax), dev)?, rows))
}
