//! The parts of a receipt that the statistics fill ([`super::stats`]): per-set results, controls,
//! the condition's ops and prompt sets, the labels block, and the hashes over rows and labels.
//!
//! Why a module of its own: the receipt builder ([`super::receipt`]) calls the statistics, and the
//! statistics produce these records; with the records here, neither imports the other's file in a
//! circle. `receipt` re-exports every item, so `report::receipt::SetResults` etc. still name them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::provenance::LabelProvenance;
use super::rows::row_line;
use crate::eval::paired::paired_bootstrap;
use crate::eval::Rate;
use crate::label::accuracy::{self, LabelerAccuracy};
use crate::study::canon::canonical_json;
use crate::study::report::{JudgeStats, PairedVs};
use crate::study::store::RowView;
use crate::Result;

/// One intervention of a condition, in application order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRecord {
    /// `add`, `add_raw`, `ablate` or `cap` (the study-file field).
    pub field: String,
    /// The spec as written in the study file.
    pub spec: String,
    /// The direction's name in the study (`[directions]`), or the file name for a path.
    pub direction: String,
    /// `persona`, `refusal` or `random` (see docs/receipt.md: by name and provenance).
    pub role: String,
    /// The direction file (relative to the study file's folder as written), None for a generated one.
    pub file: Option<String>,
    /// `{"sha256": ...}` for a file; the recipe (seed, generator, what it matches) for a random one.
    pub identity: Value,
    pub coeff: Option<f64>,
    pub raw: bool,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    /// `[L]`: layer L's vector used at every listed layer.
    pub pick: Option<usize>,
    pub layers: Vec<usize>,
    /// `all`, `prompt` or `generated`.
    pub positions: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConditionRecord {
    pub name: String,
    /// The condition hash (key of its result rows).
    pub hash: String,
    /// Position in the study (0-based).
    pub ord: usize,
    pub is_baseline: bool,
    /// Persona mode name (built-in or the study's), if any.
    pub persona: Option<String>,
    /// The system prompt text given to the model (None: the chat template's default).
    pub system_prompt: Option<String>,
    pub system_prompt_sha256: Option<String>,
    pub ops: Vec<OpRecord>,
    /// Sweep variables that made the condition.
    pub vars: BTreeMap<String, String>,
    /// Exactly what the condition hash covers (canonical JSON of it hashes to `hash`).
    pub hashed: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub samples: usize,
    /// How each item's sampling seed derives from `seed` (per-item seeds are in the database).
    pub seed_rule: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptSetRecord {
    pub name: String,
    /// `harmful` or `benign` (benign sets measure over-refusal).
    pub family: String,
    /// As written in the study file (a path or a set name).
    pub source: String,
    /// sha256 of the whole set before skip / n (`PromptSet::sha256`; the result key).
    pub set_sha256: String,
    /// sha256 of the prompts used, in order: id, text, category of each (same form as set_sha256).
    pub selected_sha256: String,
    pub skip: usize,
    pub n: usize,
    /// Prompts per category among those used.
    pub categories: BTreeMap<String, usize>,
}

/// A mean with a 95% interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeanCi {
    pub n: usize,
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
    /// `bootstrap-percentile` (resamples and seed of the study's `[stats]`).
    pub method: String,
}

/// A judge score over one prompt set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgedScore {
    pub judge: String,
    pub score: MeanCi,
}

/// A judged rate over one prompt set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgedRate {
    pub judge: String,
    pub rate: Rate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CategoryRates {
    pub category: String,
    pub n: usize,
    pub refusal: Rate,
    pub bypass: Rate,
    pub degenerate: Rate,
}

/// What happened on one prompt set under the condition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetResults {
    pub prompt_set: String,
    pub prompt_set_sha256: String,
    pub family: String,
    /// Work items of this condition on this set, and how many have a stored result.
    pub expected: usize,
    pub n: usize,
    pub refusal: Rate,
    pub bypass: Rate,
    pub degenerate: Rate,
    /// Mean rule-based leakage proxy of every row (`eval::judge::rule_leakage`).
    pub leakage_rule: MeanCi,
    /// StrongREJECT rubric score (mean), from the first judge that gave one; None: not judged.
    pub strongreject: Option<JudgedScore>,
    /// Unsafe rate from the first safety judge; None: not judged.
    pub unsafe_rate: Option<JudgedRate>,
    /// Judge-reported leakage (mean), from the first judge that gave one; None: not judged.
    pub leakage_judged: Option<JudgedScore>,
    /// Every judge's statistics, failures included.
    pub judges: Vec<JudgeStats>,
    pub by_category: Vec<CategoryRates>,
    /// Refusal against the baseline over the same (prompt, sample) pairs; None for the baseline.
    pub vs_baseline: Option<PairedVs>,
    /// sha256 over the canonical JSON of every result row (outputs, labels, measurements, verdicts).
    pub rows_sha256: String,
    pub first_result_at: Option<String>,
    pub last_result_at: Option<String>,
}

/// A random-direction control of this condition: the same condition with a random direction in
/// place of a persona or refusal direction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RandomControl {
    pub condition: String,
    pub condition_hash: String,
    /// `(direction of this condition, random direction of the control)` at each swapped op.
    pub swapped: Vec<(String, String)>,
    pub sets: Vec<ControlSet>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlSet {
    pub prompt_set: String,
    pub refusal: Rate,
    /// Refusal of this condition minus the control's, paired by (prompt, sample).
    pub diff: Option<crate::eval::paired::PairedDiff>,
}

/// The neutral mode: the baseline condition (no persona, no intervention), as the reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeutralControl {
    pub condition: String,
    pub condition_hash: String,
    pub sets: Vec<ControlSet>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Controls {
    pub neutral: Option<NeutralControl>,
    pub random_direction: Vec<RandomControl>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timestamps {
    pub receipt_created: String,
    pub study_created: String,
    pub study_last_run: String,
    pub first_result: Option<String>,
    pub last_result: Option<String>,
}

/// Who labeled a condition's rows, and how well that labeler is measured to agree with careful
/// reading. Absent from receipts written before labelers were recorded (their rows were labeled by
/// `rules@1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelsRecord {
    /// The distinct labeler ids of the rows (`rules@1`, `ensemble@1:ab12cd34ef567890`), sorted;
    /// normally one.
    pub labelers: Vec<String>,
    /// sha256 over each row's key, label and labeler (see [`labels_sha256`]).
    pub labels_sha256: String,
    /// The measured accuracy of each labeler that has one (`data/labels/accuracy.json` when the
    /// receipt was written); a labeler missing here was not measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labeler_accuracy: Vec<LabelerAccuracy>,
    /// How the labels came to be: re-derived rules labels, labels backed by the label history,
    /// relabels after generation, and labels edited by hand (absent in receipts written before
    /// it was recorded; see [`super::provenance`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<LabelProvenance>,
}

impl LabelsRecord {
    /// The measured accuracy of a labeler of these rows, if the receipt quotes one.
    pub fn accuracy(&self, labeler: &str) -> Option<LabelerAccuracy> {
        accuracy::lookup(&self.labeler_accuracy, labeler)
    }
}

/// sha256 over the canonical JSON of rows (the database's row id left out: it changes on merge;
/// the labeler left out too, so receipts written before it was stored still verify: it is in
/// [`labels_sha256`]).
pub fn rows_sha256<'a>(rows: impl Iterator<Item = &'a RowView>) -> Result<String> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&row_line(r)?);
        text.push('\n');
    }
    Ok(crate::hash::sha256_bytes(text.as_bytes()))
}

/// sha256 over one line per row, in order: the canonical JSON of `[condition hash, prompt-set
/// hash, prompt id, sample, label, labeler]`. Rows are named by their result key, not the
/// database's row id (which changes on merge).
pub fn labels_sha256<'a>(rows: impl Iterator<Item = &'a RowView>) -> String {
    let mut text = String::new();
    for r in rows {
        let v = json!([
            r.condition_hash,
            r.prompt_set_hash,
            r.prompt_id,
            r.sample,
            r.label,
            r.labeler
        ]);
        text.push_str(&canonical_json(&v));
        text.push('\n');
    }
    crate::hash::sha256_bytes(text.as_bytes())
}

/// The labels block of a receipt over a condition's rows: distinct labelers, the labels hash,
/// and the measured accuracy of each labeler that has one.
pub fn labels_record(rows: &[&RowView]) -> LabelsRecord {
    let mut labelers: Vec<String> = rows.iter().map(|r| r.labeler.clone()).collect();
    labelers.sort();
    labelers.dedup();
    // Entries as measured (an entry may name `name@version` for every artifact).
    let mut labeler_accuracy: Vec<LabelerAccuracy> = Vec::new();
    for a in labelers.iter().filter_map(|l| accuracy::measured(l)) {
        if !labeler_accuracy.contains(&a) {
            labeler_accuracy.push(a);
        }
    }
    LabelsRecord {
        labels_sha256: labels_sha256(rows.iter().copied()),
        labelers,
        labeler_accuracy,
        provenance: None,
    }
}

/// Bootstrap 95% interval of a mean (percentile, the study's resamples and seed).
pub fn mean_ci(values: &[f64], reps: usize, seed: u64) -> MeanCi {
    let pairs: Vec<(f64, f64)> = values.iter().map(|v| (0.0, *v)).collect();
    let d = paired_bootstrap(&pairs, reps, seed);
    MeanCi {
        n: values.len(),
        mean: d.diff,
        lo: d.lo,
        hi: d.hi,
        method: "bootstrap-percentile".into(),
    }
}
