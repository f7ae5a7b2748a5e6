//! Prefill groups: waiting sequences fed through the model together, a chunk per step, until their
//! first tokens are picked and they join a lane.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::lane::{pick, Running};
use super::{Engine, EngineEvent, LastToken, Queued, SeqId, SHADOW_SEQ};
use crate::generate::{ChunkedPrefill, Finish, Sampler};
use crate::intervene::{CompiledPlan, LastTokenCapture, ResidualHook};
use crate::model::{KvCache, LogitsAt};
use crate::{Error, Result};

/// Smallest chunk (tokens), also the first one before any speed is measured.
const MIN_CHUNK: usize = 32;

/// Sequences being prefilled together. Rows: every sequence's prompt first, then the shadows.
pub(super) struct Group {
    lane: usize,
    seqs: Vec<Queued>,
    /// Row of each sequence's shadow, if any.
    shadow_row: Vec<Option<usize>>,
    /// Plan of each row (shadows have none).
    plans: Vec<Option<Arc<CompiledPlan>>>,
    /// `RowCtx::seq` of each row.
    row_seq: Vec<SeqId>,
    /// Layers any row asked to capture.
    capture: Vec<usize>,
    prefill: ChunkedPrefill,
}

impl Group {
    pub(super) fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Rows: sequences' prompts first, then their shadows.
    fn new(
        lane: usize,
        seqs: Vec<Queued>,
        n_layers: usize,
    ) -> std::result::Result<Self, (Vec<Queued>, Error)> {
        let mut prompts: Vec<Vec<u32>> = seqs.iter().map(|q| q.spec.prompt.clone()).collect();
        let mut plans: Vec<Option<Arc<CompiledPlan>>> =
            seqs.iter().map(|q| q.spec.plan.clone()).collect();
        let mut row_seq: Vec<SeqId> = seqs.iter().map(|q| q.id).collect();
        let mut shadow_row = vec![None; seqs.len()];
        for (i, q) in seqs.iter().enumerate() {
            if let Some(s) = &q.spec.shadow {
                shadow_row[i] = Some(prompts.len());
                prompts.push(s.clone());
                plans.push(None);
                row_seq.push(SHADOW_SEQ);
            }
        }
        let mut capture: Vec<usize> = seqs
            .iter()
            .flat_map(|q| q.spec.capture_layers.iter().copied())
            .filter(|&l| l < n_layers)
            .collect();
        capture.sort_unstable();
        capture.dedup();
        match ChunkedPrefill::new(prompts, n_layers) {
            Ok(prefill) => Ok(Self {
                lane,
                seqs,
                shadow_row,
                plans,
                row_seq,
                capture,
                prefill,
            }),
            Err(e) => Err((seqs, e)),
        }
    }

    /// Keep the sequences flagged in `alive`, with their shadows.
    fn retain(&mut self, alive: &[bool]) -> Result<()> {
        let kept: Vec<usize> = (0..self.seqs.len()).filter(|&i| alive[i]).collect();
        let mut keep_rows = kept.clone();
        let mut shadow_row = Vec::with_capacity(kept.len());
        for &i in &kept {
            shadow_row.push(self.shadow_row[i].map(|r| {
                keep_rows.push(r);
                keep_rows.len() - 1
            }));
        }
        self.seqs = std::mem::take(&mut self.seqs)
            .into_iter()
            .zip(alive)
            .filter_map(|(q, &a)| a.then_some(q))
            .collect();
        if self.seqs.is_empty() {
            return Ok(());
        }
        self.plans = keep_rows.iter().map(|&r| self.plans[r].clone()).collect();
        self.row_seq = keep_rows.iter().map(|&r| self.row_seq[r]).collect();
        self.shadow_row = shadow_row;
        self.prefill.select(&keep_rows)
    }
}

impl Engine<'_> {
    /// Forms the next prefill group of `lane` from waiting sequences: a retried one alone, else as
    /// many as there are free slots within the group's token budget (at least one).
    pub(super) fn start_group(&mut self, lane: usize) {
        let prefilling: usize = self.pending.iter().flatten().map(Group::len).sum();
        let free = self
            .cfg
            .batch_size
            .saturating_sub(self.running() + prefilling);
        if free == 0 {
            return;
        }
        let mut seqs = Vec::new();
        if let Some(i) = self.solo.iter().position(|q| self.lane_of(&q.spec) == lane) {
            let q = self.solo.remove(i).expect("index from position");
            if self.still_wanted(q.id, q.spec.deadline, 0) {
                seqs.push(q);
            }
        }
        let (mut rows, mut width) = (0usize, 0usize);
        // A group is of one lane; sequences of the other lane keep their place in the queue.
        let mut other = VecDeque::new();
        while seqs.is_empty() || (seqs.len() < free && !self.waiting.is_empty()) {
            let Some(q) = self.waiting.pop_front() else {
                break;
            };
            if !self.still_wanted(q.id, q.spec.deadline, 0) || self.finish_unprompted(&q) {
                continue;
            }
            if self.lane_of(&q.spec) != lane {
                other.push_back(q);
                continue;
            }
            let r = rows + 1 + usize::from(q.spec.shadow.is_some());
            let w = width.max(q.spec.prompt.len());
            if !seqs.is_empty() && r.saturating_mul(w) > self.cfg.max_prefill_tokens {
                self.waiting.push_front(q);
                break;
            }
            (rows, width) = (r, w);
            seqs.push(q);
        }
        while let Some(q) = other.pop_back() {
            self.waiting.push_front(q);
        }
        if seqs.is_empty() {
            return;
        }
        match Group::new(lane, seqs, self.model.n_layers()) {
            Ok(g) => self.pending[lane] = Some(g),
            Err((seqs, e)) => {
                for q in seqs {
                    self.fail(q.id, e.to_string());
                }
            }
        }
    }

    /// A sequence that wants no token and no capture ends without a forward.
    fn finish_unprompted(&mut self, q: &Queued) -> bool {
        let s = &q.spec;
        if s.max_new_tokens > 0 || !s.capture_layers.is_empty() || s.shadow.is_some() {
            return false;
        }
        self.events.push(EngineEvent::Finished {
            id: q.id,
            finish: Finish::Length,
            tokens: 0,
        });
        true
    }

    pub(super) fn fail(&mut self, id: SeqId, error: String) {
        self.events.push(EngineEvent::Failed { id, error });
    }

    /// Tokens the next prefill chunk may take: the configured cap, lowered while other sequences
    /// wait so that a chunk takes about the configured target at the measured prefill speed. On a
    /// slow CPU a 512-token chunk of a 0.5B model took ~5 s, during which no running sequence
    /// decoded a token.
    fn chunk_budget(&self) -> usize {
        let cap = self.cfg.prefill_chunk_tokens.max(1);
        let others_wait = self.running() > 0 || self.pending.iter().flatten().count() > 1;
        let Some(target) = self.cfg.chunk_target.filter(|_| others_wait) else {
            // Nobody is waiting on this chunk: the largest one prefills fastest.
            return cap;
        };
        match self.prefill_rate {
            Some(rate) => ((rate * target.as_secs_f64()) as usize).clamp(MIN_CHUNK.min(cap), cap),
            None => MIN_CHUNK.min(cap),
        }
    }

    fn observe_prefill(&mut self, tokens: usize, took: Duration) {
        let rate = tokens as f64 / took.as_secs_f64().max(1e-6);
        self.prefill_rate = Some(match self.prefill_rate {
            Some(r) => 0.7 * r + 0.3 * rate,
            None => rate,
        });
    }

    /// Drops sequences of the pending group that were cancelled or timed out (with their shadows).
    fn prune_pending(&mut self, lane: usize) -> Result<()> {
        let Some(mut g) = self.pending[lane].take() else {
            return Ok(());
        };
        let alive: Vec<bool> = g
            .seqs
            .iter()
            .map(|q| (q.id, q.spec.deadline))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(id, d)| self.still_wanted(id, d, 0))
            .collect();
        if !alive.iter().all(|&a| a) {
            g.retain(&alive)?;
        }
        if !g.seqs.is_empty() {
            self.pending[lane] = Some(g);
        }
        Ok(())
    }

    /// Runs the pending group's next chunk; after the last one, starts its sequences.
    pub(super) fn prefill_chunk(
        &mut self,
        lane: usize,
        extra: Option<&mut dyn ResidualHook>,
    ) -> Result<()> {
        self.prune_pending(lane)?;
        let Some(mut g) = self.pending[lane].take() else {
            return Ok(());
        };
        let dev = self.model.device().clone();
        let cols = g
            .prefill
            .chunk_columns(self.chunk_budget())
            .min(self.cfg.max_chunk_columns.max(1));
        let mut chunk = g.prefill.next_chunk(cols, &dev)?;
        for (r, &s) in chunk.rows.iter_mut().zip(&g.row_seq) {
            r.seq = s;
        }
        let started = Instant::now();
        let n_rows = g.prefill.rows();
        let mut cap = (chunk.last && !g.capture.is_empty())
            .then(|| LastTokenCapture::new(self.model.n_layers(), g.capture.iter().copied()));
        // Capture-only groups (no sequence wants a token) skip the LM head.
        let wants_tokens = g.seqs.iter().any(|q| q.spec.max_new_tokens > 0);
        let at = if chunk.last && wants_tokens {
            LogitsAt::Last
        } else {
            LogitsAt::None
        };
        let plans = g.plans.clone();
        let out = self.forward(
            &chunk.tokens,
            &chunk.rows,
            g.prefill.cache_mut(),
            &plans,
            cap.as_mut(),
            extra,
            at,
        );
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                self.pending[lane] = Some(g);
                return Err(e);
            }
        };
        g.prefill.advance(cols);
        self.observe_prefill(cols * n_rows, started.elapsed());
        if !chunk.last {
            self.stats.prefill_secs += started.elapsed().as_secs_f64();
            self.pending[lane] = Some(g);
            return Ok(());
        }
        let logits = match out {
            Some(l) => Some(l),
            None if wants_tokens => {
                return Err(Error::InvalidValue("model returned no logits".into()))
            }
            None => None,
        };
        let caps = match cap.as_mut() {
            Some(c) => split_rows(&c.take(), n_rows)?,
            None => vec![Vec::new(); n_rows],
        };
        self.start_sequences(g, logits.as_ref(), caps, started)
    }

    /// The pending group failed: its sequences are retried one by one (one that fails alone gets
    /// the error); running sequences are untouched.
    pub(super) fn fail_group(&mut self, lane: usize, e: String) {
        let Some(g) = self.pending[lane].take() else {
            return;
        };
        if g.seqs.len() == 1 {
            for q in g.seqs {
                self.fail(q.id, e.clone());
            }
            return;
        }
        for q in g.seqs.into_iter().rev() {
            self.solo.push_front(q);
        }
    }

    /// Reports each prefilled sequence with its first token; survivors join the group's lane.
    fn start_sequences(
        &mut self,
        mut g: Group,
        logits: Option<&Tensor>,
        mut caps: Vec<LastToken>,
        started: Instant,
    ) -> Result<()> {
        let n = g.seqs.len();
        let mut samplers: Vec<Sampler> = g
            .seqs
            .iter()
            .map(|q| Sampler::new(q.spec.sampling))
            .collect();
        let (firsts, finite) = match logits {
            Some(logits) => {
                let served = logits.narrow(0, 0, n)?;
                let sampling: Vec<_> = g.seqs.iter().map(|q| q.spec.sampling).collect();
                let firsts = pick(&served, &sampling, &mut samplers)?;
                (firsts, self.finite(&served)?)
            }
            // Nobody wants a token: no logits were made.
            None => (vec![0; n], vec![true; n]),
        };
        let prompt_tokens: usize = g.seqs.iter().map(|q| q.spec.prompt.len()).sum();
        self.stats.prefill_tokens += prompt_tokens;
        // Timed through the first tokens' pick: on a GPU the forward only enqueues work, and
        // reading the picks is where it is waited for.
        self.stats.prefill_secs += started.elapsed().as_secs_f64();
        let (mut keep, mut joined) = (Vec::new(), Vec::new());
        for (i, ((q, sampler), tok)) in g.seqs.drain(..).zip(samplers).zip(firsts).enumerate() {
            if !finite[i] {
                self.fail(q.id, super::NON_FINITE.into());
                continue;
            }
            let shadow = g.shadow_row[i].map(|r| std::mem::take(&mut caps[r]));
            let captures = only_layers(std::mem::take(&mut caps[i]), &q.spec.capture_layers);
            self.events.push(EngineEvent::Prefilled {
                id: q.id,
                prompt_tokens: q.spec.prompt.len(),
                captures,
                shadow: shadow.map(|c| only_layers(c, &q.spec.capture_layers)),
            });
            if q.spec.max_new_tokens == 0 {
                self.events.push(EngineEvent::Finished {
                    id: q.id,
                    finish: Finish::Length,
                    tokens: 0,
                });
                continue;
            }
            let mut run = Running::new(q, sampler);
            if self.advance(&mut run, tok) {
                keep.push(i);
                joined.push(run);
            }
        }
        if keep.is_empty() {
            return Ok(());
        }
        let joining = Instant::now();
        let joined = self.join_lane(g.lane, g.prefill.into_cache(), &keep, joined);
        self.stats.join_secs += joining.elapsed().as_secs_f64();
        joined
    }

    /// Sequences `joined`, prefilled in rows `rows` of `prefilled`, join `lane`: into its holes in
    /// place when there are enough and the rows fit (the lane's stepper goes on), else appended.
    fn join_lane(
        &mut self,
        lane: usize,
        mut prefilled: KvCache,
        rows: &[usize],
        joined: Vec<Running>,
    ) -> Result<()> {
        let more = joined
            .iter()
            .map(|r| r.spec.max_new_tokens.saturating_sub(r.out))
            .max()
            .unwrap_or(0)
            + 1;
        let spare_plan = joined.first().and_then(|r| r.spec.plan.clone());
        let l = &mut self.lanes[lane];
        let holes = l.holes();
        if self.cfg.reuse_slots
            && holes.len() >= joined.len()
            && l.cache.can_place(&prefilled, more)
        {
            let to = choose_holes(&holes, &l.plans(), &joined);
            l.cache.place(&to, &prefilled, rows)?;
            self.stats.slots_reused += to.len();
            for (r, row) in joined.into_iter().zip(to) {
                l.fill(row, r)?;
            }
        } else {
            l.drop_holes()?;
            prefilled.select(rows)?;
            let n_layers = self.model.n_layers();
            let mut merged = std::mem::replace(&mut l.cache, KvCache::new(n_layers));
            merged.merge(prefilled)?;
            l.cache = merged;
            for r in joined {
                l.push(r);
            }
        }
        self.keep_spare_rows(lane, spare_plan)?;
        let l = &mut self.lanes[lane];
        let limit = l.cache.len() + l.tokens_left() + 1;
        l.cache.limit_growth(limit);
        Ok(())
    }

    /// A serving lane whose rows are all taken grows by holes to the next power of two above its
    /// rows (at most the batch size), so the next sequences join in place. Growing reallocates,
    /// and the stepper is made anew once, now rather than when a burst of requests arrives.
    fn keep_spare_rows(&mut self, lane: usize, plan: Option<Arc<CompiledPlan>>) -> Result<()> {
        let l = &mut self.lanes[lane];
        let n = l.len();
        if !(self.cfg.reuse_slots && self.fixed_ok && l.all_greedy()) || n > l.live() {
            return Ok(());
        }
        let target = (n + 1).next_power_of_two().min(self.cfg.batch_size.max(n));
        l.cache.add_holes(target - n)?;
        for _ in n..target {
            l.push(Running::hole(plan.clone()));
        }
        Ok(())
    }

    /// Hands a sequence its next token; false when it ends here.
    pub(super) fn advance(&mut self, run: &mut Running, tok: u32) -> bool {
        run.out += 1;
        run.next = tok;
        let id = run.id;
        self.events.push(EngineEvent::Token { id, token: tok });
        let stop = run.spec.stop.contains(&tok);
        if stop || run.out >= run.spec.max_new_tokens {
            self.events.push(EngineEvent::Finished {
                id,
                finish: if stop { Finish::Stop } else { Finish::Length },
                tokens: run.out,
            });
            return false;
        }
        true
    }
}

/// Which holes the `joined` sequences take: first those whose plan is theirs (a recorded graph
/// applies each row's plan, so a hole under the same plan keeps it valid), then any.
fn choose_holes(
    holes: &[usize],
    plans: &[Option<Arc<CompiledPlan>>],
    joined: &[Running],
) -> Vec<usize> {
    let mut free: Vec<usize> = holes.to_vec();
    let mut to = vec![usize::MAX; joined.len()];
    for (j, r) in joined.iter().enumerate() {
        if let Some(k) = free
            .iter()
            .position(|&h| crate::generate::fixed_step::same_plan(&plans[h], &r.spec.plan))
        {
            to[j] = free.remove(k);
        }
    }
    for t in to.iter_mut().filter(|t| **t == usize::MAX) {
        *t = free.remove(0);
    }
    to
}

/// Keeps only `layers` of a capture (a group captures the union of what its rows asked for).
fn only_layers(mut caps: LastToken, layers: &[usize]) -> LastToken {
    for (l, c) in caps.iter_mut().enumerate() {
        if !layers.contains(&l) {
            *c = None;
        }
    }
    caps
}

/// Per row, per layer f32 vectors from per-layer `[rows, d]` captures. The layers are stacked on
/// the device and copied to the host at once: one copy (one stream sync) per prefill group instead
/// of one per layer, which on a GPU server cost a few percent of throughput.
pub fn split_rows(caps: &[Option<Tensor>], rows: usize) -> Result<Vec<LastToken>> {
    let mut out: Vec<LastToken> = vec![vec![None; caps.len()]; rows];
    let present: Vec<(usize, &Tensor)> = caps
        .iter()
        .enumerate()
        .filter_map(|(l, t)| t.as_ref().map(|t| (l, t)))
        .collect();
    if present.is_empty() {
        return Ok(out);
    }
    // Layers of a model split over devices come from several devices: stack on the first's.
    let dev = present[0].1.device().clone();
    let parts: Vec<Tensor> = present
        .iter()
        .map(|(_, t)| t.to_dtype(candle_core::DType::F32)?.to_device(&dev))
        .collect::<candle_core::Result<_>>()?;
    let all = Tensor::stack(&parts, 0)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec3::<f32>()?;
    for ((l, _), v) in present.iter().zip(all) {
        for (r, row) in v.into_iter().enumerate().take(rows) {
            out[r][*l] = Some(row);
        }
    }
    Ok(out)
}
