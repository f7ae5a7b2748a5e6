//! Labelers: the parts that turn (request, output) into `refusal` / `bypass` / `degenerate`.
//!
//! Every rate persona-gate reports rests on these labels, so each labeler is a named, versioned part
//! behind one interface ([`Labeler`]) and is measured against careful reading: the development set
//! ([`devset`], labeled by `docs/labels.md`) has a tuning split and a held-back split, and
//! [`devset::evaluate`] gives the confusion matrix and per-class precision / recall with intervals.
//!
//! - [`rules`]: rules v2, phrase and shape rules widened by the guideline (no model);
//! - [`features`]: one teacher-forced pass of the *unsteered, default-persona* reader model over
//!   request + output: mean residuals over the output at chosen layers, the refusal direction's
//!   projection, per-token loss;
//! - [`probe`]: logistic probes on those features (refusal vs bypass, and a degenerate detector),
//!   stored as a versioned file with the hashes of their training data and reader model;
//! - [`ensemble`]: the documented rule that combines them (the default labeler);
//! - [`jsonl`]: `pgate label`'s rows in and out;
//! - [`ops`]: whole operations on rows in memory; [`files`]: the same over files, with reports.

pub mod accuracy;
pub mod devset;
pub mod ensemble;
pub mod features;
pub mod files;
pub mod jsonl;
pub mod linear;
pub mod ops;
pub mod probe;
pub mod rules;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::eval::Label;
use crate::Result;

/// What a labeler reads: the request, the output, and the system prompt it was generated under
/// (labelers read the request without it: the label is about what the answer does, not the persona).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelInput {
    #[serde(default)]
    pub id: Option<String>,
    pub prompt: String,
    pub output: String,
    #[serde(default)]
    pub system: Option<String>,
}

/// One labeler's verdict on one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelVerdict {
    pub label: Label,
    /// Numbers behind the label (probabilities, losses, rule measurements), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scores: BTreeMap<String, f64>,
    /// One line a reader can check.
    pub reason: String,
    /// The parts' own verdicts, for an ensemble.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, Label>,
}

impl LabelVerdict {
    pub fn new(label: Label, reason: impl Into<String>) -> Self {
        LabelVerdict {
            label,
            scores: BTreeMap::new(),
            reason: reason.into(),
            parts: BTreeMap::new(),
        }
    }
}

/// Name and version of a labeler, stored with every label it gives (`rules@2`, `probe@1:ab12cd34`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelerId {
    pub name: String,
    pub version: u32,
    /// For trained labelers: the first 16 hex digits of the probe file's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
}

impl std::fmt::Display for LabelerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)?;
        if let Some(a) = &self.artifact {
            write!(f, ":{a}")?;
        }
        Ok(())
    }
}

/// Progress of a labeling run (rows done, rows in all).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);

/// A labeler: one interface for rules, probes, judges and ensembles.
pub trait Labeler {
    fn id(&self) -> LabelerId;
    /// Label a batch of rows, one verdict per row in order. Errors abort the batch (callers keep
    /// what they had); per-row problems (an unreadable row) become a verdict with a reason.
    fn label_batch(
        &mut self,
        rows: &[LabelInput],
        progress: Progress<'_>,
    ) -> Result<Vec<LabelVerdict>>;
}

/// The labeler names `pgate label --labeler` takes.
pub const LABELER_NAMES: &[&str] = &["rules", "rules-v1", "probe", "ensemble", "judge"];
