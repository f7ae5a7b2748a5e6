//! Lanes of running sequences and their decode steps.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, D};

use super::{Engine, Queued, SeqId, SeqSpec};

/// Extra slots a serving lane's stepper reserves beyond its rows' needs, for sequences placed into
/// holes later (at least this many, or as many again as the rows need).
const RESERVE_SLACK: usize = 256;
use crate::generate::fixed_step::FixedStepper;
use crate::generate::MIN_FIXED_STEPS;
use crate::generate::{FixedSlot, Sampler, Sampling};
use crate::intervene::{CompiledPlan, HookChain, LastTokenCapture, PlanHook, ResidualHook, RowCtx};
use crate::model::{KvCache, LogitsAt};
use crate::{Error, Result};

/// A sequence past its prefill.
pub(super) struct Running {
    pub(super) id: SeqId,
    pub(super) spec: SeqSpec,
    /// Tokens produced so far.
    pub(super) out: usize,
    sampler: Sampler,
    /// The token fed at the next step.
    pub(super) next: u32,
    /// The row holds no sequence: it ended (or was made as spare room) and its cache row waits
    /// for the next sequence to be placed there, so the batch shape, and with it a recorded CUDA
    /// graph, stays put. A hole keeps stepping; its tokens go nowhere.
    pub(super) hole: bool,
}

impl Running {
    pub(super) fn new(q: Queued, sampler: Sampler) -> Self {
        Self {
            id: q.id,
            spec: q.spec,
            out: 0,
            sampler,
            next: 0,
            hole: false,
        }
    }

    /// Spare room for a sequence to come, under `plan` (the plan the next one most likely has).
    pub(super) fn hole(plan: Option<Arc<CompiledPlan>>) -> Self {
        let mut spec = SeqSpec::new(Vec::new(), 0);
        spec.plan = plan;
        Self {
            id: super::SHADOW_SEQ,
            spec,
            out: 0,
            sampler: Sampler::new(Sampling::greedy()),
            next: 0,
            hole: true,
        }
    }
}

/// Sequences that decode together, sharing one KV cache (one time axis).
pub(super) struct Lane {
    running: Vec<Running>,
    pub(super) cache: KvCache,
    /// Replays decode steps while the batch stays the same (CUDA graphs).
    pub(super) stepper: Option<FixedStepper>,
}

impl Lane {
    pub(super) fn new(n_layers: usize) -> Self {
        Self {
            running: Vec::new(),
            cache: KvCache::new(n_layers),
            stepper: None,
        }
    }

    /// Rows of the batch, holes included.
    pub(super) fn len(&self) -> usize {
        self.running.len()
    }

    /// Rows that hold a sequence.
    pub(super) fn live(&self) -> usize {
        self.running.iter().filter(|r| !r.hole).count()
    }

    /// Whether every row picks greedily (what a fixed-slot step, and so a graph, needs).
    pub(super) fn all_greedy(&self) -> bool {
        self.running.iter().all(|r| r.spec.sampling.is_greedy())
    }

    /// Rows that hold no sequence.
    pub(super) fn holes(&self) -> Vec<usize> {
        (0..self.running.len())
            .filter(|&i| self.running[i].hole)
            .collect()
    }

    pub(super) fn push(&mut self, r: Running) {
        self.running.push(r);
    }

    /// Put `r` into hole `row` (its cache row already placed there).
    pub(super) fn fill(&mut self, row: usize, r: Running) -> Result<()> {
        if let Some(s) = &mut self.stepper {
            s.set_next(row, r.next)?;
        }
        self.running[row] = r;
        Ok(())
    }

    /// Row `row`'s sequence has ended: keep the row as a hole.
    fn make_hole(&mut self, row: usize) {
        self.running[row].hole = true;
        self.cache.clear_row(row);
    }

    /// Drops every hole (a new cache generation: the next fixed step records anew).
    pub(super) fn drop_holes(&mut self) -> Result<()> {
        let keep: Vec<bool> = self.running.iter().map(|r| !r.hole).collect();
        self.retain(&keep)
    }

    /// Keeps the running sequences flagged in `keep`, with their cache rows.
    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let idx: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
        let mut k = keep.iter();
        self.running.retain(|_| *k.next().unwrap_or(&false));
        self.cache.select(&idx)
    }

    /// Most tokens any running sequence may still produce: how far a fixed batch can run.
    pub(super) fn tokens_left(&self) -> usize {
        self.running
            .iter()
            .filter(|r| !r.hole)
            .map(|r| r.spec.max_new_tokens.saturating_sub(r.out))
            .max()
            .unwrap_or(0)
    }

    fn rows(&self) -> Vec<RowCtx> {
        self.running
            .iter()
            .enumerate()
            .map(|(bi, r)| RowCtx {
                seq: r.id,
                chunk_pad: 0,
                start_pos: self.cache.next_position(bi),
                prompt_len: r.spec.prompt.len(),
            })
            .collect()
    }

    pub(super) fn plans(&self) -> Vec<Option<Arc<CompiledPlan>>> {
        self.running.iter().map(|r| r.spec.plan.clone()).collect()
    }
}

impl Engine<'_> {
    /// One forward under the rows' plans, a last-token capture and an extra hook, each optional.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        tokens: &Tensor,
        rows: &[RowCtx],
        cache: &mut KvCache,
        plans: &[Option<Arc<CompiledPlan>>],
        capture: Option<&mut LastTokenCapture>,
        extra: Option<&mut dyn ResidualHook>,
        at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        let mut plan_hook = PlanHook::by_row(plans, self.model.n_layers());
        let mut hooks: Vec<&mut dyn ResidualHook> = Vec::new();
        if plan_hook.is_active() {
            hooks.push(&mut plan_hook);
        }
        if let Some(c) = capture {
            hooks.push(c);
        }
        if let Some(e) = extra {
            hooks.push(e);
        }
        match hooks.len() {
            0 => self.model.forward(tokens, rows, cache, None, at),
            1 => {
                let h = hooks.pop().expect("one hook");
                self.model.forward(tokens, rows, cache, Some(h), at)
            }
            _ => {
                let mut chain = HookChain(hooks);
                self.model
                    .forward(tokens, rows, cache, Some(&mut chain), at)
            }
        }
    }

    /// Ends sequences of `lane` that were cancelled or whose deadline passed.
    pub(super) fn drop_gone(&mut self, lane: usize) {
        let seqs: Vec<(SeqId, Option<Instant>, usize, bool)> = self.lanes[lane]
            .running
            .iter()
            .map(|r| (r.id, r.spec.deadline, r.out, r.hole))
            .collect();
        let keep: Vec<bool> = seqs
            .into_iter()
            .map(|(id, d, out, hole)| hole || self.still_wanted(id, d, out))
            .collect();
        if let Err(e) = self.end_rows(lane, &keep) {
            self.fail_lane(lane, e.to_string());
        }
    }

    /// Whether rows that end in `lane` stay as holes: a serving engine whose lane replays a
    /// fixed-slot stepper (a recorded graph) keeps its batch shape, so the next request joins
    /// without a new recording.
    fn keeps_holes(&self, lane: usize) -> bool {
        let l = &self.lanes[lane];
        self.cfg.reuse_slots
            && l.stepper
                .as_ref()
                .is_some_and(|s| s.matches(&l.cache, &l.plans()))
    }

    /// Rows not flagged in `keep` end: they become holes where the lane keeps them, else leave.
    /// Holes are dropped when nothing is left, or when most rows are holes and no sequence is on
    /// its way to fill them.
    fn end_rows(&mut self, lane: usize, keep: &[bool]) -> Result<()> {
        if self.keeps_holes(lane) {
            for (row, _) in keep.iter().enumerate().filter(|(_, &k)| !k) {
                self.lanes[lane].make_hole(row);
            }
        } else {
            self.lanes[lane].retain(keep)?;
        }
        let l = &self.lanes[lane];
        let holes = l.len() - l.live();
        let coming = self.waiting() > 0 || self.pending[lane].is_some();
        if holes > 0 && (l.live() == 0 || (2 * holes > l.len() && !coming)) {
            self.lanes[lane].drop_holes()?;
        }
        Ok(())
    }

    /// One token for every sequence of `lane`.
    pub(super) fn decode_step(
        &mut self,
        lane: usize,
        extra: Option<&mut dyn ResidualHook>,
    ) -> Result<()> {
        let (b, live) = (self.lanes[lane].len(), self.lanes[lane].live());
        let t = Instant::now();
        let (picks, finite) = if self.takes_fixed_path(lane, extra.is_some()) {
            self.fixed_decode(lane)?
        } else {
            self.plain_decode(lane, extra)?
        };
        self.stats.decode_secs += t.elapsed().as_secs_f64();
        // Tokens that went to sequences (holes step too, for nobody).
        self.stats.decode_tokens += live;
        self.stats.decode_steps += 1;
        let running = std::mem::take(&mut self.lanes[lane].running);
        let mut keep = vec![true; b];
        let mut still = Vec::with_capacity(b);
        for (bi, (mut r, tok)) in running.into_iter().zip(picks).enumerate() {
            keep[bi] = if r.hole {
                true
            } else if finite[bi] {
                self.advance(&mut r, tok)
            } else {
                self.fail(r.id, super::NON_FINITE.into());
                false
            };
            still.push(r);
        }
        self.lanes[lane].running = still;
        self.end_rows(lane, &keep)
    }

    /// Whether this step replays a fixed-slot step (CUDA graphs): greedy rows, no extra hook, and
    /// enough steps left (or a stepper already recorded for this batch).
    fn takes_fixed_path(&self, lane: usize, extra: bool) -> bool {
        let l = &self.lanes[lane];
        let more = l.tokens_left();
        self.fixed_ok
            && !extra
            && l.all_greedy()
            && (l
                .stepper
                .as_ref()
                .is_some_and(|s| s.matches(&l.cache, &l.plans()))
                || more >= MIN_FIXED_STEPS
                || self.cfg.fixed_slot == FixedSlot::Always)
    }

    fn fixed_decode(&mut self, lane: usize) -> Result<(Vec<u32>, Vec<bool>)> {
        let t = Instant::now();
        let model = self.model;
        let reuse = self.cfg.reuse_slots;
        let l = &mut self.lanes[lane];
        let plans = l.plans();
        let made = !l
            .stepper
            .as_ref()
            .is_some_and(|s| s.matches(&l.cache, &plans));
        if made {
            self.stats.absorb(l.stepper.take());
            self.stats.steppers += 1;
            let ids: Vec<u32> = l.running.iter().map(|r| r.next).collect();
            let more = l.tokens_left();
            // Room for sequences placed into holes later, so placing them never moves storage.
            let more = if reuse {
                more + more.max(RESERVE_SLACK)
            } else {
                more
            };
            l.stepper = Some(FixedStepper::new(model, &mut l.cache, &ids, &plans, more)?);
        }
        let rows = l.rows();
        let s = l.stepper.as_mut().expect("set above");
        let captures = s.captures;
        let (picks, finite) = s.step(model, &mut l.cache, &rows, &plans)?;
        let took = t.elapsed().as_secs_f64();
        self.stats.decode_issue_secs += took;
        if made || s.captures > captures {
            self.stats.graph_record_secs += took;
        }
        let finite = if self.cfg.fail_non_finite {
            finite
        } else {
            vec![true; picks.len()]
        };
        Ok((picks, finite))
    }

    fn plain_decode(
        &mut self,
        lane: usize,
        extra: Option<&mut dyn ResidualHook>,
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        let t = Instant::now();
        let n_layers = self.model.n_layers();
        let l = &self.lanes[lane];
        let ids: Vec<u32> = l.running.iter().map(|r| r.next).collect();
        let tokens = Tensor::from_vec(ids, (l.len(), 1), self.model.device())?;
        let (rows, plans) = (l.rows(), l.plans());
        let mut cache = std::mem::replace(&mut self.lanes[lane].cache, KvCache::new(n_layers));
        let logits = self.forward(
            &tokens,
            &rows,
            &mut cache,
            &plans,
            None,
            extra,
            LogitsAt::Last,
        );
        self.lanes[lane].cache = cache;
        let logits =
            logits?.ok_or_else(|| Error::InvalidValue("model returned no logits".into()))?;
        self.stats.decode_issue_secs += t.elapsed().as_secs_f64();
        let finite = self.finite(&logits)?;
        let running = &mut self.lanes[lane].running;
        let sampling: Vec<Sampling> = running.iter().map(|r| r.spec.sampling).collect();
        // Samplers live in the sequences; move them out for the pick and back.
        let mut samplers: Vec<Sampler> = running
            .iter_mut()
            .map(|r| std::mem::replace(&mut r.sampler, Sampler::new(Sampling::greedy())))
            .collect();
        let picks = pick(&logits, &sampling, &mut samplers);
        for (r, s) in running.iter_mut().zip(samplers) {
            r.sampler = s;
        }
        Ok((picks?, finite))
    }

    /// Which rows count as finite: all of them unless the config fails non-finite rows.
    pub(super) fn finite(&self, logits: &Tensor) -> Result<Vec<bool>> {
        if self.cfg.fail_non_finite {
            finite_rows(logits)
        } else {
            Ok(vec![true; logits.dim(0)?])
        }
    }

    /// A decode step failed for the whole lane: run each sequence alone on a copy of its cache
    /// row to find the ones that fail, fail only those, and let the rest go on (their step is
    /// redone next time; a failed forward never commits cache slots).
    pub(super) fn isolate_decode_failure(&mut self, lane: usize, e: String) {
        let b = self.lanes[lane].len();
        self.lanes[lane].stepper = None;
        let mut keep = vec![true; b];
        for (i, k) in keep.iter_mut().enumerate() {
            if self.lanes[lane].running[i].hole {
                *k = false;
                continue;
            }
            if b > 1 && self.step_alone(lane, i).is_ok() {
                continue;
            }
            *k = false;
            let id = self.lanes[lane].running[i].id;
            self.fail(id, e.clone());
        }
        if self.lanes[lane].retain(&keep).is_err() {
            self.fail_lane(lane, e);
        }
    }

    /// The lane's cache itself is unusable: nothing in it can go on.
    pub(super) fn fail_lane(&mut self, lane: usize, e: String) {
        let n_layers = self.model.n_layers();
        let l = &mut self.lanes[lane];
        let ids: Vec<SeqId> = l
            .running
            .drain(..)
            .filter(|r| !r.hole)
            .map(|r| r.id)
            .collect();
        l.cache = KvCache::new(n_layers);
        l.stepper = None;
        for id in ids {
            self.fail(id, e.clone());
        }
    }

    fn step_alone(&self, lane: usize, i: usize) -> Result<()> {
        let l = &self.lanes[lane];
        let r = &l.running[i];
        let mut cache = l.cache.clone();
        cache.select(&[i])?;
        let tokens = Tensor::from_vec(vec![r.next], (1, 1), self.model.device())?;
        let rows = [RowCtx {
            seq: r.id,
            chunk_pad: 0,
            start_pos: cache.next_position(0),
            prompt_len: r.spec.prompt.len(),
        }];
        let plans = [r.spec.plan.clone()];
        self.forward(
            &tokens,
            &rows,
            &mut cache,
            &plans,
            None,
            None,
            LogitsAt::Last,
        )?;
        Ok(())
    }
}

/// Whether each row of `[b, vocab]` logits is finite (a NaN or an infinity anywhere makes the
/// row's sum non-finite).
pub(super) fn finite_rows(logits: &Tensor) -> Result<Vec<bool>> {
    let sums = logits
        .to_dtype(DType::F32)?
        .sum(D::Minus1)?
        .to_vec1::<f32>()?;
    Ok(sums.iter().map(|s| s.is_finite()).collect())
}

/// Next token of each row: argmax on the device when every row is greedy, so only `b` ids cross
/// to the host.
pub(super) fn pick(
    logits: &Tensor,
    sampling: &[Sampling],
    samplers: &mut [Sampler],
) -> Result<Vec<u32>> {
    if sampling.iter().all(|s| s.is_greedy()) {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(samplers.iter_mut())
        .map(|(r, s)| s.sample(r))
        .collect())
}
