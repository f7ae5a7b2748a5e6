//! How far a study is: done / total per condition and prompt set, and for an endpoint study its
//! target, what the server reported, failed tries, token usage and estimated cost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::OpResult;
use crate::study::store::{EndpointUsage, StatusRow, StudyRecord};
use crate::study::Store;
use crate::Result;

/// Progress of one study.
#[derive(Debug, Clone, Serialize)]
pub struct StudyStatus {
    /// The study's name.
    pub study: String,
    pub hash: String,
    /// The results database (not in the JSON form, which keeps the keys `pgate study status
    /// --json` has always printed).
    #[serde(skip)]
    pub db: PathBuf,
    pub conditions: Vec<StatusRow>,
    pub done: usize,
    pub total: usize,
    /// Endpoint studies only (not in the JSON form, as `db`).
    #[serde(skip)]
    pub endpoint: Option<EndpointStatus>,
}

/// The endpoint side of an endpoint study's status.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    /// As recorded in the study's target (None: the record lacks it).
    pub base_url: Option<String>,
    pub model: Option<String>,
    /// Every distinct `model` name the server put in its answers.
    pub reported_models: Vec<String>,
    pub conditions: Vec<ConditionUsage>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Estimated cost of every stored answer (None: the study gives no prices).
    pub cost: Option<f64>,
    /// Failed tries recorded over all runs, and how many of each kind.
    pub failed_tries: usize,
    pub failure_kinds: BTreeMap<String, usize>,
}

/// Token usage of one condition, with its estimated cost.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionUsage {
    #[serde(flatten)]
    pub usage: EndpointUsage,
    pub cost: Option<f64>,
}

/// The status of a study in `db` (`which`: name or hash prefix; `None`: the latest run).
pub fn status(db: &Path, which: Option<&str>) -> OpResult<StudyStatus> {
    let store = Store::open_read(db)?;
    let rec = store.find_study(which)?;
    Ok(status_of(&store, &rec)?)
}

/// The status of a study of an open store.
pub(crate) fn status_of(store: &Store, rec: &StudyRecord) -> Result<StudyStatus> {
    let conditions = store.status(&rec.hash)?;
    Ok(StudyStatus {
        study: rec.name.clone(),
        hash: rec.hash.clone(),
        db: store.path().to_path_buf(),
        done: conditions.iter().map(|r| r.done).sum(),
        total: conditions.iter().map(|r| r.total).sum(),
        conditions,
        endpoint: endpoint_status(store, rec)?,
    })
}

/// None for a study of local weights (it has no recorded target).
fn endpoint_status(store: &Store, rec: &StudyRecord) -> Result<Option<EndpointStatus>> {
    let Some(t) = store.target(&rec.hash)? else {
        return Ok(None);
    };
    // Prices are client settings of the study file, not part of the recorded target.
    let prices = rec
        .study_file()
        .ok()
        .and_then(|f| f.model.endpoint().cloned());
    let cost = |p: u64, c: u64| prices.as_ref().and_then(|e| e.cost(p, c));
    let conditions: Vec<ConditionUsage> = store
        .endpoint_usage(&rec.hash)?
        .into_iter()
        .map(|u| ConditionUsage {
            cost: cost(u.prompt_tokens, u.completion_tokens),
            usage: u,
        })
        .collect();
    let prompt_tokens = conditions.iter().map(|u| u.usage.prompt_tokens).sum();
    let completion_tokens = conditions.iter().map(|u| u.usage.completion_tokens).sum();
    let failures = store.endpoint_failures(&rec.hash)?;
    let mut failure_kinds = BTreeMap::new();
    for f in &failures {
        *failure_kinds.entry(f.kind.clone()).or_default() += 1;
    }
    let text = |k: &str| t.target[k].as_str().map(str::to_string);
    Ok(Some(EndpointStatus {
        base_url: text("base_url"),
        model: text("model"),
        reported_models: t.reported_models,
        conditions,
        prompt_tokens,
        completion_tokens,
        cost: cost(prompt_tokens, completion_tokens),
        failed_tries: failures.len(),
        failure_kinds,
    }))
}
