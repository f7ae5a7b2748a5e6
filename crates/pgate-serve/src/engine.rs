//! The model thread: the library's stepping engine ([`persona_gate::generate::Engine`]) serving
//! every request, and what only a server adds around it.
//!
//! HTTP handlers hand [`Job`]s to a bounded channel (full: 429). This thread submits them to the
//! engine (each row under its own preset's plan, with its deadline), steps it, and turns the
//! engine's events into each request's stream: the engine batches, chunks prefills, keeps long
//! prompts in their own lane, replays CUDA graphs and isolates failures; this thread adds the
//! guard, the residual projections, cancellation when a client goes away, metrics, and handing
//! memory back while idle.
//!
//! The guard reads the prompt's last-token residual from the same prefill: the served row (under
//! the preset) and, when the preset is not the default persona, a shadow row with the same messages
//! under the default persona (no system prompt, no steering) that the engine drops after the
//! prefill. A blocked request is cancelled before its first token is sent.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use persona_gate::generate::{
    Engine, EngineConfig as StepConfig, EngineEvent, Finish, LastToken, Sampling, SeqId, SeqSpec,
};
use persona_gate::intervene::CompiledPlan;
use persona_gate::model::Model;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::guard::{GuardCalibration, GuardReport};
use crate::metrics::Metrics;
use crate::presets::GuardMode;
pub use crate::projection::{Projector, WindowProjection};

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
        let s = StepConfig::serving(32);
        Self {
            batch_size: s.batch_size,
            stop: Vec::new(),
            guard: None,
            projector: Projector::default(),
            prefill_chunk_tokens: s.prefill_chunk_tokens,
            max_prefill_tokens: s.max_prefill_tokens,
            long_prompt_tokens: s.long_prompt_tokens,
        }
    }
}

impl EngineConfig {
    fn step_config(&self) -> StepConfig {
        StepConfig {
            prefill_chunk_tokens: self.prefill_chunk_tokens,
            max_prefill_tokens: self.max_prefill_tokens,
            long_prompt_tokens: self.long_prompt_tokens,
            ..StepConfig::serving(self.batch_size)
        }
    }

    /// The step configuration on `dev`. On a GPU a 512-token chunk takes ~20 ms, so a burst of
    /// new requests would prefill over several steps (each also waiting for a decode step) and
    /// wait that long for its first token; chunks there take up to [`GPU_CHUNK_TOKENS`]. The
    /// time-based sizing still bounds how long running sequences wait.
    fn step_config_for(&self, dev: &candle_core::Device) -> StepConfig {
        let mut sc = self.step_config();
        if dev.is_cuda() && self.prefill_chunk_tokens == StepConfig::serving(1).prefill_chunk_tokens
        {
            sc.prefill_chunk_tokens = GPU_CHUNK_TOKENS;
        }
        sc
    }

    /// Layers the projections and the guard read (captured at each prompt's last token).
    fn capture_layers(&self) -> Vec<usize> {
        let mut layers = self.projector.layers();
        if let Some(g) = &self.guard {
            layers.extend(g.layers());
        }
        layers.sort_unstable();
        layers.dedup();
        layers
    }
}

/// Prefill chunk cap (rows x columns) on a GPU.
pub const GPU_CHUNK_TOKENS: usize = 8192;

/// Run the loop until every sender of `rx` is gone and no sequence is left.
pub fn run(model: Arc<Model>, cfg: EngineConfig, rx: Receiver<Job>, metrics: Arc<Metrics>) {
    limit_malloc_arenas();
    let mut srv = Serving {
        engine: Engine::new(&model.decoder, cfg.step_config_for(model.decoder.device())),
        capture_layers: cfg.capture_layers(),
        cfg: &cfg,
        metrics: &metrics,
        live: HashMap::new(),
    };
    let mut open = true;
    while open || !srv.engine.is_idle() {
        if srv.engine.is_idle() {
            // Idle: hand freed pages back to the system before blocking (the cache of a long
            // prompt would otherwise stay resident), then wait for work, waking now and then:
            // request threads free their buffers after the engine went idle, and those pages
            // should go back too.
            release_free_memory();
            match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(j) => srv.admit(j),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while open && srv.engine.len() < 2 * cfg.batch_size {
            match rx.try_recv() {
                Ok(j) => srv.admit(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        srv.cancel_gone();
        let before = srv.engine.stats.clone();
        for ev in srv.engine.step(None) {
            srv.dispatch(ev);
        }
        metrics.record_engine_step(&before, &srv.engine.stats);
        metrics
            .running
            .store(srv.engine.running(), Ordering::Relaxed);
    }
}

/// A request the engine is working on.
struct Live {
    job: Job,
    /// Whether the engine was asked for a shadow row (the guard then scores it).
    shadowed: bool,
}

/// The engine and the requests behind its sequences.
struct Serving<'a> {
    engine: Engine<'a>,
    capture_layers: Vec<usize>,
    cfg: &'a EngineConfig,
    metrics: &'a Metrics,
    live: HashMap<SeqId, Live>,
}

impl Serving<'_> {
    /// A job leaves the channel (the queue-depth gauge counts the channel) for the engine.
    fn admit(&mut self, j: Job) {
        let q = &self.metrics.queue_depth;
        let _ = q.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
            Some(d.saturating_sub(1))
        });
        let shadowed = j.guard != GuardMode::Off && self.cfg.guard.is_some() && j.shadow.is_some();
        let spec = SeqSpec {
            prompt: j.prompt.clone(),
            plan: j.plan.clone(),
            max_new_tokens: j.max_new_tokens,
            sampling: j.sampling,
            stop: self.cfg.stop.clone(),
            capture_layers: self.capture_layers.clone(),
            shadow: if shadowed { j.shadow.clone() } else { None },
            deadline: Some(j.deadline),
        };
        let id = self.engine.submit(spec);
        self.live.insert(id, Live { job: j, shadowed });
    }

    /// Cancels the sequences whose client went away.
    fn cancel_gone(&mut self) {
        let gone: Vec<SeqId> = self
            .live
            .iter()
            .filter(|(_, l)| l.job.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.drop_seq(id);
        }
    }

    fn drop_seq(&mut self, id: SeqId) {
        self.engine.cancel(id);
        self.live.remove(&id);
    }

    /// Turns one engine event into the request's stream.
    fn dispatch(&mut self, ev: EngineEvent) {
        let id = ev.id();
        let Some(l) = self.live.get(&id) else {
            // Cancelled or blocked: nothing more goes out.
            return;
        };
        let send = |e: Event| l.job.events.send(e).is_ok();
        match ev {
            EngineEvent::Prefilled {
                prompt_tokens,
                captures,
                shadow,
                ..
            } => self.started(id, prompt_tokens, &captures, shadow.as_ref()),
            EngineEvent::Token { token, .. } => {
                if !send(Event::Token(token)) {
                    self.drop_seq(id);
                }
            }
            EngineEvent::Finished { finish, tokens, .. } => {
                let finish = match finish {
                    Finish::Stop => FinishReason::Stop,
                    Finish::Length => FinishReason::Length,
                };
                send(Event::Done {
                    finish,
                    completion_tokens: tokens,
                });
                self.live.remove(&id);
            }
            EngineEvent::TimedOut { tokens, .. } => {
                send(Event::Done {
                    finish: FinishReason::Timeout,
                    completion_tokens: tokens,
                });
                self.live.remove(&id);
            }
            EngineEvent::Failed { error, .. } => {
                eprintln!("[pgate serve] request failed: {error}");
                send(Event::Error(error));
                self.live.remove(&id);
            }
        }
    }

    /// After the prefill: projections, the guard's scores and verdict, `Started`; a blocked
    /// request ends here, before its first token.
    fn started(
        &mut self,
        id: SeqId,
        prompt_tokens: usize,
        caps: &LastToken,
        shadow: Option<&LastToken>,
    ) {
        let l = &self.live[&id];
        let projections = self.cfg.projector.project(caps);
        let report = match (&self.cfg.guard, l.job.guard) {
            (Some(g), m) if m != GuardMode::Off => {
                let r = match shadow.filter(|_| l.shadowed) {
                    Some(s) => g.score(s, Some(caps)),
                    None => g.score(caps, None),
                };
                match r {
                    Ok(r) => Some(r),
                    Err(e) => {
                        let _ = l.job.events.send(Event::Error(format!("guard: {e}")));
                        self.drop_seq(id);
                        return;
                    }
                }
            }
            _ => None,
        };
        let blocked = l.job.guard == GuardMode::Block && report.as_ref().is_some_and(|r| r.flagged);
        let _ = l.job.events.send(Event::Started {
            prompt_tokens,
            projections,
            guard: report,
            blocked,
        });
        if blocked {
            let _ = l.job.events.send(Event::Done {
                finish: FinishReason::ContentFilter,
                completion_tokens: 0,
            });
            self.drop_seq(id);
        }
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
