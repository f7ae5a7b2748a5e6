//! The stepping engine: one loop under generation, studies, extraction, judges and the server.
//!
//! Callers [`Engine::submit`] sequences at any time and call [`Engine::step`] until it is idle; each
//! step returns what happened as [`EngineEvent`]s. A step does two things:
//! 1. **Prefill.** Waiting sequences are grouped (left-padded, as many as there are free batch slots,
//!    within a token budget) and fed through the model one chunk at a time, so a long prompt neither
//!    holds `prompt x prompt` attention scores nor stalls running sequences for seconds. When a
//!    group's last chunk has run, its first tokens are picked, the residual captures it asked for
//!    are reported, and its cache rows join the running batch.
//! 2. **Decode.** One token for every running sequence; finished sequences leave at once, and their
//!    slots refill on the next step. Greedy batches replay CUDA graphs ([`FixedStepper`]) when the
//!    batch shape stays put long enough for recording to pay. A serving engine
//!    ([`EngineConfig::reuse_slots`]) keeps the rows of ended sequences as holes and places joining
//!    sequences into them, so the shape stays put while requests come and go.
//!
//! Each sequence carries its own plan, sampling, stop ids, capture layers and deadline; its tokens do
//! not depend on its neighbours (masks, positions and RNG are per sequence). Prompts over
//! [`EngineConfig::long_prompt_tokens`] decode in a lane of their own, since a lane shares one time
//! axis and a single 4k-token row would stretch every short row's cache. A failure fails only the
//! sequences it belongs to: a group whose prefill fails is retried one sequence at a time, and a
//! decode step that fails is narrowed down by stepping each row alone.
//!
//! Batch jobs (studies, `pgate generate`) take [`EngineConfig::batch`]: whole prompts in one chunk,
//! which is fastest and keeps their results identical to a plain batched forward. The server takes
//! [`EngineConfig::serving`]: chunks sized to about a quarter second while others wait.

mod group;
mod lane;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Finish, FixedSlot, GenStats, Sampling};
use crate::intervene::{CompiledPlan, ResidualHook};
use crate::model::Decoder;

use group::Group;
use lane::Lane;

/// The engine's name for a sequence: dense from 0 in submission order, and the `RowCtx::seq` every
/// hook sees for that sequence's rows.
pub type SeqId = usize;

/// `RowCtx::seq` of shadow rows (they belong to no caller sequence).
pub const SHADOW_SEQ: usize = usize::MAX;

/// One sequence for the engine.
#[derive(Debug, Clone)]
pub struct SeqSpec {
    pub prompt: Vec<u32>,
    pub plan: Option<Arc<CompiledPlan>>,
    /// 0: prefill only (for its captures), no token.
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end the sequence (included in its tokens).
    pub stop: Vec<u32>,
    /// Layers whose residual at the prompt's last token is reported after the prefill.
    pub capture_layers: Vec<usize>,
    /// Another prompt prefilled in the same group with no plan, reported beside this sequence's
    /// captures and then dropped: the guard's default-persona reading of the same conversation.
    pub shadow: Option<Vec<u32>>,
    /// Past this instant the sequence ends with [`EngineEvent::TimedOut`].
    pub deadline: Option<Instant>,
}

impl SeqSpec {
    /// A greedy sequence with no plan, stop ids, captures or deadline.
    pub fn new(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            plan: None,
            max_new_tokens,
            sampling: Sampling::greedy(),
            stop: Vec::new(),
            capture_layers: Vec::new(),
            shadow: None,
            deadline: None,
        }
    }
}

/// Residuals at a prompt's last token, indexed by layer (`None` for layers not asked for).
pub type LastToken = Vec<Option<Vec<f32>>>;

/// What happened to a sequence during a step, in order.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// The prompt has been prefilled: comes before the sequence's first token.
    Prefilled {
        id: SeqId,
        prompt_tokens: usize,
        captures: LastToken,
        /// The shadow prompt's captures, when the sequence had one.
        shadow: Option<LastToken>,
    },
    Token {
        id: SeqId,
        token: u32,
    },
    Finished {
        id: SeqId,
        finish: Finish,
        tokens: usize,
    },
    /// The deadline passed after `tokens` tokens.
    TimedOut {
        id: SeqId,
        tokens: usize,
    },
    /// The sequence failed (the message says why); others go on.
    Failed {
        id: SeqId,
        error: String,
    },
}

impl EngineEvent {
    pub fn id(&self) -> SeqId {
        match self {
            Self::Prefilled { id, .. }
            | Self::Token { id, .. }
            | Self::Finished { id, .. }
            | Self::TimedOut { id, .. }
            | Self::Failed { id, .. } => *id,
        }
    }
}

/// How the engine batches and chunks.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoding at once (both lanes together).
    pub batch_size: usize,
    /// Tokens (rows x columns) one prefill chunk may run.
    pub prefill_chunk_tokens: usize,
    /// Columns (prompt positions) one prefill chunk may run, whatever the rows: attention scores
    /// of a chunk are `rows x columns x prompt`, so this keeps prefill memory linear in the prompt
    /// length (a 4k-token prompt in one forward held 2.3 GB of scores on the CPU; an 8k one at
    /// batch 16 would need ~68 GB on a GPU).
    pub max_chunk_columns: usize,
    /// Padded prompt tokens one prefill group may hold (at least one sequence always goes).
    pub max_prefill_tokens: usize,
    /// Prompts longer than this decode in their own lane.
    pub long_prompt_tokens: usize,
    /// While other sequences wait on a chunk, size it to take about this long at the measured
    /// prefill speed (`None`: always the full chunk).
    pub chunk_target: Option<Duration>,
    pub fixed_slot: FixedSlot,
    /// Keep the rows of ended sequences as holes that joining sequences fill in place (and pad a
    /// batch that grows to the next power of two with holes), so that a recorded CUDA graph keeps
    /// replaying while requests come and go; holes step along unused. For the server; batch jobs
    /// keep their batches compact.
    pub reuse_slots: bool,
    /// Fail a sequence whose logits go non-finite (the server: the client gets an error). Batch
    /// jobs keep going, as they always have: a blown-up steering coefficient then shows as
    /// degenerate text, which is what a study measures.
    pub fail_non_finite: bool,
}

impl EngineConfig {
    /// For batch jobs: whole prompts of up to 1024 tokens in one forward (longer ones in chunks of
    /// 1024 columns), one lane. Results of ordinary prompts equal a plain batched forward, so
    /// studies stay reproducible.
    pub fn batch(batch_size: usize) -> Self {
        Self {
            batch_size: batch_size.max(1),
            prefill_chunk_tokens: usize::MAX,
            max_chunk_columns: LONG_CHUNK_COLUMNS,
            max_prefill_tokens: usize::MAX,
            long_prompt_tokens: usize::MAX,
            chunk_target: None,
            fixed_slot: FixedSlot::Auto,
            reuse_slots: false,
            fail_non_finite: false,
        }
    }

    /// For serving: bounded chunks sized by time while others wait, long prompts in their own lane.
    pub fn serving(batch_size: usize) -> Self {
        Self {
            batch_size: batch_size.max(1),
            prefill_chunk_tokens: 512,
            max_chunk_columns: LONG_CHUNK_COLUMNS,
            max_prefill_tokens: 8192,
            long_prompt_tokens: 1024,
            chunk_target: Some(Duration::from_millis(250)),
            fixed_slot: FixedSlot::Auto,
            reuse_slots: slot_reuse_enabled(),
            fail_non_finite: true,
        }
    }
}

/// Whether serving engines reuse the slots of ended sequences (`PGATE_SLOT_REUSE=0` turns it off,
/// for A/B runs).
fn slot_reuse_enabled() -> bool {
    std::env::var("PGATE_SLOT_REUSE").map_or(true, |v| v != "0")
}

/// Prefill chunks of batch jobs take at most this many prompt positions.
pub const LONG_CHUNK_COLUMNS: usize = 1024;

/// A sequence waiting for its prefill.
#[derive(Debug)]
struct Queued {
    id: SeqId,
    spec: SeqSpec,
}

/// Drives a [`Decoder`] one step at a time over sequences that come and go.
pub struct Engine<'m> {
    model: &'m Decoder,
    cfg: EngineConfig,
    next_id: SeqId,
    waiting: VecDeque<Queued>,
    /// Sequences of a group whose prefill failed, each retried alone.
    solo: VecDeque<Queued>,
    /// The group being prefilled in each lane.
    pending: [Option<Group>; 2],
    /// Running sequences: short prompts in lane 0, long ones in lane 1.
    lanes: [Lane; 2],
    cancelled: HashSet<SeqId>,
    /// Measured prefill speed (tokens/s, moving average), to size chunks by time.
    prefill_rate: Option<f64>,
    fixed_ok: bool,
    events: Vec<EngineEvent>,
    pub stats: GenStats,
}

impl<'m> Engine<'m> {
    pub fn new(model: &'m Decoder, cfg: EngineConfig) -> Self {
        let dev = model.device();
        let fixed_ok = match cfg.fixed_slot {
            FixedSlot::Never => false,
            FixedSlot::Always => model.supports_fixed_slot(),
            FixedSlot::Auto => {
                dev.is_cuda() && super::graphs_enabled() && model.supports_fixed_slot()
            }
        };
        let n = model.n_layers();
        Self {
            model,
            cfg,
            next_id: 0,
            waiting: VecDeque::new(),
            solo: VecDeque::new(),
            pending: [None, None],
            lanes: [Lane::new(n), Lane::new(n)],
            cancelled: HashSet::new(),
            prefill_rate: None,
            fixed_ok,
            events: Vec::new(),
            stats: GenStats::default(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Queue a sequence; its events carry the returned id.
    pub fn submit(&mut self, spec: SeqSpec) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Queued { id, spec });
        id
    }

    /// Drop a sequence wherever it is (no further events for it): its client went away.
    pub fn cancel(&mut self, id: SeqId) {
        self.cancelled.insert(id);
    }

    /// True when no sequence is waiting, prefilling or decoding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequences waiting, prefilling or decoding.
    pub fn len(&self) -> usize {
        self.waiting.len()
            + self.solo.len()
            + self.pending.iter().flatten().map(Group::len).sum::<usize>()
            + self.running()
    }

    pub fn is_idle(&self) -> bool {
        self.is_empty()
    }

    /// Sequences decoding now.
    pub fn running(&self) -> usize {
        self.lanes.iter().map(Lane::live).sum()
    }

    /// Sequences not yet prefilled (waiting or retried alone).
    pub fn waiting(&self) -> usize {
        self.waiting.len() + self.solo.len()
    }

    /// One step: a prefill chunk per lane with a group to feed, then one decode step per lane.
    /// `extra` sees every forward (prefill and decode) beside the sequences' plans; with it,
    /// decode steps run without CUDA graphs.
    pub fn step(&mut self, mut extra: Option<&mut dyn ResidualHook>) -> Vec<EngineEvent> {
        for lane in 0..self.lanes.len() {
            if self.pending[lane].is_none() {
                self.start_group(lane);
            }
            if self.pending[lane].is_some() {
                let hook = crate::intervene::hook::reborrow(&mut extra);
                if let Err(e) = guarded(|| self.prefill_chunk(lane, hook)) {
                    self.fail_group(lane, e);
                }
            }
        }
        for lane in 0..self.lanes.len() {
            self.drop_gone(lane);
            if self.lanes[lane].len() == 0 {
                continue;
            }
            let with_extra = extra.is_some();
            let hook = crate::intervene::hook::reborrow(&mut extra);
            if let Err(e) = guarded(|| self.decode_step(lane, hook)) {
                if with_extra {
                    // The caller's hook may be what failed (an interrupt, say): stepping rows
                    // alone without it would succeed and retry forever, so the lane fails.
                    self.fail_lane(lane, e);
                } else {
                    self.isolate_decode_failure(lane, e);
                }
            }
        }
        if self.is_idle() {
            // Cancels of sequences that had already ended are never looked up again.
            self.cancelled.clear();
        }
        std::mem::take(&mut self.events)
    }

    /// Retire CUDA-graph steppers and fold their counts into the stats.
    pub fn finish_stats(&mut self) -> &GenStats {
        for lane in &mut self.lanes {
            self.stats.absorb(lane.stepper.take());
        }
        &self.stats
    }

    /// Whether a sequence is still wanted: not cancelled and within its deadline (which ends it
    /// with [`EngineEvent::TimedOut`]).
    fn still_wanted(&mut self, id: SeqId, deadline: Option<Instant>, tokens: usize) -> bool {
        if self.cancelled.contains(&id) {
            return false;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            self.events.push(EngineEvent::TimedOut { id, tokens });
            return false;
        }
        true
    }

    fn lane_of(&self, spec: &SeqSpec) -> usize {
        usize::from(spec.prompt.len() > self.cfg.long_prompt_tokens)
    }
}

/// Runs one engine phase, turning a panic into an error so the loop (and the other sequences)
/// survive a bug.
fn guarded(f: impl FnOnce() -> crate::Result<()>) -> std::result::Result<(), String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(format!(
            "engine panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

/// Message of a sequence whose logits went non-finite.
pub const NON_FINITE: &str =
    "the model produced non-finite logits for this request (is a steering coefficient too large?)";
