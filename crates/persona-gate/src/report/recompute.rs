//! Recompute every row-derived number of a study's receipts and compare it with what they say.
//!
//! `receipt_sha256` only proves a receipt was sealed, not by whom: anyone can edit a rate and seal
//! again. What cannot be edited without it showing is the relation between a receipt's numbers
//! and its rows. [`recompute`] takes the receipts of one study and their rows (bundled, or from
//! the results database), runs the same functions `pgate receipt` ran ([`super::stats`]) with the
//! conditions, prompt sets, families and bootstrap settings the receipts declare, and lists
//! every field that differs: label rates with their Wilson intervals, rule leakage and judge
//! scores with their bootstrap intervals, per-category rates, the paired comparison with the
//! baseline (McNemar and bootstrap), the neutral and random-direction controls, the benign
//! refusal rate, completeness, the rows and labels hashes and the labels provenance.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::provenance::{LabelProvenance, RowLabels};
use super::receipt::{canon_floats, Receipt};
use super::stats::{condition_stats, ConditionStats, StatCondition, StatInputs};
use crate::study::store::RowView;
use crate::{Error, Result};

/// Most differing fields listed per receipt (the count is always given).
pub const MAX_LISTED: usize = 12;

/// The rows to recompute from.
pub struct RowsSource<'a> {
    pub rows: &'a [RowView],
    pub labels: &'a [RowLabels],
    /// The bundled lines (`rows.jsonl`), when the rows come from a bundle.
    pub lines: Option<&'a [String]>,
    /// `english` of the study when no receipt records it (old receipts; from the database's
    /// study text, else the default).
    pub english: bool,
}

/// One field whose value in the receipt differs from the value its rows give.
#[derive(Debug, Clone)]
pub struct FieldDiff {
    /// Path in the receipt, e.g. `results[harmful].vs_baseline.diff.lo`.
    pub field: String,
    pub receipt: String,
    pub rows: String,
}

/// The comparison for one receipt.
#[derive(Debug, Clone)]
pub struct ReceiptDiffs {
    pub condition_hash: String,
    /// Values compared.
    pub compared: usize,
    pub diffs: Vec<FieldDiff>,
    /// The labels provenance its rows give (whether or not the receipt records one).
    pub provenance: LabelProvenance,
}

fn stat_u64(r: &Receipt, key: &str) -> Result<u64> {
    r.stats.get(key).and_then(Value::as_u64).ok_or_else(|| {
        Error::InvalidValue(format!(
            "receipt '{}': stats.{key} is missing or not a whole number",
            r.condition.name
        ))
    })
}

/// Everything but the rows that the statistics take, as the receipts declare it.
struct Declared {
    conditions: Vec<StatCondition>,
    baseline: (String, String),
    families: HashMap<String, String>,
    bootstrap: usize,
    seed: u64,
    expected: HashMap<(String, String), usize>,
    english: Option<bool>,
}

/// Collect the declared inputs, refusing receipts that disagree with each other.
fn declared(receipts: &[&Receipt]) -> Result<Declared> {
    let first = receipts
        .first()
        .ok_or_else(|| Error::Empty("no receipts".into()))?;
    let disagree = |what: &str| {
        Error::InvalidValue(format!(
            "the receipts disagree on {what}: they cannot all be from one study run"
        ))
    };
    let (bootstrap, seed) = (stat_u64(first, "bootstrap")?, stat_u64(first, "seed")?);
    let mut d = Declared {
        conditions: Vec::new(),
        baseline: (first.study.baseline.clone(), String::new()),
        families: HashMap::new(),
        bootstrap: usize::try_from(bootstrap).unwrap_or(usize::MAX),
        seed,
        expected: HashMap::new(),
        english: None,
    };
    let mut sorted: Vec<&Receipt> = receipts.to_vec();
    sorted.sort_by_key(|r| r.condition.ord);
    for r in sorted {
        if r.study.hash != first.study.hash {
            return Err(disagree("the study hash"));
        }
        if r.study.baseline != d.baseline.0 {
            return Err(disagree("the baseline"));
        }
        if stat_u64(r, "bootstrap")? != bootstrap || stat_u64(r, "seed")? != seed {
            return Err(disagree("[stats] bootstrap and seed"));
        }
        if r.condition.is_baseline && r.condition.name == d.baseline.0 {
            d.baseline.1 = r.condition.hash.clone();
        } else if d.baseline.1.is_empty() {
            if let Some(n) = &r.controls.neutral {
                d.baseline.1 = n.condition_hash.clone();
            }
        }
        for ps in &r.prompt_sets {
            let f = d
                .families
                .entry(ps.name.clone())
                .or_insert(ps.family.clone());
            if f != &ps.family {
                return Err(disagree(&format!("the family of prompt set '{}'", ps.name)));
            }
            let work = ps.n.saturating_mul(r.generation.samples);
            d.expected
                .insert((r.condition.hash.clone(), ps.name.clone()), work);
        }
        if let Some(p) = r.labels.as_ref().and_then(|l| l.provenance.as_ref()) {
            if d.english.is_some_and(|e| e != p.english) {
                return Err(disagree("the study's english setting"));
            }
            d.english = Some(p.english);
        }
        d.conditions.push(StatCondition {
            name: r.condition.name.clone(),
            hash: r.condition.hash.clone(),
            system: r.condition.system_prompt.clone(),
            ops: r.condition.ops.clone(),
            prompt_sets: r
                .prompt_sets
                .iter()
                .map(|p| (p.name.clone(), p.set_sha256.clone()))
                .collect(),
        });
    }
    if d.baseline.1.is_empty() {
        return Err(Error::InvalidValue(format!(
            "no receipt is the baseline '{}' or names its hash",
            d.baseline.0
        )));
    }
    Ok(d)
}

/// Compare every row-derived field of `receipts` (one study's) with what `src` gives.
/// `all_conditions` says the receipts are the whole study (a bundle): only then are the
/// random-direction controls (which depend on the other conditions) compared.
pub fn recompute(
    receipts: &[&Receipt],
    src: &RowsSource<'_>,
    all_conditions: bool,
) -> Result<Vec<ReceiptDiffs>> {
    let d = declared(receipts)?;
    let computed = condition_stats(&StatInputs {
        rows: src.rows,
        labels: src.labels,
        row_lines: src.lines,
        conditions: &d.conditions,
        baseline: (&d.baseline.0, &d.baseline.1),
        families: &d.families,
        bootstrap: d.bootstrap,
        seed: d.seed,
        expected: &d.expected,
        english: d.english.unwrap_or(src.english),
        discover_controls: all_conditions,
    })?;
    let by_hash: HashMap<&str, &ConditionStats> = d
        .conditions
        .iter()
        .zip(&computed)
        .map(|(c, s)| (c.hash.as_str(), s))
        .collect();
    let mut out = Vec::new();
    for r in receipts {
        let cs = by_hash[r.condition.hash.as_str()];
        let (mut claimed, mut rows) = compared_values(r, cs, all_conditions);
        canon_floats(&mut claimed);
        canon_floats(&mut rows);
        let mut diffs = Vec::new();
        let compared = diff("", &claimed, &rows, &mut diffs);
        out.push(ReceiptDiffs {
            condition_hash: r.condition.hash.clone(),
            compared,
            diffs,
            provenance: cs
                .labels
                .provenance
                .clone()
                .expect("condition_stats records provenance"),
        });
    }
    Ok(out)
}

/// The receipt's row-derived fields and the same fields recomputed, as JSON of the same shape.
fn compared_values(r: &Receipt, cs: &ConditionStats, all_conditions: bool) -> (Value, Value) {
    let mut claimed = json!({
        "complete": r.complete,
        "results": r.results,
        "benign_refusal": r.benign_refusal,
        "controls": {"neutral": r.controls.neutral},
        "timestamps": {
            "first_result": r.timestamps.first_result,
            "last_result": r.timestamps.last_result,
        },
    });
    let mut rows = json!({
        "complete": cs.complete,
        "results": cs.results,
        "benign_refusal": cs.benign_refusal,
        "controls": {"neutral": cs.controls.neutral},
        "timestamps": {"first_result": cs.first_result, "last_result": cs.last_result},
    });
    if all_conditions {
        claimed["controls"]["random_direction"] = json!(r.controls.random_direction);
        rows["controls"]["random_direction"] = json!(cs.controls.random_direction);
    }
    // Receipts written before labelers (or their provenance) were recorded are compared on what
    // they hold.
    if let Some(l) = &r.labels {
        claimed["labels"] = json!({"labelers": l.labelers, "labels_sha256": l.labels_sha256});
        rows["labels"] =
            json!({"labelers": cs.labels.labelers, "labels_sha256": cs.labels.labels_sha256});
        if let Some(p) = &l.provenance {
            claimed["labels"]["provenance"] = json!(p);
            rows["labels"]["provenance"] = json!(cs.labels.provenance);
        }
    }
    (claimed, rows)
}

/// A label for an element of an array of objects: its set, category, condition or judge name.
fn element_label(v: &Value, i: usize) -> String {
    for k in ["prompt_set", "category", "condition", "judge"] {
        if let Some(s) = v.get(k).and_then(Value::as_str) {
            return s.to_string();
        }
    }
    i.to_string()
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(77).collect::<String>())
    } else {
        s
    }
}

/// Append every leaf where `a` (the receipt) and `b` (the rows) differ; returns leaves compared.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<FieldDiff>) -> usize {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .map(|k| {
                    let null = Value::Null;
                    diff(
                        &join(k),
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    )
                })
                .sum()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .map(|(i, (p, q))| diff(&format!("{path}[{}]", element_label(p, i)), p, q, out))
            .sum(),
        (Value::Array(x), Value::Array(y)) => {
            out.push(FieldDiff {
                field: path.to_string(),
                receipt: format!("{} entries", x.len()),
                rows: format!("{} entries", y.len()),
            });
            1
        }
        _ => {
            if a != b {
                out.push(FieldDiff {
                    field: path.to_string(),
                    receipt: short(a),
                    rows: short(b),
                });
            }
            1
        }
    }
}
