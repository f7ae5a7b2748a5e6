//! The model thread: one decode loop serving every request (continuous batching).
//!
//! HTTP handlers hand [`Job`]s to a bounded channel (full: 429). The loop takes as many waiting jobs
//! as there are free batch slots, prefills them together (left-padded, each row under its own
//! preset's plan, guard rows alongside), merges their KV-cache rows into the running batch, then
//! runs one shared decode step for every running sequence and streams each new token to its
//! request. Sequences leave the batch as soon as they finish, their client goes away or their
//! deadline passes, and their slots refill on the next iteration. Each sequence keeps its own plan:
//! the plan hook masks every operation to the rows that carry it.
//!
//! The guard reads the prompt's last-token residual from the same prefill: the served row (under
//! the preset) and, when the preset is not the default persona, a shadow row with the same messages
//! under the default persona (no system prompt, no steering) that is dropped after the prefill.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, D};
use persona_gate::generate::{ChunkedPrefill, Sampler, Sampling};
use persona_gate::intervene::{
    CompiledPlan, HookChain, LastTokenCapture, PlanHook, ResidualHook, RowCtx,
};
use persona_gate::model::{KvCache, LogitsAt, Model};
use persona_gate::{Error, Result};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::guard::{dot, split_rows, unit, GuardCalibration, GuardReport};
use crate::metrics::Metrics;
use crate::presets::GuardMode;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    /// Blocked by the guard before generating.
    ContentFilter,
    /// The request's deadline passed.
    Timeout,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length | Self::Timeout => "length",
            Self::ContentFilter => "content_filter",
        }
    }
}

/// Mean projection of the prompt's last-token residual over a window of layers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowProjection {
    pub layers: String,
    /// On the persona (compliant) direction.
    pub persona: Option<f64>,
    /// On the refusal direction.
    pub refusal: Option<f64>,
}

/// What the engine tells a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// After the prefill: prompt size, residual projections, guard scores.
    Started {
        prompt_tokens: usize,
        projections: Vec<WindowProjection>,
        guard: Option<GuardReport>,
        blocked: bool,
    },
    Token(u32),
    Done {
        finish: FinishReason,
        completion_tokens: usize,
    },
    Error(String),
}

/// One request for the engine.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    /// The same conversation under the default persona, for the guard; `None` when the served
    /// persona is the default one (then the served row is also the default row).
    pub shadow: Option<Vec<u32>>,
    pub plan: Option<Arc<CompiledPlan>>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub guard: GuardMode,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

/// Per-layer unit directions for the response's projections, and the layer windows.
#[derive(Debug, Clone, Default)]
pub struct Projector {
    pub persona: Option<Vec<Vec<f32>>>,
    pub refusal: Option<Vec<Vec<f32>>>,
    /// (label, layers)
    pub windows: Vec<(String, Vec<usize>)>,
}

impl Projector {
    /// Windows of `size` consecutive layers over `n_layers`; direction sets as unit rows.
    pub fn new(
        n_layers: usize,
        size: usize,
        persona: Option<&persona_gate::directions::DirectionSet>,
        refusal: Option<&persona_gate::directions::DirectionSet>,
    ) -> Result<Self> {
        let rows = |s: &persona_gate::directions::DirectionSet| -> Result<Vec<Vec<f32>>> {
            (0..n_layers)
                .map(|l| {
                    let r = if s.n_layers() == 1 { 0 } else { l };
                    Ok(unit(s.layer(r)?))
                })
                .collect()
        };
        let size = size.max(1);
        let windows = (0..n_layers)
            .step_by(size)
            .map(|a| {
                let b = (a + size).min(n_layers) - 1;
                let label = if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                };
                (label, (a..=b).collect())
            })
            .collect();
        Ok(Self {
            persona: persona.map(rows).transpose()?,
            refusal: refusal.map(rows).transpose()?,
            windows,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.persona.is_none() && self.refusal.is_none()
    }

    pub fn layers(&self) -> Vec<usize> {
        if self.is_empty() {
            Vec::new()
        } else {
            self.windows.iter().flat_map(|w| w.1.clone()).collect()
        }
    }

    pub fn project(&self, caps: &[Option<Vec<f32>>]) -> Vec<WindowProjection> {
        if self.is_empty() {
            return Vec::new();
        }
        let mean = |units: &Option<Vec<Vec<f32>>>, layers: &[usize]| -> Option<f64> {
            let units = units.as_ref()?;
            let v: Vec<f64> = layers
                .iter()
                .filter_map(|&l| Some(dot(caps.get(l)?.as_ref()?, units.get(l)?)))
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        self.windows
            .iter()
            .map(|(label, layers)| WindowProjection {
                layers: label.clone(),
                persona: mean(&self.persona, layers),
                refusal: mean(&self.refusal, layers),
            })
            .collect()
    }
}

pub struct EngineConfig {
    pub batch_size: usize,
    pub stop: Vec<u32>,
    pub guard: Option<Arc<GuardCalibration>>,
    pub projector: Projector,
    /// Tokens (rows x columns) one prefill chunk may run: bounds the attention scores a prefill
    /// holds (linear in the prompt) and how long running sequences wait between decode steps.
    pub prefill_chunk_tokens: usize,
    /// Padded prompt tokens one prefill group may hold: bounds the group's KV cache and how long
    /// a request that arrives behind it waits.
    pub max_prefill_tokens: usize,
    /// Prompts longer than this decode in their own lane (own batch and KV cache): a running
    /// batch shares one time axis, so one 4k-token prompt merged among short ones would make every
    /// row's cache 4k slots long.
    pub long_prompt_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            stop: Vec::new(),
            guard: None,
            projector: Projector::default(),
            prefill_chunk_tokens: 512,
            max_prefill_tokens: 8192,
            long_prompt_tokens: 1024,
        }
    }
}

struct Seq {
    job: Job,
    produced: usize,
    sampler: Sampler,
    next: u32,
}

/// Requests being prefilled together, one chunk per engine iteration.
struct Pending {
    /// The lane its sequences join.
    lane: usize,
    jobs: Vec<Job>,
    /// Row of each job's default-persona shadow (guard), if any.
    shadow_row: Vec<Option<usize>>,
    /// Plan of each row: jobs' rows first, then shadows (no plan).
    plans: Vec<Option<Arc<CompiledPlan>>>,
    group: ChunkedPrefill,
}

/// Jobs taken from the channel but not yet prefilled. `solo` holds jobs of a group whose prefill
/// failed: each is retried alone, so one bad request cannot fail the others.
#[derive(Default)]
struct Waiting {
    queue: VecDeque<Job>,
    solo: VecDeque<Job>,
}

/// Run the loop until every sender of `rx` is gone and no sequence is left.
pub fn run(model: Arc<Model>, cfg: EngineConfig, rx: Receiver<Job>, metrics: Arc<Metrics>) {
    limit_malloc_arenas();
    let n_layers = model.decoder.n_layers();
    let mut capture_layers: Vec<usize> = cfg.projector.layers();
    if let Some(g) = &cfg.guard {
        capture_layers.extend(g.layers());
    }
    capture_layers.sort_unstable();
    capture_layers.dedup();
    let mut st = State {
        model: &model,
        cfg: &cfg,
        metrics: &metrics,
        capture_layers,
        n_layers,
        lanes: [Lane::new(n_layers), Lane::new(n_layers)],
        pending: [None, None],
        prefill_rate: None,
        waiting: Waiting::default(),
    };
    let mut open = true;
    while open || st.busy() {
        if !st.busy() {
            // Idle: hand freed pages back to the system before blocking (the cache of a long
            // prompt would otherwise stay resident), then wait for work.
            release_free_memory();
            // Wake now and then while idle: request threads free their buffers after the engine
            // went idle, and those pages should go back too.
            match rx.recv_timeout(std::time::Duration::from_secs(2)) {
                Ok(j) => st.take(j),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while open && st.waiting.queue.len() + st.n_running() < 2 * cfg.batch_size {
            match rx.try_recv() {
                Ok(j) => st.take(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // One prefill group per lane, a chunk of each per iteration: a short prompt prefills in
        // one chunk even while a long one is still being fed.
        for lane in 0..st.lanes.len() {
            if st.pending[lane].is_none() {
                st.start_group(lane);
            }
            if st.pending[lane].is_some() {
                let r = guarded(|| st.prefill_chunk(lane));
                if let Err(e) = r {
                    st.fail_group(lane, e);
                }
            }
        }
        for lane in 0..st.lanes.len() {
            let r = guarded(|| {
                st.drop_gone(lane)?;
                if !st.lanes[lane].running.is_empty() {
                    st.decode_step(lane)?;
                }
                Ok(())
            });
            if let Err(e) = r {
                st.isolate_decode_failure(lane, e);
            }
        }
        metrics.running.store(st.n_running(), Ordering::Relaxed);
    }
}

/// Runs one engine phase, turning a panic into an error so the loop (and the other sequences)
/// survive a bug.
fn guarded(f: impl FnOnce() -> Result<()>) -> std::result::Result<(), String> {
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

/// Returns freed heap pages to the OS (glibc keeps them otherwise: resident memory grew from 184 MB
/// to 986 MB idle over a session of long prompts).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps glibc's malloc arenas: every thread that parses a large request body gets its own arena
/// by default (8 per core), and freed memory in them stays resident.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; M_ARENA_MAX (-8) takes a count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

struct State<'a> {
    model: &'a Model,
    cfg: &'a EngineConfig,
    metrics: &'a Metrics,
    capture_layers: Vec<usize>,
    n_layers: usize,
    /// Running sequences: short prompts in lane 0, long ones in lane 1.
    lanes: [Lane; 2],
    /// The group being prefilled in each lane.
    pending: [Option<Pending>; 2],
    /// Measured prefill speed (tokens/s, moving average), to size chunks by time.
    prefill_rate: Option<f64>,
    waiting: Waiting,
}

/// Sequences that decode together, sharing one KV cache (one time axis).
struct Lane {
    running: Vec<Seq>,
    cache: KvCache,
}

impl Lane {
    fn new(n_layers: usize) -> Self {
        Self {
            running: Vec::new(),
            cache: KvCache::new(n_layers),
        }
    }
}

/// Whether a job's client is still there and within its deadline; tells it otherwise.
fn still_wanted(j: &Job, now: Instant, produced: usize) -> bool {
    if j.events.is_closed() {
        return false;
    }
    if now >= j.deadline {
        let _ = j.events.send(Event::Done {
            finish: FinishReason::Timeout,
            completion_tokens: produced,
        });
        return false;
    }
    true
}

impl State<'_> {
    /// A job leaves the channel (the queue-depth gauge counts the channel).
    fn take(&mut self, j: Job) {
        let q = &self.metrics.queue_depth;
        let _ = q.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
            Some(d.saturating_sub(1))
        });
        self.waiting.queue.push_back(j);
    }

    fn n_running(&self) -> usize {
        self.lanes.iter().map(|l| l.running.len()).sum()
    }

    fn lane_of(&self, j: &Job) -> usize {
        usize::from(j.prompt.len() > self.cfg.long_prompt_tokens)
    }

    fn busy(&self) -> bool {
        self.n_running() > 0
            || self.pending.iter().any(Option::is_some)
            || !self.waiting.queue.is_empty()
            || !self.waiting.solo.is_empty()
    }

    fn forward(
        &self,
        tokens: &Tensor,
        rows: &[RowCtx],
        cache: &mut KvCache,
        plans: &[Option<Arc<CompiledPlan>>],
        capture: Option<&mut LastTokenCapture>,
        logits_at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        let mut plan_hook = PlanHook::new(plans, self.n_layers);
        let dec = &self.model.decoder;
        let active = plan_hook.is_active();
        match (active, capture) {
            (false, None) => dec.forward(tokens, rows, cache, None, logits_at),
            (true, None) => dec.forward(tokens, rows, cache, Some(&mut plan_hook), logits_at),
            (false, Some(c)) => dec.forward(tokens, rows, cache, Some(c), logits_at),
            (true, Some(c)) => {
                let mut chain = HookChain(vec![&mut plan_hook as &mut dyn ResidualHook, c]);
                dec.forward(tokens, rows, cache, Some(&mut chain), logits_at)
            }
        }
    }

    /// Forms the next prefill group from waiting jobs: a retried job alone, else as many jobs as
    /// there are free slots within the group's token budget (at least one).
    fn start_group(&mut self, lane: usize) {
        let now = Instant::now();
        let prefilling: usize = self.pending.iter().flatten().map(|p| p.jobs.len()).sum();
        let free = self
            .cfg
            .batch_size
            .saturating_sub(self.n_running() + prefilling);
        if free == 0 {
            return;
        }
        let mut jobs = Vec::new();
        if let Some(i) = self
            .waiting
            .solo
            .iter()
            .position(|j| self.lane_of(j) == lane)
        {
            let j = self.waiting.solo.remove(i).expect("index from position");
            if still_wanted(&j, now, 0) {
                jobs.push(j);
            }
        }
        let (mut rows, mut width) = (0usize, 0usize);
        // A group is of one lane; jobs of the other lane keep their place in the queue.
        let mut other = VecDeque::new();
        while jobs.is_empty() || (jobs.len() < free && !self.waiting.queue.is_empty()) {
            let Some(j) = self.waiting.queue.pop_front() else {
                break;
            };
            if !still_wanted(&j, now, 0) {
                continue;
            }
            if self.lane_of(&j) != lane {
                other.push_back(j);
                continue;
            }
            let r = rows + 1 + usize::from(self.wants_shadow(&j));
            let w = width.max(j.prompt.len());
            if !jobs.is_empty() && r * w > self.cfg.max_prefill_tokens {
                self.waiting.queue.push_front(j);
                break;
            }
            (rows, width) = (r, w);
            jobs.push(j);
        }
        while let Some(j) = other.pop_back() {
            self.waiting.queue.push_front(j);
        }
        if jobs.is_empty() {
            return;
        }
        match self.group(jobs) {
            Ok(p) => self.pending[lane] = Some(p),
            Err((jobs, e)) => {
                for j in jobs {
                    let _ = j.events.send(Event::Error(e.to_string()));
                }
            }
        }
    }

    /// Tokens the next prefill chunk may take: the configured cap, lowered while other sequences
    /// wait so that a chunk takes about [`CHUNK_TARGET`] at the measured prefill speed. On a fast GPU that is the cap; on a
    /// slow CPU a 512-token chunk of a 0.5B model took ~5 s, during which no running sequence
    /// decoded a token.
    fn chunk_budget(&self) -> usize {
        let cap = self.cfg.prefill_chunk_tokens.max(1);
        let others_wait = self.n_running() > 0 || self.pending.iter().flatten().count() > 1;
        if !others_wait {
            // Nobody is waiting on this chunk: the largest one prefills fastest.
            return cap;
        }
        match self.prefill_rate {
            Some(rate) => {
                ((rate * CHUNK_TARGET.as_secs_f64()) as usize).clamp(MIN_CHUNK.min(cap), cap)
            }
            None => MIN_CHUNK.min(cap),
        }
    }

    fn observe_prefill(&mut self, tokens: usize, took: std::time::Duration) {
        let rate = tokens as f64 / took.as_secs_f64().max(1e-6);
        self.prefill_rate = Some(match self.prefill_rate {
            Some(r) => 0.7 * r + 0.3 * rate,
            None => rate,
        });
    }

    fn wants_shadow(&self, j: &Job) -> bool {
        j.guard != GuardMode::Off && self.cfg.guard.is_some() && j.shadow.is_some()
    }

    /// Rows: every job's served prompt first, then the shadows of guarded jobs.
    fn group(&self, jobs: Vec<Job>) -> std::result::Result<Pending, (Vec<Job>, Error)> {
        let mut prompts: Vec<Vec<u32>> = jobs.iter().map(|j| j.prompt.clone()).collect();
        let mut plans: Vec<Option<Arc<CompiledPlan>>> =
            jobs.iter().map(|j| j.plan.clone()).collect();
        let mut shadow_row = vec![None; jobs.len()];
        for (i, j) in jobs.iter().enumerate() {
            if self.wants_shadow(j) {
                shadow_row[i] = Some(prompts.len());
                prompts.push(j.shadow.clone().unwrap_or_default());
                plans.push(None);
            }
        }
        let lane = self.lane_of(&jobs[0]);
        match ChunkedPrefill::new(prompts, self.n_layers) {
            Ok(group) => Ok(Pending {
                lane,
                jobs,
                shadow_row,
                plans,
                group,
            }),
            Err(e) => Err((jobs, e)),
        }
    }

    /// Drops rows of the pending group whose client left or timed out (with their shadows).
    fn prune_pending(&mut self, lane: usize) -> Result<()> {
        let Some(p) = self.pending[lane].as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        let alive: Vec<bool> = p.jobs.iter().map(|j| still_wanted(j, now, 0)).collect();
        if alive.iter().all(|&a| a) {
            return Ok(());
        }
        let kept: Vec<usize> = (0..p.jobs.len()).filter(|&i| alive[i]).collect();
        // Served rows first, then the kept jobs' shadows, as the group was built.
        let mut keep_rows = kept.clone();
        let mut shadow_row = Vec::with_capacity(kept.len());
        for &i in &kept {
            shadow_row.push(p.shadow_row[i].map(|r| {
                keep_rows.push(r);
                keep_rows.len() - 1
            }));
        }
        let jobs: Vec<Job> = std::mem::take(&mut p.jobs)
            .into_iter()
            .zip(&alive)
            .filter_map(|(j, &a)| a.then_some(j))
            .collect();
        if jobs.is_empty() {
            self.pending[lane] = None;
            return Ok(());
        }
        p.plans = keep_rows.iter().map(|&r| p.plans[r].clone()).collect();
        p.group.select(&keep_rows)?;
        p.jobs = jobs;
        p.shadow_row = shadow_row;
        Ok(())
    }

    /// Runs the pending group's next chunk; after the last one, starts its sequences.
    fn prefill_chunk(&mut self, lane: usize) -> Result<()> {
        self.prune_pending(lane)?;
        let Some(mut p) = self.pending[lane].take() else {
            return Ok(());
        };
        let dev = self.model.decoder.device().clone();
        let cols = p.group.chunk_columns(self.chunk_budget());
        let chunk = p.group.next_chunk(cols, &dev)?;
        let started = Instant::now();
        let n_rows = p.group.rows();
        let mut cap = (chunk.last && !self.capture_layers.is_empty())
            .then(|| LastTokenCapture::new(self.n_layers, self.capture_layers.iter().copied()));
        let at = if chunk.last {
            LogitsAt::Last
        } else {
            LogitsAt::None
        };
        let out = self.forward(
            &chunk.tokens,
            &chunk.rows,
            p.group.cache_mut(),
            &p.plans,
            cap.as_mut(),
            at,
        );
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                self.pending[lane] = Some(p);
                return Err(e);
            }
        };
        p.group.advance(cols);
        self.observe_prefill(cols * n_rows, started.elapsed());
        if !chunk.last {
            self.pending[lane] = Some(p);
            return Ok(());
        }
        let logits = out.ok_or_else(|| Error::InvalidValue("model returned no logits".into()))?;
        let caps = match cap.as_mut() {
            Some(c) => split_rows(&c.take(), n_rows)?,
            None => vec![Vec::new(); n_rows],
        };
        self.start_sequences(p, &logits, &caps)
    }

    /// The pending group failed: its jobs are retried one by one (a job that fails alone gets the
    /// error); running sequences are untouched.
    fn fail_group(&mut self, lane: usize, e: String) {
        let Some(p) = self.pending[lane].take() else {
            return;
        };
        if p.jobs.len() == 1 {
            eprintln!("[pgate serve] prefill failed for one request: {e}");
            for j in p.jobs {
                let _ = j.events.send(Event::Error(e.clone()));
            }
            return;
        }
        eprintln!(
            "[pgate serve] prefill of {} requests failed ({e}); retrying each alone",
            p.jobs.len()
        );
        for j in p.jobs.into_iter().rev() {
            self.waiting.solo.push_front(j);
        }
    }

    /// Sends `Started` and the first token of each job of a prefilled group, merging the
    /// survivors into the running batch.
    fn start_sequences(
        &mut self,
        mut p: Pending,
        logits: &Tensor,
        caps: &[Vec<Option<Vec<f32>>>],
    ) -> Result<()> {
        let guard = self.cfg.guard.as_ref();
        let n_jobs = p.jobs.len();
        let served = logits.narrow(0, 0, n_jobs)?;
        let finite = finite_rows(&served)?;
        let mut samplers: Vec<Sampler> = p.jobs.iter().map(|j| Sampler::new(j.sampling)).collect();
        let sampling: Vec<Sampling> = p.jobs.iter().map(|j| j.sampling).collect();
        let firsts = pick(&served, &sampling, &mut samplers)?;
        let mut keep = Vec::new();
        for (i, ((job, sampler), tok)) in p.jobs.drain(..).zip(samplers).zip(firsts).enumerate() {
            if !finite[i] {
                let _ = job.events.send(Event::Error(NON_FINITE.into()));
                continue;
            }
            let projections = self.cfg.projector.project(&caps[i]);
            let report = match (guard, job.guard) {
                (Some(g), m) if m != GuardMode::Off => {
                    let r = match p.shadow_row[i] {
                        Some(s) => g.score(&caps[s], Some(&caps[i])),
                        None => g.score(&caps[i], None),
                    };
                    match r {
                        Ok(r) => Some(r),
                        Err(e) => {
                            let _ = job.events.send(Event::Error(format!("guard: {e}")));
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let blocked =
                job.guard == GuardMode::Block && report.as_ref().is_some_and(|r| r.flagged);
            let _ = job.events.send(Event::Started {
                prompt_tokens: job.prompt.len(),
                projections,
                guard: report,
                blocked,
            });
            if blocked {
                let _ = job.events.send(Event::Done {
                    finish: FinishReason::ContentFilter,
                    completion_tokens: 0,
                });
                continue;
            }
            if job.events.send(Event::Token(tok)).is_err() {
                continue;
            }
            let stop = self.cfg.stop.contains(&tok);
            if stop || job.max_new_tokens <= 1 {
                let _ = job.events.send(Event::Done {
                    finish: if stop {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                    completion_tokens: 1,
                });
                continue;
            }
            keep.push(i);
            self.lanes[p.lane].running.push(Seq {
                job,
                produced: 1,
                sampler,
                next: tok,
            });
        }
        let mut new_cache = p.group.into_cache();
        if keep.is_empty() {
            return Ok(());
        }
        new_cache.select(&keep)?;
        let lane = &mut self.lanes[p.lane];
        let mut merged = std::mem::replace(&mut lane.cache, KvCache::new(self.n_layers));
        merged.merge(new_cache)?;
        lane.cache = merged;
        Ok(())
    }

    /// Remove sequences whose client left or whose deadline passed.
    fn drop_gone(&mut self, lane: usize) -> Result<()> {
        let now = Instant::now();
        let keep: Vec<bool> = self.lanes[lane]
            .running
            .iter()
            .map(|s| still_wanted(&s.job, now, s.produced))
            .collect();
        self.retain(lane, &keep)
    }

    /// Keeps the running sequences flagged in `keep`, with their cache rows.
    fn retain(&mut self, lane: usize, keep: &[bool]) -> Result<()> {
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let lane = &mut self.lanes[lane];
        let idx: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
        let mut still = Vec::with_capacity(idx.len());
        for (s, &k) in lane.running.drain(..).zip(keep) {
            if k {
                still.push(s);
            }
        }
        lane.running = still;
        lane.cache.select(&idx)
    }

    fn decode_inputs(
        &self,
        lane: usize,
    ) -> Result<(Tensor, Vec<RowCtx>, Vec<Option<Arc<CompiledPlan>>>)> {
        let lane = &self.lanes[lane];
        let ids: Vec<u32> = lane.running.iter().map(|s| s.next).collect();
        let rows: Vec<RowCtx> = lane
            .running
            .iter()
            .enumerate()
            .map(|(bi, s)| RowCtx {
                seq: bi,
                chunk_pad: 0,
                start_pos: lane.cache.next_position(bi),
                prompt_len: s.job.prompt.len(),
            })
            .collect();
        let plans = lane.running.iter().map(|s| s.job.plan.clone()).collect();
        let dev = self.model.decoder.device().clone();
        Ok((
            Tensor::from_vec(ids, (lane.running.len(), 1), &dev)?,
            rows,
            plans,
        ))
    }

    fn decode_step(&mut self, lane: usize) -> Result<()> {
        let b = self.lanes[lane].running.len();
        let (tokens, rows, plans) = self.decode_inputs(lane)?;
        let mut cache = std::mem::replace(&mut self.lanes[lane].cache, KvCache::new(self.n_layers));
        let logits = self.forward(&tokens, &rows, &mut cache, &plans, None, LogitsAt::Last);
        self.lanes[lane].cache = cache;
        let logits =
            logits?.ok_or_else(|| Error::InvalidValue("model returned no logits".into()))?;
        let finite = finite_rows(&logits)?;
        let running = &mut self.lanes[lane].running;
        let sampling: Vec<Sampling> = running.iter().map(|s| s.job.sampling).collect();
        // Samplers live in the sequences; move them out for the pick and back.
        let mut samplers: Vec<Sampler> = running
            .iter_mut()
            .map(|s| std::mem::replace(&mut s.sampler, Sampler::new(Sampling::greedy())))
            .collect();
        let picks = pick(&logits, &sampling, &mut samplers)?;
        for (s, sm) in running.iter_mut().zip(samplers) {
            s.sampler = sm;
        }
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .decode_tokens
            .fetch_add(b as u64, Ordering::Relaxed);
        let mut keep = vec![true; b];
        for (bi, (s, tok)) in running.iter_mut().zip(picks).enumerate() {
            keep[bi] = advance_seq(&self.cfg.stop, s, tok, finite[bi]);
        }
        self.retain(lane, &keep)
    }

    /// A decode step failed for the whole lane: run each sequence alone on a copy of its cache
    /// row to find the ones that fail, fail only those, and let the rest go on (their step is
    /// redone next iteration; a failed forward never commits cache slots).
    fn isolate_decode_failure(&mut self, lane: usize, e: String) {
        let b = self.lanes[lane].running.len();
        if b == 0 {
            return;
        }
        let mut keep = vec![true; b];
        for (i, k) in keep.iter_mut().enumerate() {
            if b > 1 && self.step_alone(lane, i).is_ok() {
                continue;
            }
            *k = false;
            let _ = self.lanes[lane].running[i]
                .job
                .events
                .send(Event::Error(e.clone()));
        }
        eprintln!(
            "[pgate serve] decode step failed ({e}); failed {} of {b} sequences",
            keep.iter().filter(|k| !**k).count()
        );
        if self.retain(lane, &keep).is_err() {
            // The cache itself is unusable: nothing in this lane can go on.
            let l = &mut self.lanes[lane];
            for s in l.running.drain(..) {
                let _ = s.job.events.send(Event::Error(e.clone()));
            }
            l.cache = KvCache::new(self.n_layers);
        }
    }

    fn step_alone(&self, lane: usize, i: usize) -> Result<()> {
        let s = &self.lanes[lane].running[i];
        let mut cache = self.lanes[lane].cache.clone();
        cache.select(&[i])?;
        let dev = self.model.decoder.device().clone();
        let tokens = Tensor::from_vec(vec![s.next], (1, 1), &dev)?;
        let rows = [RowCtx {
            seq: 0,
            chunk_pad: 0,
            start_pos: cache.next_position(0),
            prompt_len: s.job.prompt.len(),
        }];
        let plans = [s.job.plan.clone()];
        self.forward(&tokens, &rows, &mut cache, &plans, None, LogitsAt::Last)?;
        Ok(())
    }
}

/// Hands one sampled token to its sequence; false when the sequence ends here.
fn advance_seq(stop_ids: &[u32], s: &mut Seq, tok: u32, finite: bool) -> bool {
    if !finite {
        let _ = s.job.events.send(Event::Error(NON_FINITE.into()));
        return false;
    }
    s.produced += 1;
    s.next = tok;
    if s.job.events.send(Event::Token(tok)).is_err() {
        return false;
    }
    let stop = stop_ids.contains(&tok);
    if stop || s.produced >= s.job.max_new_tokens {
        let _ = s.job.events.send(Event::Done {
            finish: if stop {
                FinishReason::Stop
            } else {
                FinishReason::Length
            },
            completion_tokens: s.produced,
        });
        return false;
    }
    true
}

/// Wall time one prefill chunk should take, so running sequences keep decoding during long prefills.
const CHUNK_TARGET: std::time::Duration = std::time::Duration::from_millis(250);
/// Smallest chunk (tokens), also the first one before any speed is measured.
const MIN_CHUNK: usize = 32;

const NON_FINITE: &str =
    "the model produced non-finite logits for this request (is a steering coefficient too large?)";

/// Whether each row of `[b, vocab]` logits is finite (a NaN or an infinity anywhere makes the
/// row's sum non-finite).
fn finite_rows(logits: &Tensor) -> Result<Vec<bool>> {
    let sums = logits
        .to_dtype(candle_core::DType::F32)?
        .sum(D::Minus1)?
        .to_vec1::<f32>()?;
    Ok(sums.iter().map(|s| s.is_finite()).collect())
}

/// Next token of each row: argmax on the device when every row is greedy.
fn pick(logits: &Tensor, sampling: &[Sampling], samplers: &mut [Sampler]) -> Result<Vec<u32>> {
    if sampling.iter().all(|s| s.is_greedy()) {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(samplers.iter_mut())
        .map(|(r, s)| s.sample(r))
        .collect())
}
