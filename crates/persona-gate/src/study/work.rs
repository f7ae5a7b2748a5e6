//! What a run of a study sets out to do and what it did: the options, the pending work items, the
//! summary and progress events that local runs (`runner`) and endpoint runs (`remote`) share.
//!
//! Why its own module: both runners plan, report and resume the same way, so these types belong to
//! neither; with them here the two runners depend on this module and not on each other.

use serde::{Deserialize, Serialize};

use super::plan::{in_shard, Study, WorkItem};
use super::store::Store;
use crate::eval::Label;
use crate::Result;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Generate at most this many items in this run.
    pub limit: Option<usize>,
    /// `(index, count)`: only items whose hash falls in this shard.
    pub shard: Option<(u64, u64)>,
    /// How `shard` splits the items (see `cluster::layout`).
    pub shard_by: super::cluster::ShardBy,
    /// Items per wave (default 4 batches).
    pub wave: Option<usize>,
    /// The study file, recorded with the study.
    pub source_path: Option<std::path::PathBuf>,
    /// Endpoint studies: requests in flight (default: the endpoint's `concurrency`).
    pub concurrency: Option<usize>,
}

/// What happened in a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunSummary {
    /// Work items of the study.
    pub total: usize,
    /// Already stored before this run.
    pub already: usize,
    /// Left to other shards.
    pub other_shards: usize,
    /// Pending items this run set out to generate (after shard and limit).
    pub planned: usize,
    /// Results written by this run.
    pub written: usize,
    /// Stopped by the stop flag before finishing.
    pub interrupted: bool,
    pub secs: f64,
    pub decode_tokens: usize,
    /// Time inside the engine's decode steps (forward + sampling), seconds.
    pub decode_secs: f64,
    pub prefill_tokens: usize,
    /// Time inside prefill forwards, seconds.
    pub prefill_secs: f64,
    /// Endpoint studies: requests, failures, token usage (see `remote`).
    #[serde(default)]
    pub endpoint: Option<EndpointRunStats>,
}

impl RunSummary {
    /// Share of the wall time spent outside the engine's forwards: tokenizing, labelling,
    /// scoring, writing rows, cache bookkeeping. What a study adds on top of `pgate bench`.
    pub fn overhead_fraction(&self) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        (1.0 - (self.decode_secs + self.prefill_secs) / self.secs).max(0.0)
    }
}

/// Events for progress displays.
#[derive(Debug, Clone)]
pub enum RunEvent<'a> {
    /// Before generating: how much there is to do.
    Planned {
        planned: usize,
        summary: &'a RunSummary,
    },
    /// A result was written.
    Written { condition: &'a str, label: Label },
}

/// The items of `study` still to run in this invocation (not stored, in this shard, within
/// `--limit`), with the summary's counts filled in. Local and endpoint runs share it, so both
/// resume and shard identically.
pub(crate) fn plan_pending(
    study: &Study,
    store: &Store,
    opts: &RunOptions,
) -> Result<(Vec<WorkItem>, RunSummary)> {
    let done = store.done_keys(&study.hash)?;
    let items = study.items();
    let mut summary = RunSummary {
        total: items.len(),
        ..Default::default()
    };
    let mut pending: Vec<WorkItem> = Vec::new();
    // Token-balanced shards need the whole study's layout; hash shards decide item by item.
    let balanced = match opts.shard {
        Some((_, k)) if opts.shard_by == super::cluster::ShardBy::Tokens => {
            Some(super::cluster::layout::assign(study, opts.shard_by, k))
        }
        _ => None,
    };
    let in_this_shard = |it: &WorkItem| match (opts.shard, &balanced) {
        (None, _) => true,
        (Some((i, _)), Some(of)) => of.get(&it.item_hash) == Some(&i),
        (Some((i, k)), None) => in_shard(&it.item_hash, i, k),
    };
    for it in items {
        let set = &study.prompt_sets[it.set];
        let key = (
            study.conditions[it.condition].hash.clone(),
            set.hash.clone(),
            set.items[it.prompt].id.clone(),
            it.sample as i64,
        );
        if done.contains(&key) {
            summary.already += 1;
        } else if !in_this_shard(&it) {
            summary.other_shards += 1;
        } else {
            pending.push(it);
        }
    }
    if let Some(n) = opts.limit {
        pending.truncate(n);
    }
    summary.planned = pending.len();
    Ok((pending, summary))
}

/// What an endpoint run did, beyond [`RunSummary`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointRunStats {
    pub base_url: String,
    pub model: String,
    pub concurrency: usize,
    /// Tries sent (successful and failed).
    pub requests: usize,
    pub failed_tries: usize,
    /// Items whose tries all failed in this run (left missing for the next run).
    pub gave_up: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Answers without `usage` (their token counts are stored as 0).
    pub without_usage: usize,
    /// Distinct `model` names in the answers.
    pub reported_models: Vec<String>,
    /// `GET /models` of the server, when it answered.
    pub server_models: Option<Vec<String>>,
    /// Estimated cost of this run's answers (when the study gives both prices).
    pub cost: Option<f64>,
}
