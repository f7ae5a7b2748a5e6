//! Running a study: generate every missing result, from local weights or through an endpoint as
//! the study file says, then grade with the study's model judges.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::judge::judge_phase;
use super::status::{status_of, StudyStatus};
use super::{refused, OpError, OpResult};
use crate::device::Device;
use crate::eval::judge::JudgeKind;
use crate::events::{Event, EventSink};
use crate::model::{DTypeMode, LoadOptions, Model};
use crate::study::judging::{JudgeOptions, JudgeSummary};
use crate::study::runner::run_study;
use crate::study::work::{RunEvent, RunOptions, RunSummary};
use crate::study::{run_endpoint_study, Store, Study};
use crate::Result;

/// What to run, where.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The study file (TOML).
    pub study: PathBuf,
    /// Results database (created if missing).
    pub db: PathBuf,
    /// Generate at most this many items in this run.
    pub limit: Option<usize>,
    /// `(index, count)`: only items of this shard.
    pub shard: Option<(u64, u64)>,
    /// How `shard` splits the items: by item hash (default) or balanced by expected tokens.
    pub shard_by: crate::study::cluster::ShardBy,
    /// Items generated between stop checks (local studies; default: 4 batches).
    pub wave: Option<usize>,
    /// Grade with the study's model judges after generating.
    pub judge: bool,
    /// Where the study's model and local judges run.
    pub device: Device,
    /// Endpoint studies: requests in flight (default: the endpoint's `concurrency`). Refused for
    /// local studies, which batch with `[generation] batch_size`.
    pub concurrency: Option<usize>,
}

/// The flags of `pgate study run`: a [`RunSpec`] in command-line form (the shard as `I/K`, the
/// device as `--cuda N`), plus `--gpus` for one worker per device
/// ([`crate::study::cluster::gpus::run_on_devices`]).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RunFlags {
    /// The study file (TOML).
    pub study: PathBuf,
    /// Results database (created if missing).
    #[cfg_attr(feature = "cli", arg(long, default_value = "results.sqlite"))]
    pub db: PathBuf,
    /// Generate at most N items in this run.
    #[cfg_attr(feature = "cli", arg(long))]
    pub limit: Option<usize>,
    /// Only items of shard I of K (I/K, e.g. 0/4); merge the shards with `pgate study merge`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub shard: Option<String>,
    /// How --shard splits the items: hash (default) or tokens (balanced prompt groups).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "hash"))]
    pub shard_by: crate::study::cluster::ShardBy,
    /// One worker per device (0,1 = cuda:0,cuda:1; `cpu` entries run CPU workers), each a
    /// token-balanced shard into DB.shards/, merged into --db at the end.
    #[cfg_attr(feature = "cli", arg(long, conflicts_with_all = ["shard", "cuda"]))]
    pub gpus: Option<String>,
    /// Items generated between stop checks (default: 4 batches).
    #[cfg_attr(feature = "cli", arg(long))]
    pub wave: Option<usize>,
    /// Skip the judging phase.
    #[cfg_attr(feature = "cli", arg(long))]
    pub no_judge: bool,
    /// Run on CUDA device N (needs a build with --features cuda).
    #[cfg_attr(feature = "cli", arg(long))]
    pub cuda: Option<usize>,
    /// Endpoint studies: requests in flight (default: the study's endpoint `concurrency`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub concurrency: Option<usize>,
}

impl RunFlags {
    /// The run the flags ask for (a malformed `--shard` or an unavailable device is refused here,
    /// before anything runs).
    pub fn spec(&self) -> OpResult<RunSpec> {
        Ok(RunSpec {
            shard: self.shard.as_deref().map(parse_shard).transpose()?,
            shard_by: self.shard_by,
            study: self.study.clone(),
            db: self.db.clone(),
            limit: self.limit,
            wave: self.wave,
            judge: !self.no_judge,
            device: crate::model::args::parse_device(None, self.cuda)?,
            concurrency: self.concurrency,
        })
    }
}

/// Where a run stopped early because the stop flag was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    /// While generating: the finished waves are stored, running again continues.
    Generating,
    /// While judging: every result is stored, judging again grades what is left.
    Judging,
}

/// What a study run did.
#[derive(Debug, Clone, Serialize)]
pub struct StudyRun {
    pub generation: RunSummary,
    /// The judges that ran after generating.
    pub judges: Vec<JudgeSummary>,
    pub stopped: Option<Stopped>,
    /// The study's progress after the run.
    pub status: StudyStatus,
}

impl StudyRun {
    /// Items of an endpoint study whose tries all failed in this run (left for the next run).
    pub fn gave_up(&self) -> usize {
        self.generation.endpoint.as_ref().map_or(0, |e| e.gave_up)
    }
}

/// Run the study of `spec`: generate its missing results (from the local model it names, or
/// through its endpoint), then grade them with its model judges. Events: the phases `generate`
/// (local) or `request` (endpoint) in `items`, then `judge` per judge; notes with the timings.
pub fn run(spec: &RunSpec, stop: &AtomicBool, sink: &mut dyn EventSink) -> OpResult<StudyRun> {
    let study = Study::load(&spec.study)?;
    let mut store = Store::open(&spec.db)?;
    if let Some((_, k)) = spec.shard {
        // The merge checks that every shard ran with the same split, and records it.
        let layout = crate::study::cluster::layout::layout(&study, spec.shard_by, k);
        store.put_meta(
            &crate::study::cluster::merge::layout_key(&study.hash),
            &serde_json::to_string(&layout).map_err(crate::Error::from)?,
        )?;
    }
    let opts = RunOptions {
        limit: spec.limit,
        shard: spec.shard,
        shard_by: spec.shard_by,
        wave: spec.wave,
        source_path: Some(spec.study.clone()),
        concurrency: spec.concurrency,
    };
    let generation = if study.endpoint().is_some() {
        generate_endpoint(&study, &mut store, &opts, stop, sink)?
    } else {
        if spec.concurrency.is_some() {
            return refused("--concurrency is for endpoint studies ([model] endpoint); local studies batch with [generation] batch_size".into());
        }
        generate_local(&study, &mut store, &opts, &spec.device, stop, sink)?
    };
    let mut judges = Vec::new();
    let mut stopped = None;
    if generation.interrupted {
        stopped = Some(Stopped::Generating);
    } else if spec.judge {
        for cfg in &study.file.judges {
            if cfg.kind == JudgeKind::Rules {
                continue;
            }
            let opts = JudgeOptions::default();
            judges.extend(judge_phase(
                &store,
                &study.hash,
                cfg,
                &spec.device,
                &opts,
                stop,
                sink,
            )?);
            if stop.load(Ordering::SeqCst) {
                stopped = Some(Stopped::Judging);
                break;
            }
        }
    }
    let status = status_of(&store, &store.find_study(Some(&study.hash))?)?;
    Ok(StudyRun {
        generation,
        judges,
        stopped,
        status,
    })
}

/// A shard given as `I/K` (`0/4`: the first of four): `(I, K)` with `0 <= I < K`.
pub fn parse_shard(s: &str) -> OpResult<(u64, u64)> {
    let Some((i, k)) = s.split_once('/') else {
        return refused(format!("--shard '{s}' must be I/K, e.g. 0/4"));
    };
    let num = |x: &str, what: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|e| OpError::Refused(format!("--shard '{s}': {what} is not a number: {e}")))
    };
    let (i, k) = (num(i, "I")?, num(k, "K")?);
    if k == 0 || i >= k {
        return refused(format!("--shard '{s}': need 0 <= I < K"));
    }
    Ok((i, k))
}

/// Load the study's model (its spec, dtype and batch invariance) and generate.
fn generate_local(
    study: &Study,
    store: &mut Store,
    opts: &RunOptions,
    device: &Device,
    stop: &AtomicBool,
    sink: &mut dyn EventSink,
) -> Result<RunSummary> {
    let m = &study.file.model;
    let t_load = Instant::now();
    let mut model = Model::load(
        &study.model_spec(),
        &LoadOptions {
            dtype: DTypeMode::parse(&m.dtype)?,
            device: device.clone(),
        },
    )?;
    model.decoder.set_batch_invariant(m.batch_invariant)?;
    sink.event(Event::Note(format!(
        "study {} ({}): {} conditions, {} prompt sets, model {} loaded in {:.1} s",
        study.name,
        &study.hash[..12],
        study.conditions.len(),
        study.prompt_sets.len(),
        model.info.name,
        t_load.elapsed().as_secs_f64()
    )));
    let mut progress = Progress::new("generate", sink);
    let summary = run_study(study, store, &model, opts, stop, &mut |ev| progress.on(ev))?;
    progress.end();
    sink.event(Event::Note(format!(
        "wrote {} results in {:.1} s ({} decode tokens)",
        summary.written, summary.secs, summary.decode_tokens
    )));
    if summary.decode_secs > 0.0 {
        sink.event(Event::Note(format!(
            "engine: prefill {:.1} tok/s, decode {:.1} tok/s; {:.1}% of wall time outside the engine (labels, scores, storage); {:.1} generated tok/s end to end",
            summary.prefill_tokens as f64 / summary.prefill_secs.max(1e-9),
            summary.decode_tokens as f64 / summary.decode_secs,
            100.0 * summary.overhead_fraction(),
            summary.decode_tokens as f64 / summary.secs.max(1e-9),
        )));
    }
    Ok(summary)
}

/// Send the study's requests to its endpoint; no model is loaded.
fn generate_endpoint(
    study: &Study,
    store: &mut Store,
    opts: &RunOptions,
    stop: &AtomicBool,
    sink: &mut dyn EventSink,
) -> Result<RunSummary> {
    if let Some(ep) = study.endpoint() {
        sink.event(Event::Note(format!(
            "study {} ({}): {} conditions, {} prompt sets, endpoint {} model {} (black box: persona / system prompts and sampling only), {} requests in flight",
            study.name,
            &study.hash[..12],
            study.conditions.len(),
            study.prompt_sets.len(),
            ep.normalized_base(),
            ep.model,
            opts.concurrency.unwrap_or(ep.concurrency)
        )));
    }
    let mut progress = Progress::new("request", sink);
    let summary = run_endpoint_study(study, store, opts, stop, &mut |ev| progress.on(ev))?;
    progress.end();
    let e = summary.endpoint.clone().unwrap_or_default();
    sink.event(Event::Note(format!(
        "wrote {} results in {:.1} s: {:.2} items/s, {:.1} completion tok/s at {} in flight; {} tries, {} failed (recorded), {} items gave up{}",
        summary.written,
        summary.secs,
        summary.written as f64 / summary.secs.max(1e-9),
        e.completion_tokens as f64 / summary.secs.max(1e-9),
        e.concurrency,
        e.requests,
        e.failed_tries,
        e.gave_up,
        if e.gave_up > 0 { " (run again to retry them)" } else { "" }
    )));
    sink.event(Event::Note(format!(
        "usage: {} prompt + {} completion tokens{}; server reported model {}",
        e.prompt_tokens,
        e.completion_tokens,
        e.cost
            .map(|c| format!(", estimated cost {c:.4}"))
            .unwrap_or_default(),
        if e.reported_models.is_empty() {
            "-".to_string()
        } else {
            e.reported_models.join(", ")
        }
    )));
    Ok(summary)
}

/// The runners' events as a phase of generic events: the plan as a note, one row (condition and
/// label) and one progress step per stored result.
struct Progress<'s> {
    sink: &'s mut dyn EventSink,
    /// `generate` or `request`: what happens to the pending items.
    phase: &'static str,
    done: usize,
    total: usize,
}

impl<'s> Progress<'s> {
    fn new(phase: &'static str, sink: &'s mut dyn EventSink) -> Self {
        Self {
            sink,
            phase,
            done: 0,
            total: 0,
        }
    }

    fn on(&mut self, ev: RunEvent<'_>) {
        match ev {
            RunEvent::Planned { planned, summary } => {
                self.total = planned;
                self.sink.event(Event::Phase {
                    name: self.phase.into(),
                    unit: "items".into(),
                    total: planned,
                });
                let others = if summary.other_shards > 0 {
                    format!(", {} in other shards", summary.other_shards)
                } else {
                    String::new()
                };
                self.sink.event(Event::Note(format!(
                    "{} items: {} stored, {} to {}{others}",
                    summary.total, summary.already, planned, self.phase
                )));
            }
            RunEvent::Written { condition, label } => {
                self.done += 1;
                self.sink.event(Event::Row {
                    key: condition.to_string(),
                    outcome: label.name().to_string(),
                });
                self.sink.event(Event::Progress {
                    done: self.done,
                    total: self.total,
                });
            }
        }
    }

    fn end(self) {
        self.sink.event(Event::PhaseEnd {
            name: self.phase.into(),
        });
    }
}
