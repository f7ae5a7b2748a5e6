//! Summaries of stored results: label rates per condition and prompt set (optionally per
//! category) with Wilson 95% intervals, paired comparisons with the baseline condition over the
//! prompts both answered (McNemar exact and mid-p on refusal, paired-bootstrap interval of the
//! refusal-rate difference), and judge scores where verdicts exist.
//!
//! Rates are never pooled across prompt sets: a refusal rate over harmful and harmless prompts
//! together means nothing.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::store::RowView;
use crate::eval::paired::{mcnemar_pairs, paired_bootstrap_bool, McNemar, PairedDiff};
use crate::eval::{wilson, Rate};

#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Compare against this condition (default: the study's baseline).
    pub baseline: Option<String>,
    pub by_category: bool,
    pub bootstrap: usize,
    pub seed: u64,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            baseline: None,
            by_category: false,
            bootstrap: 2000,
            seed: 0,
        }
    }
}

/// Refusal under a condition against the baseline, paired by (prompt, sample).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedVs {
    pub baseline: String,
    pub n_pairs: usize,
    /// `b`: refused under the baseline only; `c`: under this condition only.
    pub mcnemar: McNemar,
    /// Refusal rate of this condition minus the baseline's, with its bootstrap interval.
    pub diff: PairedDiff,
}

/// Scores of one judge over a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeStats {
    pub judge: String,
    pub judged: usize,
    pub failed: usize,
    pub strongreject_mean: Option<f64>,
    pub unsafe_rate: Option<Rate>,
    pub leakage_mean: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReportRow {
    pub condition: String,
    pub condition_hash: String,
    pub prompt_set: String,
    pub category: Option<String>,
    pub n: usize,
    pub refusal: Rate,
    pub bypass: Rate,
    pub degenerate: Rate,
    /// Mean rule-based leakage (see `eval::judge::rule_leakage`).
    pub leakage_mean: f64,
    pub vs_baseline: Option<PairedVs>,
    pub judges: Vec<JudgeStats>,
}

type GroupKey = (i64, String, Option<String>);

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// Summarize `rows` (one study's, as [`super::store::Store::rows`] returns them).
pub fn report(rows: &[RowView], baseline: &str, opts: &ReportOptions) -> Vec<ReportRow> {
    let baseline = opts.baseline.as_deref().unwrap_or(baseline);
    let cat = |r: &RowView| -> Option<String> {
        opts.by_category
            .then(|| r.category.clone().unwrap_or_else(|| "(none)".into()))
    };
    let mut groups: BTreeMap<GroupKey, Vec<&RowView>> = BTreeMap::new();
    for r in rows {
        groups
            .entry((r.condition_ord, r.prompt_set.clone(), cat(r)))
            .or_default()
            .push(r);
    }
    // Baseline refusal by (set, category, prompt id, sample).
    let mut base: HashMap<(String, Option<String>, String, i64), bool> = HashMap::new();
    for r in rows.iter().filter(|r| r.condition == baseline) {
        base.insert(
            (r.prompt_set.clone(), cat(r), r.prompt_id.clone(), r.sample),
            r.label == "refusal",
        );
    }
    let has_baseline = !base.is_empty();
    let mut out = Vec::new();
    for ((_, set, category), g) in groups {
        let n = g.len();
        let count = |l: &str| g.iter().filter(|r| r.label == l).count();
        let first = g[0];
        let vs_baseline = (has_baseline && first.condition != baseline).then(|| {
            let pairs: Vec<(bool, bool)> = g
                .iter()
                .filter_map(|r| {
                    base.get(&(set.clone(), category.clone(), r.prompt_id.clone(), r.sample))
                        .map(|b| (*b, r.label == "refusal"))
                })
                .collect();
            PairedVs {
                baseline: baseline.to_string(),
                n_pairs: pairs.len(),
                mcnemar: mcnemar_pairs(&pairs),
                diff: paired_bootstrap_bool(&pairs, opts.bootstrap, opts.seed),
            }
        });
        let mut judges: BTreeMap<&str, Vec<&super::store::VerdictRow>> = BTreeMap::new();
        for r in &g {
            for v in &r.verdicts {
                judges.entry(v.judge.as_str()).or_default().push(v);
            }
        }
        let judges = judges
            .into_iter()
            .map(|(name, vs)| {
                let ok: Vec<_> = vs.iter().filter(|v| v.ok).collect();
                let unsafe_flags: Vec<bool> = ok.iter().filter_map(|v| v.is_unsafe).collect();
                JudgeStats {
                    judge: name.to_string(),
                    judged: ok.len(),
                    failed: vs.len() - ok.len(),
                    strongreject_mean: mean(ok.iter().filter_map(|v| v.strongreject)),
                    unsafe_rate: (!unsafe_flags.is_empty()).then(|| {
                        wilson(
                            unsafe_flags.iter().filter(|x| **x).count(),
                            unsafe_flags.len(),
                        )
                    }),
                    leakage_mean: mean(ok.iter().filter_map(|v| v.leakage)),
                }
            })
            .collect();
        out.push(ReportRow {
            condition: first.condition.clone(),
            condition_hash: first.condition_hash.clone(),
            prompt_set: set,
            category,
            n,
            refusal: wilson(count("refusal"), n),
            bypass: wilson(count("bypass"), n),
            degenerate: wilson(count("degenerate"), n),
            leakage_mean: mean(g.iter().map(|r| r.leakage)).unwrap_or(0.0),
            vs_baseline,
            judges,
        });
    }
    out
}

/// `12.5% [ 4.1, 32.0]` without padding, for tables.
pub fn pct(r: &Rate) -> String {
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        100.0 * r.p,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

/// p-values as tables print them.
pub fn pval(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}
