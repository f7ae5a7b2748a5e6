//! Every number of a receipt that follows from the result rows, computed in one place.
//!
//! `pgate receipt` and `pgate receipt verify` both call [`condition_stats`]: the receipt writer on
//! the rows of the results database, the verifier on the rows bundled with the receipts (or the
//! database), with the conditions, prompt sets, families and bootstrap settings the receipts
//! declare. So a rate, a Wilson interval, a paired comparison or a per-category rate edited into
//! a receipt (and the receipt resealed) no longer matches what its rows give, and `verify` names
//! the field.

use std::collections::HashMap;

use serde_json::json;

use super::provenance::{label_provenance, RowLabels};
use super::records::{
    labels_record, mean_ci, rows_sha256, CategoryRates, ControlSet, Controls, JudgedRate,
    JudgedScore, LabelsRecord, NeutralControl, OpRecord, RandomControl, SetResults,
};
use crate::eval::paired::paired_bootstrap_bool;
use crate::eval::{wilson, Rate};
use crate::study::report::{report, ReportOptions, ReportRow};
use crate::study::store::{iso_utc, RowView, VerdictRow};
use crate::{Error, Result};

/// Largest bootstrap resample count a receipt may ask for: the verifier recomputes every interval,
/// and a receipt asking for 10^12 resamples must not hang it.
pub const MAX_BOOTSTRAP: usize = 1_000_000;

/// One condition as the statistics need it.
#[derive(Debug, Clone)]
pub struct StatCondition {
    pub name: String,
    pub hash: String,
    /// The system prompt (random-direction controls share it).
    pub system: Option<String>,
    pub ops: Vec<OpRecord>,
    /// `(name, set sha256)` of the prompt sets it runs on, in the study's order.
    pub prompt_sets: Vec<(String, String)>,
}

/// What the statistics depend on besides the rows.
pub struct StatInputs<'a> {
    /// The study's rows, in the database's order (the rows hashes depend on it).
    pub rows: &'a [RowView],
    /// Label history of each row, parallel to `rows`.
    pub labels: &'a [RowLabels],
    /// Each row's line as bundled (`rows.jsonl`), parallel to `rows`: the rows hashes are taken
    /// over these exact bytes. None: hash the rows themselves (from the database).
    pub row_lines: Option<&'a [String]>,
    pub conditions: &'a [StatCondition],
    /// The baseline condition's name and hash.
    pub baseline: (&'a str, &'a str),
    /// Prompt-set name -> `harmful` / `benign`.
    pub families: &'a HashMap<String, String>,
    pub bootstrap: usize,
    pub seed: u64,
    /// Work items per (condition hash, prompt-set name).
    pub expected: &'a HashMap<(String, String), usize>,
    /// The study's `english` (rules labels are re-derived with it).
    pub english: bool,
    /// Find random-direction controls among `conditions`: only when every condition of the study
    /// is known (a lone receipt cannot say which other conditions exist).
    pub discover_controls: bool,
}

/// The row-derived part of one condition's receipt.
#[derive(Debug, Clone)]
pub struct ConditionStats {
    pub complete: bool,
    pub results: Vec<SetResults>,
    pub benign_refusal: Option<Rate>,
    pub controls: Controls,
    pub labels: LabelsRecord,
    pub first_result: Option<String>,
    pub last_result: Option<String>,
}

type RowKey = (String, String, String, i64);

/// Statistics of every condition of `inp.conditions`, in order.
pub fn condition_stats(inp: &StatInputs<'_>) -> Result<Vec<ConditionStats>> {
    if inp.bootstrap > MAX_BOOTSTRAP {
        return Err(Error::InvalidValue(format!(
            "bootstrap resamples {} exceed the limit of {MAX_BOOTSTRAP}",
            inp.bootstrap
        )));
    }
    if inp.labels.len() != inp.rows.len() {
        return Err(Error::InvalidValue(format!(
            "{} rows but labels for {}",
            inp.rows.len(),
            inp.labels.len()
        )));
    }
    let rep_opts = ReportOptions {
        baseline: None,
        by_category: false,
        bootstrap: inp.bootstrap,
        seed: inp.seed,
    };
    let rep = report(inp.rows, inp.baseline.0, &rep_opts);
    let rep_cat = report(
        inp.rows,
        inp.baseline.0,
        &ReportOptions {
            by_category: true,
            bootstrap: 0,
            ..rep_opts.clone()
        },
    );
    // Refusal per (condition, set, prompt, sample) for the control comparisons.
    let mut refused: HashMap<RowKey, bool> = HashMap::new();
    for r in inp.rows {
        refused.insert(
            (
                r.condition_hash.clone(),
                r.prompt_set.clone(),
                r.prompt_id.clone(),
                r.sample,
            ),
            r.label == "refusal",
        );
    }
    let mut out = Vec::new();
    for (ci, c) in inp.conditions.iter().enumerate() {
        out.push(one_condition(inp, ci, c, &rep, &rep_cat, &refused)?);
    }
    Ok(out)
}

fn one_condition(
    inp: &StatInputs<'_>,
    ci: usize,
    c: &StatCondition,
    rep: &[ReportRow],
    rep_cat: &[ReportRow],
    refused: &HashMap<RowKey, bool>,
) -> Result<ConditionStats> {
    let idx: Vec<usize> = (0..inp.rows.len())
        .filter(|&i| inp.rows[i].condition_hash == c.hash)
        .collect();
    let my_rows: Vec<&RowView> = idx.iter().map(|&i| &inp.rows[i]).collect();
    let my_labels: Vec<&RowLabels> = idx.iter().map(|&i| &inp.labels[i]).collect();
    let family = |set: &str| -> String {
        inp.families
            .get(set)
            .cloned()
            .unwrap_or_else(|| "harmful".into())
    };
    let mut results = Vec::new();
    for rr in rep.iter().filter(|r| r.condition_hash == c.hash) {
        let set_idx: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| inp.rows[i].prompt_set == rr.prompt_set)
            .collect();
        results.push(set_results(
            inp,
            c,
            rr,
            rep_cat,
            &set_idx,
            family(&rr.prompt_set),
        )?);
    }
    // Sets without any result yet.
    for (name, hash) in &c.prompt_sets {
        if results.iter().any(|r| &r.prompt_set == name) {
            continue;
        }
        results.push(SetResults {
            prompt_set: name.clone(),
            prompt_set_sha256: hash.clone(),
            family: family(name),
            expected: expected(inp, &c.hash, name).unwrap_or(0),
            n: 0,
            refusal: wilson(0, 0),
            bypass: wilson(0, 0),
            degenerate: wilson(0, 0),
            leakage_rule: mean_ci(&[], 1, 0),
            strongreject: None,
            unsafe_rate: None,
            leakage_judged: None,
            judges: vec![],
            by_category: vec![],
            vs_baseline: None,
            rows_sha256: rows_sha256(std::iter::empty())?,
            first_result_at: None,
            last_result_at: None,
        });
    }
    let complete = results.iter().all(|r| r.n >= r.expected);
    let benign: Vec<&SetResults> = results.iter().filter(|r| r.family == "benign").collect();
    let benign_refusal = (!benign.is_empty()).then(|| {
        wilson(
            benign.iter().map(|r| r.refusal.k).sum(),
            benign.iter().map(|r| r.refusal.n).sum(),
        )
    });
    let (b_name, b_hash) = inp.baseline;
    let neutral = (c.hash != b_hash).then(|| NeutralControl {
        condition: b_name.to_string(),
        condition_hash: b_hash.to_string(),
        sets: control_sets(inp, rep, refused, &c.hash, b_hash)
            .into_iter()
            .filter(|s| c.prompt_sets.iter().any(|(n, _)| n == &s.prompt_set))
            .collect(),
    });
    let random_direction = if inp.discover_controls {
        random_controls(inp, rep, refused, ci)
    } else {
        vec![]
    };
    let mut labels = labels_record(&my_rows);
    labels.provenance = Some(label_provenance(&my_rows, &my_labels, inp.english));
    let times: Vec<i64> = my_rows.iter().map(|r| r.finished_at).collect();
    Ok(ConditionStats {
        complete,
        results,
        benign_refusal,
        controls: Controls {
            neutral,
            random_direction,
        },
        labels,
        first_result: times.iter().min().map(|t| iso_utc(*t)),
        last_result: times.iter().max().map(|t| iso_utc(*t)),
    })
}

fn expected(inp: &StatInputs<'_>, cond: &str, set: &str) -> Option<usize> {
    inp.expected
        .get(&(cond.to_string(), set.to_string()))
        .copied()
}

/// Results of one condition on one prompt set with rows.
fn set_results(
    inp: &StatInputs<'_>,
    c: &StatCondition,
    rr: &ReportRow,
    rep_cat: &[ReportRow],
    set_idx: &[usize],
    family: String,
) -> Result<SetResults> {
    let (reps, seed) = (inp.bootstrap, inp.seed);
    let set_rows: Vec<&RowView> = set_idx.iter().map(|&i| &inp.rows[i]).collect();
    let rows_hash = match inp.row_lines {
        Some(lines) => {
            let mut text = String::new();
            for &i in set_idx {
                text.push_str(&lines[i]);
                text.push('\n');
            }
            crate::hash::sha256_bytes(text.as_bytes())
        }
        None => rows_sha256(set_rows.iter().copied())?,
    };
    let leak: Vec<f64> = set_rows.iter().map(|r| r.leakage).collect();
    // Judge scores: the first judge (by name) that gave each kind of score.
    let mut sr = None;
    let mut unsafe_rate = None;
    let mut leak_j = None;
    let mut judge_names: Vec<String> = set_rows
        .iter()
        .flat_map(|r| r.verdicts.iter().map(|v| v.judge.clone()))
        .collect();
    judge_names.sort();
    judge_names.dedup();
    for j in &judge_names {
        let vs: Vec<&VerdictRow> = set_rows
            .iter()
            .flat_map(|r| r.verdicts.iter())
            .filter(|v| &v.judge == j && v.ok)
            .collect();
        let s: Vec<f64> = vs.iter().filter_map(|v| v.strongreject).collect();
        if sr.is_none() && !s.is_empty() {
            sr = Some(JudgedScore {
                judge: j.clone(),
                score: mean_ci(&s, reps, seed),
            });
        }
        let u: Vec<bool> = vs.iter().filter_map(|v| v.is_unsafe).collect();
        if unsafe_rate.is_none() && !u.is_empty() {
            unsafe_rate = Some(JudgedRate {
                judge: j.clone(),
                rate: wilson(u.iter().filter(|x| **x).count(), u.len()),
            });
        }
        let l: Vec<f64> = vs.iter().filter_map(|v| v.leakage).collect();
        if leak_j.is_none() && !l.is_empty() {
            leak_j = Some(JudgedScore {
                judge: j.clone(),
                score: mean_ci(&l, reps, seed),
            });
        }
    }
    let by_category = rep_cat
        .iter()
        .filter(|x| x.condition_hash == c.hash && x.prompt_set == rr.prompt_set)
        .map(|x| CategoryRates {
            category: x.category.clone().unwrap_or_default(),
            n: x.n,
            refusal: x.refusal,
            bypass: x.bypass,
            degenerate: x.degenerate,
        })
        .collect();
    let times: Vec<i64> = set_rows.iter().map(|r| r.finished_at).collect();
    Ok(SetResults {
        prompt_set: rr.prompt_set.clone(),
        prompt_set_sha256: set_rows
            .first()
            .map(|r| r.prompt_set_hash.clone())
            .unwrap_or_default(),
        family,
        expected: expected(inp, &c.hash, &rr.prompt_set).unwrap_or(rr.n),
        n: rr.n,
        refusal: rr.refusal,
        bypass: rr.bypass,
        degenerate: rr.degenerate,
        leakage_rule: mean_ci(&leak, reps, seed),
        strongreject: sr,
        unsafe_rate,
        leakage_judged: leak_j,
        judges: rr.judges.clone(),
        by_category,
        vs_baseline: rr.vs_baseline.clone(),
        rows_sha256: rows_hash,
        first_result_at: times.iter().min().map(|t| iso_utc(*t)),
        last_result_at: times.iter().max().map(|t| iso_utc(*t)),
    })
}

/// Per prompt set of `other`: its refusal rate and `this` minus `other`, paired by (prompt,
/// sample).
fn control_sets(
    inp: &StatInputs<'_>,
    rep: &[ReportRow],
    refused: &HashMap<RowKey, bool>,
    this: &str,
    other: &str,
) -> Vec<ControlSet> {
    rep.iter()
        .filter(|r| r.condition_hash == other)
        .map(|o| {
            let pairs: Vec<(bool, bool)> = inp
                .rows
                .iter()
                .filter(|r| r.condition_hash == this && r.prompt_set == o.prompt_set)
                .filter_map(|r| {
                    refused
                        .get(&(
                            other.to_string(),
                            r.prompt_set.clone(),
                            r.prompt_id.clone(),
                            r.sample,
                        ))
                        .map(|b| (*b, r.label == "refusal"))
                })
                .collect();
            let diff = paired_bootstrap_bool(&pairs, inp.bootstrap, inp.seed);
            ControlSet {
                prompt_set: o.prompt_set.clone(),
                refusal: o.refusal,
                diff: Some(diff).filter(|d| d.n > 0),
            }
        })
        .collect()
}

/// Random-direction controls of condition `ci`: same system prompt and op shapes, random
/// directions where this condition has persona or refusal ones, and at least one such swap.
fn random_controls(
    inp: &StatInputs<'_>,
    rep: &[ReportRow],
    refused: &HashMap<RowKey, bool>,
    ci: usize,
) -> Vec<RandomControl> {
    let c = &inp.conditions[ci];
    let mut out = Vec::new();
    for (oi, o) in inp.conditions.iter().enumerate() {
        if oi == ci || o.system != c.system || o.ops.len() != c.ops.len() {
            continue;
        }
        let mut swapped = Vec::new();
        let mut ok = true;
        for (a, b) in c.ops.iter().zip(&o.ops) {
            if op_shape(a) != op_shape(b) {
                ok = false;
                break;
            }
            if a.identity != b.identity {
                if a.role != "random" && b.role == "random" {
                    swapped.push((a.direction.clone(), b.direction.clone()));
                } else {
                    ok = false;
                    break;
                }
            }
        }
        if ok && !swapped.is_empty() {
            out.push(RandomControl {
                condition: o.name.clone(),
                condition_hash: o.hash.clone(),
                swapped,
                sets: control_sets(inp, rep, refused, &c.hash, &o.hash),
            });
        }
    }
    out
}

/// Ops of a condition with the direction left out: two conditions whose ops match this way
/// differ only in the directions they use.
fn op_shape(o: &OpRecord) -> serde_json::Value {
    json!([
        o.field,
        o.coeff,
        o.raw,
        o.lo,
        o.hi,
        o.pick,
        o.layers,
        o.positions
    ])
}
