//! One study over the GPUs of one node: one worker thread per device, each running shard I of N
//! (token-balanced) into its own database with its own copy of the model, then the checked merge
//! into the study's database, with one progress display for all of them.
//!
//! Why threads and shards rather than one batch spread over devices: the workers share nothing
//! (each has its model, its KV cache, its database), so a run scales with the devices as a Slurm
//! array does, and the result is the merge a cluster run produces, row for row. The worker
//! databases stay beside the study database (`DB.shards/`), so an interrupted run continues where
//! each worker stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Instant;

use serde::Serialize;

use super::layout::ShardBy;
use super::merge::{merge_shards, ShardMerge};
use crate::device::Device;
use crate::events::{Event, EventSink};
use crate::study::ops::{self, OpError, OpResult, RunSpec, StudyRun};
use crate::study::plan::Study;

/// What a run over several devices did.
#[derive(Debug, Clone, Serialize)]
pub struct DevicesRun {
    /// Each worker's device (as written) and run.
    pub workers: Vec<(String, StudyRun)>,
    pub merge: ShardMerge,
    /// Wall time of the workers (load, generate) and of the merge, seconds.
    pub run_secs: f64,
    pub merge_secs: f64,
}

impl DevicesRun {
    /// Merge time over the whole run: what splitting costs beyond the generation itself.
    pub fn merge_fraction(&self) -> f64 {
        self.merge_secs / (self.run_secs + self.merge_secs).max(1e-9)
    }
}

/// The database of worker `i` for the study database `db`.
pub fn worker_db(db: &Path, i: usize) -> PathBuf {
    let mut dir = db.as_os_str().to_owned();
    dir.push(".shards");
    PathBuf::from(dir).join(format!("worker-{i}.sqlite"))
}

/// Devices from `--gpus`: `0,1` (CUDA ordinals) or device names (`cuda:0`, and `cpu` to try the
/// split without a GPU; `cpu,cpu` runs two CPU workers).
pub fn parse_devices(list: &str) -> OpResult<Vec<String>> {
    let names: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.chars().all(|c| c.is_ascii_digit()) {
                format!("cuda:{s}")
            } else {
                s.to_string()
            }
        })
        .collect();
    if names.is_empty() {
        return Err(OpError::Refused(format!(
            "--gpus '{list}' names no device (e.g. --gpus 0,1)"
        )));
    }
    Ok(names)
}

/// Run `spec` with one worker per device of `names` (shard I of N on device I), then merge.
/// `spec.shard` must be unset: the devices are the shards.
pub fn run_on_devices(
    spec: &RunSpec,
    names: &[String],
    stop: &AtomicBool,
    sink: &mut dyn EventSink,
) -> OpResult<DevicesRun> {
    let devices: Vec<Device> = names
        .iter()
        .map(|d| crate::device::parse(d))
        .collect::<crate::Result<_>>()?;
    if devices.is_empty() {
        return Err(OpError::Refused("--gpus names no device".into()));
    }
    if spec.shard.is_some() {
        return Err(OpError::Refused(
            "--gpus splits the study itself: leave out --shard".into(),
        ));
    }
    let study = Study::load(&spec.study)?;
    let n = devices.len();
    let dbs: Vec<PathBuf> = (0..n).map(|i| worker_db(&spec.db, i)).collect();
    if let Some(dir) = dbs[0].parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let tx = tx.clone();
                let w = RunSpec {
                    db: dbs[i].clone(),
                    shard: Some((i as u64, n as u64)),
                    shard_by: ShardBy::Tokens,
                    judge: false,
                    device: d.clone(),
                    ..spec.clone()
                };
                s.spawn(move || {
                    let mut send = |e: Event| {
                        let _ = tx.send((i, e));
                    };
                    ops::run(&w, stop, &mut send)
                })
            })
            .collect();
        drop(tx);
        relay(rx, n, names, sink);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(OpError::Refused("a device worker panicked".into())))
            })
            .collect::<Vec<_>>()
    });
    let run_secs = t0.elapsed().as_secs_f64();
    let mut workers = Vec::new();
    for (d, r) in names.iter().zip(results) {
        workers.push((d.clone(), r?));
    }
    let t1 = Instant::now();
    let merge = merge_shards(&spec.db, &study, Some(&spec.study), &dbs)?;
    let merge_secs = t1.elapsed().as_secs_f64();
    let model_judges = study
        .file
        .judges
        .iter()
        .any(|j| j.kind != crate::eval::judge::JudgeKind::Rules);
    if spec.judge && merge.complete() && model_judges {
        let j = ops::JudgeSpec {
            study: Some(study.hash.clone()),
            file: None,
            judge: None,
            options: Default::default(),
            device: devices[0].clone(),
        };
        ops::judge(&spec.db, &j, stop, sink)?;
    }
    sink.event(Event::Note(format!(
        "merged {} workers in {:.2} s ({:.2}% of the run)",
        n,
        merge_secs,
        100.0 * merge_secs / (run_secs + merge_secs).max(1e-9)
    )));
    Ok(DevicesRun {
        workers,
        merge,
        run_secs,
        merge_secs,
    })
}

/// Forward the workers' events as one operation: notes tagged with the device, one phase whose
/// total and progress are the workers' sums.
fn relay(rx: mpsc::Receiver<(usize, Event)>, n: usize, names: &[String], sink: &mut dyn EventSink) {
    let mut done = vec![0usize; n];
    let mut total = vec![0usize; n];
    let mut phase: Option<String> = None;
    for (i, e) in rx {
        match e {
            Event::Phase {
                name,
                unit,
                total: t,
            } => {
                total[i] = t;
                if phase.is_none() {
                    phase = Some(name.clone());
                    sink.event(Event::Phase {
                        name,
                        unit,
                        total: total.iter().sum(),
                    });
                }
            }
            Event::Progress { done: d, .. } => {
                done[i] = d;
                sink.event(Event::Progress {
                    done: done.iter().sum(),
                    total: total.iter().sum(),
                });
            }
            Event::PhaseEnd { .. } => {}
            Event::Note(m) => sink.event(Event::Note(format!("[{}] {m}", names[i]))),
            Event::Warning(m) => sink.event(Event::Warning(format!("[{}] {m}", names[i]))),
            e @ Event::Row { .. } => sink.event(e),
        }
    }
    if let Some(name) = phase {
        sink.event(Event::PhaseEnd { name });
    }
}
