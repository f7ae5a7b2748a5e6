//! Batched generation with a KV cache, per-sequence intervention plans and sampling.
//!
//! Requests wait in a queue. Free batch slots are filled by prefilling waiting prompts together
//! (left-padded) and merging their cache rows into the running batch; every step then decodes one
//! token for all running sequences; finished sequences leave the batch at once. So the batch refills
//! and shrinks as sequences finish, and a sequence's tokens do not depend on its neighbours (masks,
//! positions and RNG are all per sequence).

pub mod chat;
mod fixed_step;
pub mod prefill;
pub mod sampling;

use std::collections::VecDeque;
use std::sync::Arc;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

pub use chat::{encode_chat, generate_chat, ChatPrompt, Completion, GenSettings};
pub use fixed_step::graphs_enabled;
pub use prefill::{Chunk, ChunkedPrefill};
pub use sampling::{Sampler, Sampling};

use fixed_step::FixedStepper;

use crate::intervene::hook::reborrow;
use crate::intervene::{CompiledPlan, HookChain, PlanHook, ResidualHook, RowCtx};
use crate::model::{Decoder, KvCache, LogitsAt};
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
}

impl GenStats {
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

struct Running {
    req: usize,
    out: Vec<u32>,
    sampler: Sampler,
    next: u32,
}

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
    /// stored before the whole run ends). Returns outputs in request order.
    pub fn run(
        &mut self,
        reqs: &[GenRequest],
        mut extra_hook: Option<&mut dyn ResidualHook>,
        mut on_done: impl FnMut(usize, &GenOutput) -> Result<()>,
    ) -> Result<Vec<GenOutput>> {
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
        let plans: Vec<Option<Arc<CompiledPlan>>> = reqs.iter().map(|r| r.plan.clone()).collect();
        let mut results: Vec<Option<GenOutput>> = vec![None; reqs.len()];
        let mut queue: VecDeque<usize> = (0..reqs.len()).collect();
        let mut running: Vec<Running> = Vec::new();
        let mut cache = KvCache::new(self.model.n_layers());
        let dev = self.model.device().clone();
        let mut stepper: Option<FixedStepper> = None;
        let fixed_ok = match self.fixed_slot {
            FixedSlot::Never => false,
            FixedSlot::Always => self.model.supports_fixed_slot(),
            FixedSlot::Auto => {
                dev.is_cuda() && graphs_enabled() && self.model.supports_fixed_slot()
            }
        };

        let mut finish = |i: usize,
                          out: Vec<u32>,
                          fin: Finish,
                          results: &mut Vec<Option<GenOutput>>|
         -> Result<()> {
            let o = GenOutput {
                tokens: out,
                finish: fin,
                prompt_tokens: reqs[i].prompt.len(),
            };
            on_done(i, &o)?;
            results[i] = Some(o);
            Ok(())
        };

        while !queue.is_empty() || !running.is_empty() {
            // Refill: prefill waiting prompts into free slots.
            let free = self.batch_size - running.len();
            if free > 0 && !queue.is_empty() {
                let take: Vec<usize> = (0..free.min(queue.len()))
                    .filter_map(|_| queue.pop_front())
                    .collect();
                let zero: Vec<usize> = take
                    .iter()
                    .copied()
                    .filter(|&i| reqs[i].max_new_tokens == 0)
                    .collect();
                for i in zero {
                    finish(i, Vec::new(), Finish::Length, &mut results)?;
                }
                let take: Vec<usize> = take
                    .into_iter()
                    .filter(|&i| reqs[i].max_new_tokens > 0)
                    .collect();
                if !take.is_empty() {
                    let prompts: Vec<&[u32]> =
                        take.iter().map(|&i| reqs[i].prompt.as_slice()).collect();
                    let (tokens, mut rows) = left_padded(&prompts, &dev)?;
                    for (r, &i) in rows.iter_mut().zip(&take) {
                        r.seq = i;
                    }
                    let mut new_cache = KvCache::new(self.model.n_layers());
                    let t = std::time::Instant::now();
                    let logits = self.forward(
                        &tokens,
                        &rows,
                        &mut new_cache,
                        &plans,
                        reborrow(&mut extra_hook),
                    )?;
                    // Timed through the first tokens' pick: on a GPU the forward only enqueues work,
                    // and reading the picks is where it is waited for.
                    let picks = self.pick(&logits, &take, reqs, None)?;
                    self.stats.prefill_secs += t.elapsed().as_secs_f64();
                    self.stats.prefill_tokens +=
                        take.iter().map(|&i| reqs[i].prompt.len()).sum::<usize>();
                    let mut keep = Vec::new();
                    for (row, (&i, tok)) in take.iter().zip(picks).enumerate() {
                        let mut st = Running {
                            req: i,
                            out: vec![tok.0],
                            sampler: tok.1,
                            next: tok.0,
                        };
                        let r = &reqs[i];
                        if r.stop.contains(&tok.0) || r.max_new_tokens == 1 {
                            let fin = if r.stop.contains(&tok.0) {
                                Finish::Stop
                            } else {
                                Finish::Length
                            };
                            finish(i, std::mem::take(&mut st.out), fin, &mut results)?;
                        } else {
                            keep.push(row);
                            running.push(st);
                        }
                    }
                    if keep.len() != take.len() {
                        new_cache.select(&keep)?;
                    }
                    if !keep.is_empty() {
                        cache.merge(new_cache)?;
                    }
                }
            }
            if running.is_empty() {
                continue;
            }
            // One decode step for every running sequence.
            let b = running.len();
            let ids: Vec<u32> = running.iter().map(|r| r.next).collect();
            let rows: Vec<RowCtx> = running
                .iter()
                .enumerate()
                .map(|(bi, r)| RowCtx {
                    seq: r.req,
                    chunk_pad: 0,
                    start_pos: cache.next_position(bi),
                    prompt_len: reqs[r.req].prompt.len(),
                })
                .collect();
            let more = running
                .iter()
                .map(|r| reqs[r.req].max_new_tokens.saturating_sub(r.out.len()))
                .max()
                .unwrap_or(0);
            let fixed = fixed_ok
                && extra_hook.is_none()
                && running.iter().all(|r| reqs[r.req].sampling.is_greedy())
                && (stepper.as_ref().is_some_and(|s| s.matches(&cache))
                    || more >= MIN_FIXED_STEPS
                    || self.fixed_slot == FixedSlot::Always);
            let t = std::time::Instant::now();
            let picks = if fixed {
                if !stepper.as_ref().is_some_and(|s| s.matches(&cache)) {
                    self.stats.absorb(stepper.take());
                    stepper = Some(FixedStepper::new(self.model, &mut cache, &ids, more)?);
                }
                let s = stepper.as_mut().expect("set above");
                let picks = s.step(self.model, &mut cache, &rows, &plans)?;
                self.stats.decode_issue_secs += t.elapsed().as_secs_f64();
                picks
            } else {
                let tokens = Tensor::from_vec(ids, (b, 1), &dev)?;
                let logits = self.forward(
                    &tokens,
                    &rows,
                    &mut cache,
                    &plans,
                    reborrow(&mut extra_hook),
                )?;
                self.stats.decode_issue_secs += t.elapsed().as_secs_f64();
                let reqs_idx: Vec<usize> = running.iter().map(|r| r.req).collect();
                let samplers: Vec<&mut Sampler> =
                    running.iter_mut().map(|r| &mut r.sampler).collect();
                pick_with(&logits, &reqs_idx, reqs, samplers)?
            };
            self.stats.decode_secs += t.elapsed().as_secs_f64();
            self.stats.decode_tokens += b;
            self.stats.decode_steps += 1;
            let mut keep = Vec::with_capacity(b);
            let mut still = Vec::with_capacity(b);
            for (bi, (mut st, tok)) in running.drain(..).zip(picks).enumerate() {
                st.out.push(tok);
                st.next = tok;
                let r = &reqs[st.req];
                let stop = r.stop.contains(&tok);
                if stop || st.out.len() >= r.max_new_tokens {
                    finish(
                        st.req,
                        std::mem::take(&mut st.out),
                        if stop { Finish::Stop } else { Finish::Length },
                        &mut results,
                    )?;
                } else {
                    keep.push(bi);
                    still.push(st);
                }
            }
            running = still;
            if keep.len() != b {
                cache.select(&keep)?;
            }
        }
        self.stats.absorb(stepper.take());
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| Error::InvalidValue(format!("request {i} produced no output")))
            })
            .collect()
    }

    fn forward(
        &self,
        tokens: &Tensor,
        rows: &[RowCtx],
        cache: &mut KvCache,
        plans: &[Option<Arc<CompiledPlan>>],
        extra: Option<&mut dyn ResidualHook>,
    ) -> Result<Tensor> {
        let mut plan_hook = PlanHook::new(plans, self.model.n_layers());
        let logits = match (plan_hook.is_active(), extra) {
            (false, None) => self
                .model
                .forward(tokens, rows, cache, None, LogitsAt::Last)?,
            (true, None) => {
                self.model
                    .forward(tokens, rows, cache, Some(&mut plan_hook), LogitsAt::Last)?
            }
            (false, Some(e)) => self
                .model
                .forward(tokens, rows, cache, Some(e), LogitsAt::Last)?,
            (true, Some(e)) => {
                let mut chain = HookChain(vec![&mut plan_hook, e]);
                self.model
                    .forward(tokens, rows, cache, Some(&mut chain), LogitsAt::Last)?
            }
        };
        logits.ok_or_else(|| Error::InvalidValue("model returned no logits".into()))
    }

    /// First tokens after a prefill: fresh samplers.
    fn pick(
        &self,
        logits: &Tensor,
        idx: &[usize],
        reqs: &[GenRequest],
        _: Option<()>,
    ) -> Result<Vec<(u32, Sampler)>> {
        let mut samplers: Vec<Sampler> = idx
            .iter()
            .map(|&i| Sampler::new(reqs[i].sampling))
            .collect();
        let toks = pick_with(logits, idx, reqs, samplers.iter_mut().collect())?;
        Ok(toks.into_iter().zip(samplers).collect())
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

/// Choose the next token of each row. All-greedy batches take the argmax on the device so only
/// `batch` ids cross to the host.
fn pick_with(
    logits: &Tensor,
    idx: &[usize],
    reqs: &[GenRequest],
    mut samplers: Vec<&mut Sampler>,
) -> Result<Vec<u32>> {
    if idx.iter().all(|&i| reqs[i].sampling.is_greedy()) {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(samplers.iter_mut())
        .map(|(r, s)| s.sample(r))
        .collect())
}
