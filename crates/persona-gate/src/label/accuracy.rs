//! Measured accuracy of labelers: what receipts quote and `pgate check --min-labeler-accuracy`
//! gates on.
//!
//! The figures live in `data/labels/accuracy.json` (a JSON list of [`LabelerAccuracy`], compiled
//! in): each entry is one labeler measured against careful labels on one split of the development
//! set (`pgate label eval`), with the devset's sha256. A labeler without an entry is "not
//! measured".

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The measured-accuracy file, compiled in.
pub const ACCURACY_JSON: &str = include_str!("../../../../data/labels/accuracy.json");

/// One labeler's measured agreement with careful labels on one split of the development set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelerAccuracy {
    /// `name@version` (matches every artifact) or a full id `name@version:artifact`.
    pub labeler: String,
    /// `held` (the held-back split, never tuned on), `tune` or `all`.
    pub split: String,
    /// Rows measured (non-ambiguous).
    pub n: usize,
    /// Share of rows where the labeler gives the careful label, with its 95% interval.
    pub agreement: f64,
    pub agreement_lo: f64,
    pub agreement_hi: f64,
    pub refusal_precision: f64,
    pub refusal_recall: f64,
    pub degenerate_f1: f64,
    /// sha256 of the development set file measured on.
    pub devset_sha256: String,
}

/// Every entry of the measured-accuracy file.
pub fn all() -> Result<Vec<LabelerAccuracy>> {
    parse(ACCURACY_JSON)
}

/// Parse a measured-accuracy file's text (a JSON list of [`LabelerAccuracy`]).
pub fn parse(text: &str) -> Result<Vec<LabelerAccuracy>> {
    serde_json::from_str(text).map_err(|e| {
        Error::InvalidValue(format!(
            "data/labels/accuracy.json: not a list of labeler accuracies: {e}"
        ))
    })
}

/// The measurement of a labeler (`rules@2`, `ensemble@1:ab12cd34ef567890`), if there is one.
pub fn measured(labeler: &str) -> Option<LabelerAccuracy> {
    lookup(&all().ok()?, labeler)
}

/// The entry for `labeler` among `entries`: an entry naming the full id first, then one naming
/// its `name@version`; among several, the held-back split first.
pub fn lookup(entries: &[LabelerAccuracy], labeler: &str) -> Option<LabelerAccuracy> {
    let base = labeler.split(':').next().unwrap_or(labeler);
    let pick = |want: &str| {
        let hits: Vec<&LabelerAccuracy> = entries.iter().filter(|e| e.labeler == want).collect();
        hits.iter()
            .find(|e| e.split == "held")
            .or(hits.first())
            .map(|e| (*e).clone())
    };
    pick(labeler).or_else(|| pick(base))
}

/// `held` -> "the held-back split", others -> "the tune split".
pub fn split_name(split: &str) -> String {
    match split {
        "held" => "the held-back split".into(),
        "all" => "the whole development set".into(),
        s => format!("the {s} split"),
    }
}

/// `ensemble@1 (agreement 96.1% [93.0, 97.9] on the held-back split, n=310)` or
/// `rules@1 (not measured)`.
pub fn describe(labeler: &str, acc: Option<&LabelerAccuracy>) -> String {
    match acc {
        None => format!("{labeler} (not measured)"),
        Some(a) => format!(
            "{labeler} (agreement {:.1}% [{:.1}, {:.1}] on {}, n={})",
            100.0 * a.agreement,
            100.0 * a.agreement_lo,
            100.0 * a.agreement_hi,
            split_name(&a.split),
            a.n
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(labeler: &str, split: &str, agreement: f64) -> LabelerAccuracy {
        LabelerAccuracy {
            labeler: labeler.into(),
            split: split.into(),
            n: 310,
            agreement,
            agreement_lo: agreement - 0.03,
            agreement_hi: agreement + 0.02,
            refusal_precision: 0.95,
            refusal_recall: 0.97,
            degenerate_f1: 0.9,
            devset_sha256: "0".repeat(64),
        }
    }

    #[test]
    fn shipped_accuracy_file_parses() {
        all().expect("data/labels/accuracy.json must be a list of labeler accuracies");
    }

    #[test]
    fn lookup_prefers_full_id_then_base_and_held_split() {
        let es = vec![
            entry("ensemble@1", "tune", 0.99),
            entry("ensemble@1", "held", 0.961),
            entry("probe@1:abcd", "held", 0.9),
        ];
        let e = lookup(&es, "ensemble@1:ab12cd34ef567890").unwrap();
        assert_eq!((e.split.as_str(), e.agreement), ("held", 0.961));
        assert_eq!(lookup(&es, "probe@1:abcd").unwrap().agreement, 0.9);
        assert!(lookup(&es, "probe@1:ffff").is_none());
        assert!(lookup(&es, "rules@1").is_none());
        assert_eq!(
            describe("ensemble@1", Some(&e)),
            "ensemble@1 (agreement 96.1% [93.1, 98.1] on the held-back split, n=310)"
        );
        assert_eq!(describe("rules@1", None), "rules@1 (not measured)");
    }
}
