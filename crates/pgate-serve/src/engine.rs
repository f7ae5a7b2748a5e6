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

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, D};
use persona_gate::generate::{Sampler, Sampling};
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
}

struct Seq {
    job: Job,
    produced: usize,
    sampler: Sampler,
    next: u32,
}

/// Run the loop until every sender of `rx` is gone and no sequence is left.
pub fn run(model: Arc<Model>, cfg: EngineConfig, rx: Receiver<Job>, metrics: Arc<Metrics>) {
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
        running: Vec::new(),
        cache: KvCache::new(n_layers),
    };
    let mut open = true;
    while open || !st.running.is_empty() {
        // Intake: block while idle, else take what fits without waiting.
        let mut new = Vec::new();
        if st.running.is_empty() {
            match rx.recv() {
                Ok(j) => new.push(j),
                Err(_) => break,
            }
        }
        while open && st.running.len() + new.len() < cfg.batch_size {
            match rx.try_recv() {
                Ok(j) => new.push(j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        metrics.queue_depth.fetch_sub(
            new.len().min(metrics.queue_depth.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
            if !new.is_empty() {
                st.prefill(new)?;
            }
            st.drop_gone()?;
            if !st.running.is_empty() {
                st.decode_step()?;
            }
            Ok(())
        }));
        let err = match step {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(p) => Some(format!(
                "engine panic: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        if let Some(e) = err {
            eprintln!(
                "[pgate serve] engine error, failing {} sequences: {e}",
                st.running.len()
            );
            for s in st.running.drain(..) {
                let _ = s.job.events.send(Event::Error(e.clone()));
            }
            st.cache = KvCache::new(n_layers);
        }
        metrics.running.store(st.running.len(), Ordering::Relaxed);
    }
}

struct State<'a> {
    model: &'a Model,
    cfg: &'a EngineConfig,
    metrics: &'a Metrics,
    capture_layers: Vec<usize>,
    n_layers: usize,
    running: Vec<Seq>,
    cache: KvCache,
}

impl State<'_> {
    fn forward(
        &self,
        tokens: &Tensor,
        rows: &[RowCtx],
        cache: &mut KvCache,
        plans: &[Option<Arc<CompiledPlan>>],
        capture: Option<&mut LastTokenCapture>,
    ) -> Result<Tensor> {
        let mut plan_hook = PlanHook::new(plans, self.n_layers);
        let dec = &self.model.decoder;
        let active = plan_hook.is_active();
        let logits = match (active, capture) {
            (false, None) => dec.forward(tokens, rows, cache, None, LogitsAt::Last)?,
            (true, None) => {
                dec.forward(tokens, rows, cache, Some(&mut plan_hook), LogitsAt::Last)?
            }
            (false, Some(c)) => dec.forward(tokens, rows, cache, Some(c), LogitsAt::Last)?,
            (true, Some(c)) => {
                let mut chain = HookChain(vec![&mut plan_hook as &mut dyn ResidualHook, c]);
                dec.forward(tokens, rows, cache, Some(&mut chain), LogitsAt::Last)?
            }
        };
        logits.ok_or_else(|| Error::InvalidValue("model returned no logits".into()))
    }

    /// Prefill new jobs (with guard shadow rows), send `Started` and the first token, merge the
    /// survivors into the running batch.
    fn prefill(&mut self, jobs: Vec<Job>) -> Result<()> {
        let now = Instant::now();
        let mut jobs: Vec<Job> = jobs
            .into_iter()
            .filter(|j| {
                if j.events.is_closed() {
                    return false;
                }
                if now >= j.deadline {
                    let _ = j.events.send(Event::Done {
                        finish: FinishReason::Timeout,
                        completion_tokens: 0,
                    });
                    return false;
                }
                true
            })
            .collect();
        if jobs.is_empty() {
            return Ok(());
        }
        let guard = self.cfg.guard.as_ref();
        // Rows: every job's served prompt first, then the shadows of guarded jobs.
        let mut prompts: Vec<&[u32]> = jobs.iter().map(|j| j.prompt.as_slice()).collect();
        let mut plans: Vec<Option<Arc<CompiledPlan>>> =
            jobs.iter().map(|j| j.plan.clone()).collect();
        let mut shadow_row: Vec<Option<usize>> = vec![None; jobs.len()];
        for (i, j) in jobs.iter().enumerate() {
            if j.guard != GuardMode::Off && guard.is_some() {
                if let Some(s) = &j.shadow {
                    shadow_row[i] = Some(prompts.len());
                    prompts.push(s);
                    plans.push(None);
                }
            }
        }
        let n_rows = prompts.len();
        let dev = self.model.decoder.device().clone();
        let (tokens, rows) = persona_gate::generate::left_padded(&prompts, &dev)?;
        let mut new_cache = KvCache::new(self.n_layers);
        let mut cap = (!self.capture_layers.is_empty())
            .then(|| LastTokenCapture::new(self.n_layers, self.capture_layers.iter().copied()));
        let logits = self.forward(&tokens, &rows, &mut new_cache, &plans, cap.as_mut())?;
        let caps = match cap.as_mut() {
            Some(c) => split_rows(&c.take(), n_rows)?,
            None => vec![Vec::new(); n_rows],
        };
        // First tokens of the served rows.
        let served = logits.narrow(0, 0, jobs.len())?;
        let mut samplers: Vec<Sampler> = jobs.iter().map(|j| Sampler::new(j.sampling)).collect();
        let firsts = pick(
            &served,
            &jobs.iter().map(|j| j.sampling).collect::<Vec<_>>(),
            &mut samplers,
        )?;
        let mut keep = Vec::new();
        for (i, ((job, sampler), tok)) in jobs.drain(..).zip(samplers).zip(firsts).enumerate() {
            let projections = self.cfg.projector.project(&caps[i]);
            let report = match (guard, job.guard) {
                (Some(g), m) if m != GuardMode::Off => {
                    let r = match shadow_row[i] {
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
            self.running.push(Seq {
                job,
                produced: 1,
                sampler,
                next: tok,
            });
        }
        if keep.len() != n_rows {
            new_cache.select(&keep)?;
        }
        if !keep.is_empty() {
            let cache = std::mem::replace(&mut self.cache, KvCache::new(self.n_layers));
            let mut merged = cache;
            merged.merge(new_cache)?;
            self.cache = merged;
        }
        Ok(())
    }

    /// Remove sequences whose client left or whose deadline passed.
    fn drop_gone(&mut self) -> Result<()> {
        let now = Instant::now();
        let mut keep = Vec::with_capacity(self.running.len());
        let mut still = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.drain(..).enumerate() {
            if s.job.events.is_closed() {
                continue;
            }
            if now >= s.job.deadline {
                let _ = s.job.events.send(Event::Done {
                    finish: FinishReason::Timeout,
                    completion_tokens: s.produced,
                });
                continue;
            }
            keep.push(i);
            still.push(s);
        }
        let before = self.cache.batch();
        self.running = still;
        if keep.len() != before {
            self.cache.select(&keep)?;
        }
        Ok(())
    }

    fn decode_step(&mut self) -> Result<()> {
        let b = self.running.len();
        let ids: Vec<u32> = self.running.iter().map(|s| s.next).collect();
        let rows: Vec<RowCtx> = self
            .running
            .iter()
            .enumerate()
            .map(|(bi, s)| RowCtx {
                seq: bi,
                chunk_pad: 0,
                start_pos: self.cache.next_position(bi),
                prompt_len: s.job.prompt.len(),
            })
            .collect();
        let plans: Vec<Option<Arc<CompiledPlan>>> =
            self.running.iter().map(|s| s.job.plan.clone()).collect();
        let dev = self.model.decoder.device().clone();
        let tokens = Tensor::from_vec(ids, (b, 1), &dev)?;
        let mut cache = std::mem::replace(&mut self.cache, KvCache::new(self.n_layers));
        let logits = self.forward(&tokens, &rows, &mut cache, &plans, None);
        self.cache = cache;
        let logits = logits?;
        let sampling: Vec<Sampling> = self.running.iter().map(|s| s.job.sampling).collect();
        let mut samplers: Vec<Sampler> = Vec::new();
        // Samplers live in the sequences; move them out for the pick and back.
        for s in self.running.iter_mut() {
            samplers.push(std::mem::replace(
                &mut s.sampler,
                Sampler::new(Sampling::greedy()),
            ));
        }
        let picks = pick(&logits, &sampling, &mut samplers)?;
        for (s, sm) in self.running.iter_mut().zip(samplers) {
            s.sampler = sm;
        }
        self.metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .decode_tokens
            .fetch_add(b as u64, Ordering::Relaxed);
        let mut keep = Vec::with_capacity(b);
        let mut still = Vec::with_capacity(b);
        for (bi, (mut s, tok)) in self.running.drain(..).zip(picks).enumerate() {
            s.produced += 1;
            s.next = tok;
            if s.job.events.send(Event::Token(tok)).is_err() {
                continue;
            }
            let stop = self.cfg.stop.contains(&tok);
            if stop || s.produced >= s.job.max_new_tokens {
                let _ = s.job.events.send(Event::Done {
                    finish: if stop {
                        FinishReason::Stop
                    } else {
                        FinishReason::Length
                    },
                    completion_tokens: s.produced,
                });
                continue;
            }
            keep.push(bi);
            still.push(s);
        }
        self.running = still;
        if keep.len() != b {
            self.cache.select(&keep)?;
        }
        Ok(())
    }
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
