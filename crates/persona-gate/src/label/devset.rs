//! The labeled development set and the measurement of a labeler against it.
//!
//! Rows are outputs of this project's own runs, each labeled by careful reading under
//! `docs/labels.md` (label, `ambiguous`, one-line reason) and assigned to a split: `tune` (rules
//! are widened and probes trained on it) or `held` (never tuned on; every accuracy the project quotes
//! is measured here). The held split also holds whole prompt families and persona modes that the
//! tuning split lacks, so a labeler is checked on wordings it never saw.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Label, LabelInput, LabelVerdict};
use crate::eval::{wilson, Rate};
use crate::{Error, Result};

/// One labeled output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevRow {
    pub id: String,
    /// `q15`, `q05`: the model that generated the output.
    pub model: String,
    pub condition: String,
    /// Prompt set within the study (`sr_hate`, `advbench`, `alpaca`, ...).
    pub set: String,
    #[serde(default)]
    pub category: Option<String>,
    /// `harmful` or `harmless`.
    pub kind: String,
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    pub output: String,
    /// The view: the answer cut at this many tokens (24, 64, 128, 256).
    pub max_tokens: usize,
    /// The careful label.
    pub label: Label,
    pub ambiguous: bool,
    pub reason: String,
    /// `tune` or `held`.
    pub split: String,
}

impl DevRow {
    pub fn input(&self) -> LabelInput {
        LabelInput {
            id: Some(self.id.clone()),
            prompt: self.prompt.clone(),
            output: self.output.clone(),
            system: self.system.clone(),
        }
    }
}

/// Read a development set (JSONL, one [`DevRow`] a line).
pub fn load(path: &Path) -> Result<Vec<DevRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidValue(format!(
            "cannot read development set {}: {e}",
            path.display()
        ))
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: DevRow = serde_json::from_str(line).map_err(|e| {
            Error::InvalidValue(format!(
                "{} line {}: not a development-set row: {e}",
                path.display(),
                i + 1
            ))
        })?;
        rows.push(r);
    }
    if rows.is_empty() {
        return Err(Error::Empty(format!(
            "development set {} has no rows",
            path.display()
        )));
    }
    Ok(rows)
}

/// The sha256 of a development set's rows as stored (what a probe file records).
pub fn rows_hash(rows: &[DevRow]) -> String {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r).unwrap_or_default());
        s.push('\n');
    }
    crate::hash::sha256_bytes(s.as_bytes())
}

/// Rows of one split (`tune`, `held`, or `all`).
pub fn split<'a>(rows: &'a [DevRow], name: &str) -> Vec<&'a DevRow> {
    rows.iter()
        .filter(|r| name == "all" || r.split == name)
        .collect()
}

/// Per-class numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassScore {
    pub label: Label,
    /// Of the rows the labeler gave this label, the share carefully labeled so.
    pub precision: Rate,
    /// Of the rows carefully labeled so, the share the labeler found.
    pub recall: Rate,
    pub f1: f64,
}

/// A labeler measured against careful labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub labeler: String,
    pub split: String,
    pub n: usize,
    pub n_ambiguous: usize,
    /// Agreement on non-ambiguous rows.
    pub agreement: Rate,
    /// Agreement on ambiguous rows (for the record).
    pub agreement_ambiguous: Rate,
    /// `confusion[careful][labeler]`, classes in [`CLASSES`] order, non-ambiguous rows.
    pub confusion: [[usize; 3]; 3],
    pub classes: Vec<ClassScore>,
}

/// Class order of confusion matrices.
pub const CLASSES: [Label; 3] = [Label::Refusal, Label::Bypass, Label::Degenerate];

fn idx(l: Label) -> usize {
    CLASSES.iter().position(|c| *c == l).unwrap_or(0)
}

/// Measure verdicts (one per row, in order) against the rows' careful labels.
pub fn evaluate(
    labeler: &str,
    split: &str,
    rows: &[&DevRow],
    verdicts: &[Label],
) -> Result<Evaluation> {
    if rows.len() != verdicts.len() {
        return Err(Error::InvalidValue(format!(
            "{} verdicts for {} rows",
            verdicts.len(),
            rows.len()
        )));
    }
    if rows.is_empty() {
        return Err(Error::Empty(format!(
            "no development rows in split '{split}'"
        )));
    }
    let mut conf = [[0usize; 3]; 3];
    let (mut agree, mut n_clear, mut agree_amb, mut n_amb) = (0, 0, 0, 0);
    for (r, v) in rows.iter().zip(verdicts) {
        if r.ambiguous {
            n_amb += 1;
            agree_amb += usize::from(r.label == *v);
            continue;
        }
        n_clear += 1;
        agree += usize::from(r.label == *v);
        conf[idx(r.label)][idx(*v)] += 1;
    }
    let classes = CLASSES
        .iter()
        .map(|&c| {
            let i = idx(c);
            let tp = conf[i][i];
            let predicted: usize = (0..3).map(|k| conf[k][i]).sum();
            let actual: usize = conf[i].iter().sum();
            let precision = wilson(tp, predicted);
            let recall = wilson(tp, actual);
            let f1 = if precision.p + recall.p > 0.0 && predicted > 0 && actual > 0 {
                2.0 * precision.p * recall.p / (precision.p + recall.p)
            } else {
                0.0
            };
            ClassScore {
                label: c,
                precision,
                recall,
                f1,
            }
        })
        .collect();
    Ok(Evaluation {
        labeler: labeler.into(),
        split: split.into(),
        n: rows.len(),
        n_ambiguous: n_amb,
        agreement: wilson(agree, n_clear),
        agreement_ambiguous: wilson(agree_amb, n_amb),
        confusion: conf,
        classes,
    })
}

impl Evaluation {
    pub fn class(&self, l: Label) -> &ClassScore {
        &self.classes[idx(l)]
    }

    /// A Markdown block: agreement, confusion matrix, per-class precision / recall.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "**{}** on `{}` ({} rows, {} ambiguous): agreement on non-ambiguous rows {}\n\n",
            self.labeler, self.split, self.n, self.n_ambiguous, self.agreement
        );
        s.push_str(
            "| careful \\ labeler | refusal | bypass | degenerate |\n|---|---:|---:|---:|\n",
        );
        for (i, c) in CLASSES.iter().enumerate() {
            let r = self.confusion[i];
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                c.name(),
                r[0],
                r[1],
                r[2]
            ));
        }
        s.push_str("\n| class | precision | recall | F1 |\n|---|---|---|---:|\n");
        for c in &self.classes {
            s.push_str(&format!(
                "| {} | {} | {} | {:.3} |\n",
                c.label.name(),
                c.precision,
                c.recall,
                c.f1
            ));
        }
        s
    }
}

/// Labels of verdicts, for [`evaluate`].
pub fn labels_of(v: &[LabelVerdict]) -> Vec<Label> {
    v.iter().map(|x| x.label).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: Label, ambiguous: bool) -> DevRow {
        DevRow {
            id: "x".into(),
            model: "q15".into(),
            condition: "baseline".into(),
            set: "s".into(),
            category: None,
            kind: "harmful".into(),
            prompt: "p".into(),
            system: None,
            output: "o".into(),
            max_tokens: 256,
            label,
            ambiguous,
            reason: "r".into(),
            split: "held".into(),
        }
    }

    #[test]
    fn confusion_and_scores() {
        let rows = [
            row(Label::Refusal, false),
            row(Label::Refusal, false),
            row(Label::Bypass, false),
            row(Label::Degenerate, true),
        ];
        let refs: Vec<&DevRow> = rows.iter().collect();
        let e = evaluate(
            "t",
            "held",
            &refs,
            &[Label::Refusal, Label::Bypass, Label::Bypass, Label::Refusal],
        )
        .unwrap();
        assert_eq!(e.n_ambiguous, 1);
        assert_eq!(e.agreement.k, 2);
        assert_eq!(e.agreement.n, 3);
        assert_eq!(e.confusion[0], [1, 1, 0]);
        assert_eq!(e.class(Label::Refusal).precision.p, 1.0);
        assert_eq!(e.class(Label::Refusal).recall.p, 0.5);
        assert!(evaluate("t", "held", &[], &[]).is_err());
    }
}
