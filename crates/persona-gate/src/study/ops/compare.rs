//! Two studies of one database compared condition by condition: e.g. a local study and an endpoint
//! study of the same model and persona modes.
//!
//! Rows pair by condition name, prompt (id and text) and sample, so two studies that drew
//! different subsets of one prompt source pair on the prompts they share.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::{refused, OpResult};
use crate::eval::paired::{mcnemar_pairs, McNemar};
use crate::eval::{wilson, Rate};
use crate::study::store::StudyRecord;
use crate::study::Store;
use crate::Result;

/// Options of [`compare`].
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CompareOptions {
    /// First study (name or hash prefix), e.g. the local one.
    pub a: String,
    /// Second study, e.g. the endpoint one.
    pub b: String,
    /// Also list up to N pairs whose labels differ (condition, prompt, both labels and outputs).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub show: usize,
}

/// The comparison. Its JSON form has the keys `pgate study compare --json` prints; the hashes and
/// counts only the text form shows are left out of it.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Name of study A.
    pub a: String,
    #[serde(skip)]
    pub a_hash: String,
    pub b: String,
    #[serde(skip)]
    pub b_hash: String,
    /// Conditions with at least one pair, in A's order.
    pub conditions: Vec<ConditionPair>,
    /// The first [`CompareOptions::show`] pairs whose labels differ.
    pub disagreements: Vec<Disagreement>,
    /// Every pair whose labels differ.
    #[serde(skip)]
    pub disagreements_total: usize,
    /// What was asked for with [`CompareOptions::show`].
    #[serde(skip)]
    pub show: usize,
}

/// One condition of both studies over their shared pairs.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionPair {
    pub condition: String,
    pub n: usize,
    pub refusal_a: Rate,
    pub refusal_b: Rate,
    /// Pairs with the same label.
    pub labels_agree: usize,
    /// Pairs whose outputs are the same text (up to surrounding whitespace).
    pub outputs_identical: usize,
    /// On refusal: `b` refused under A only, `c` under B only.
    pub mcnemar: McNemar,
}

/// A pair whose labels differ.
#[derive(Debug, Clone, Serialize)]
pub struct Disagreement {
    pub condition: String,
    pub prompt_id: String,
    pub sample: i64,
    pub label_a: String,
    pub label_b: String,
    pub output_a: String,
    pub output_b: String,
}

/// `(condition, prompt id, prompt text, sample)`: what pairs two rows.
type Key = (String, String, String, i64);
/// `(label, output)` of a row.
type Entry = (String, String);

/// Compare studies `opts.a` and `opts.b` of `db`.
pub fn compare(db: &Path, opts: &CompareOptions) -> OpResult<Comparison> {
    let store = Store::open_read(db)?;
    let ra = store.find_study(Some(&opts.a))?;
    let rb = store.find_study(Some(&opts.b))?;
    let (order, ma) = index(&store, &ra)?;
    let (_, mb) = index(&store, &rb)?;
    let mut conditions = Vec::new();
    let mut flips = Vec::new();
    let mut disagreements_total = 0;
    for c in &order {
        let pairs: Vec<(&Entry, &Entry)> = ma
            .iter()
            .filter(|(k, _)| &k.0 == c)
            .filter_map(|(k, va)| {
                let vb = mb.get(k)?;
                if va.0 != vb.0 {
                    disagreements_total += 1;
                    if flips.len() < opts.show {
                        flips.push(disagreement(k, va, vb));
                    }
                }
                Some((va, vb))
            })
            .collect();
        if !pairs.is_empty() {
            conditions.push(condition_pair(c, &pairs));
        }
    }
    if conditions.is_empty() {
        return refused(format!(
            "studies {} and {} share no (condition name, prompt) pairs with results",
            ra.name, rb.name
        ));
    }
    Ok(Comparison {
        a: ra.name,
        a_hash: ra.hash,
        b: rb.name,
        b_hash: rb.hash,
        conditions,
        disagreements: flips,
        disagreements_total,
        show: opts.show,
    })
}

/// A study's rows by pairing key, and its condition names in order.
fn index(store: &Store, rec: &StudyRecord) -> Result<(Vec<String>, BTreeMap<Key, Entry>)> {
    let mut order = Vec::new();
    let mut m = BTreeMap::new();
    for r in store.rows(&rec.hash)? {
        if !order.contains(&r.condition) {
            order.push(r.condition.clone());
        }
        m.insert(
            (r.condition, r.prompt_id, r.prompt, r.sample),
            (r.label, r.output),
        );
    }
    Ok((order, m))
}

fn condition_pair(condition: &str, pairs: &[(&Entry, &Entry)]) -> ConditionPair {
    let n = pairs.len();
    let refused: Vec<(bool, bool)> = pairs
        .iter()
        .map(|(x, y)| (x.0 == "refusal", y.0 == "refusal"))
        .collect();
    ConditionPair {
        condition: condition.to_string(),
        n,
        refusal_a: wilson(refused.iter().filter(|p| p.0).count(), n),
        refusal_b: wilson(refused.iter().filter(|p| p.1).count(), n),
        labels_agree: pairs.iter().filter(|(x, y)| x.0 == y.0).count(),
        outputs_identical: pairs
            .iter()
            .filter(|(x, y)| x.1.trim() == y.1.trim())
            .count(),
        mcnemar: mcnemar_pairs(&refused),
    }
}

fn disagreement(k: &Key, a: &Entry, b: &Entry) -> Disagreement {
    Disagreement {
        condition: k.0.clone(),
        prompt_id: k.1.clone(),
        sample: k.3,
        label_a: a.0.clone(),
        label_b: b.0.clone(),
        output_a: a.1.clone(),
        output_b: b.1.clone(),
    }
}
