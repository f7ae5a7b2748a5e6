//! Where each label of a receipt came from, so that relabeling after the fact is visible.
//!
//! Every rate rests on the rows' labels, and labels live in a database anyone with the file can
//! edit. A receipt therefore records, per condition, how its labels came to be
//! ([`LabelProvenance`]), and `verify` / `check` recompute it from the rows:
//!
//! - A row labeled by a rules labeler (`rules@1`, `rules@2`: no model, deterministic) is
//!   **re-derived**: the rules run again on the stored output and must give the stored label.
//! - A row labeled by any other labeler (a probe, an ensemble) must have that label recorded for
//!   that labeler in the row's label history (written by `pgate study relabel`, which also keeps
//!   the label it replaced).
//! - A row neither re-derived nor in the history is **unbacked**: its label was edited by hand
//!   (`UPDATE results SET label = ...`). Receipts name such rows; `verify` and `check` fail them.
//! - Rows relabeled after generation (they have a history) and rows whose label differs from the
//!   one given at generation (kept in the row's rule measurements, which relabeling never
//!   touches) are counted, so a relabel shows in the receipt, in `verify` and in `check`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::study::canon::canonical_json;
use crate::study::store::{LabelRecord, RowView};

/// Most unbacked rows a receipt names one by one (the count is always exact).
pub const MAX_NAMED_ROWS: usize = 20;

/// The label history of one result row (oldest first), as `pgate study relabel` kept it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RowLabels {
    #[serde(default)]
    pub history: Vec<LabelRecord>,
}

/// How a condition's labels came to be. See the module documentation and docs/receipt.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelProvenance {
    /// Rows of the condition.
    pub rows: usize,
    /// Rows per labeler of their current label.
    pub rows_by_labeler: BTreeMap<String, usize>,
    /// The study's `english` setting, with which rules labels are re-derived.
    pub english: bool,
    /// Rows labeled again after generation (they have a label history).
    pub relabeled: usize,
    /// Rows whose label differs from the label they were given at generation.
    pub changed_after_generation: usize,
    /// Rows whose rules label was derived again from the output and matched.
    pub rules_rederived: usize,
    /// Rows whose (labeler, label) is recorded in their label history (model-based labelers).
    pub history_backed: usize,
    /// Rows whose label neither its rules give again nor the history records: edited by hand.
    pub unbacked: usize,
    /// The first unbacked rows, `set-hash-prefix/prompt-id#sample: label by labeler`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unbacked_rows: Vec<String>,
    /// sha256 over every history entry of the rows (row key, labeler, label, reason, scores,
    /// time), one canonical JSON line each, in row order.
    pub history_sha256: String,
}

impl LabelProvenance {
    /// One line for `verify` and `check`, or None when the labels are as generated.
    pub fn describe_relabel(&self) -> Option<String> {
        if self.relabeled == 0 && self.changed_after_generation == 0 {
            return None;
        }
        let by: Vec<String> = self
            .rows_by_labeler
            .iter()
            .map(|(l, n)| format!("{l} x{n}"))
            .collect();
        Some(format!(
            "labels changed after generation: {} of {} rows relabeled, {} with a label other than the one given at generation (labelers now: {})",
            self.relabeled,
            self.rows,
            self.changed_after_generation,
            by.join(", ")
        ))
    }
}

/// The rules version of a labeler id (`rules@2` -> 2), None for other labelers.
fn rules_version(labeler: &str) -> Option<u32> {
    labeler.strip_prefix("rules@")?.parse().ok()
}

/// The label the rules of `version` give to `output` (None: no such rules version).
pub fn rules_label(version: u32, output: &str, english: bool) -> Option<&'static str> {
    match version {
        1 => Some(crate::eval::label_output(output, english).label.name()),
        2 => Some(crate::label::rules::label_v2(output, english).label.name()),
        _ => None,
    }
}

/// Provenance of the labels of `rows` (one condition's), with their histories in `labels`.
pub fn label_provenance(
    rows: &[&RowView],
    labels: &[&RowLabels],
    english: bool,
) -> LabelProvenance {
    let mut p = LabelProvenance {
        rows: rows.len(),
        rows_by_labeler: BTreeMap::new(),
        english,
        relabeled: 0,
        changed_after_generation: 0,
        rules_rederived: 0,
        history_backed: 0,
        unbacked: 0,
        unbacked_rows: Vec::new(),
        history_sha256: String::new(),
    };
    let mut history_text = String::new();
    for (r, l) in rows.iter().zip(labels) {
        *p.rows_by_labeler.entry(r.labeler.clone()).or_insert(0) += 1;
        if !l.history.is_empty() {
            p.relabeled += 1;
        }
        if r.rule.get("label").and_then(|v| v.as_str()) != Some(r.label.as_str()) {
            p.changed_after_generation += 1;
        }
        let backed = match rules_version(&r.labeler) {
            Some(v) => {
                let ok = rules_label(v, &r.output, english) == Some(r.label.as_str());
                p.rules_rederived += ok as usize;
                ok
            }
            None => {
                let ok = l
                    .history
                    .iter()
                    .any(|h| h.labeler == r.labeler && h.label == r.label);
                p.history_backed += ok as usize;
                ok
            }
        };
        if !backed {
            p.unbacked += 1;
            if p.unbacked_rows.len() < MAX_NAMED_ROWS {
                p.unbacked_rows.push(format!(
                    "{}/{}#{}: {} by {}",
                    r.prompt_set_hash.get(..12).unwrap_or(&r.prompt_set_hash),
                    r.prompt_id,
                    r.sample,
                    r.label,
                    r.labeler
                ));
            }
        }
        for h in &l.history {
            let v = json!([
                r.condition_hash,
                r.prompt_set_hash,
                r.prompt_id,
                r.sample,
                h.labeler,
                h.label,
                h.reason,
                h.scores_json,
                h.labeled_at
            ]);
            history_text.push_str(&canonical_json(&v));
            history_text.push('\n');
        }
    }
    p.history_sha256 = crate::hash::sha256_bytes(history_text.as_bytes());
    p
}
