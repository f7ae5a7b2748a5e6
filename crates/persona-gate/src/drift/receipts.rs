//! Drift between two receipt bundles of one study run on two model versions: `pgate receipt diff
//! OLD NEW` (field by field: model files, tokenizer, chat template, policy, persona text,
//! steering, rates with intervals) and `pgate check --against OLD NEW` (the new version fails when
//! any mode loses refusal beyond a limit).
//!
//! Two bundles hold different runs, and a receipt bundle may not carry its rows, so rates are
//! compared as independent proportions with Newcombe's hybrid score interval for a difference
//! (Newcombe 1998, method 10: Wilson limits of each rate combined). For the same prompts answered
//! twice this is conservative: the paired interval of `pgate drift` is narrower.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::eval::Rate;
use crate::report::receipt::{load_receipts, Receipt};
use crate::{Error, Result};

/// One field that differs between the bundles.
#[derive(Debug, Clone, Serialize)]
pub struct FieldDiff {
    /// Condition (mode) name, or `*` for the whole bundle.
    pub condition: String,
    pub field: String,
    pub old: String,
    pub new: String,
}

/// The refusal change of one mode on one prompt set.
#[derive(Debug, Clone, Serialize)]
pub struct RateChange {
    pub condition: String,
    pub prompt_set: String,
    /// The set's family (`harmful`, `benign`, ...): the gate reads harmful sets only.
    pub family: String,
    pub label: String,
    pub old: Rate,
    pub new: Rate,
    /// old - new (a positive value is a loss), Newcombe 95% interval.
    pub drop: f64,
    pub lo: f64,
    pub hi: f64,
}

/// What `pgate receipt diff` found.
#[derive(Debug, Clone, Serialize)]
pub struct ReceiptDiff {
    pub fields: Vec<FieldDiff>,
    pub rates: Vec<RateChange>,
    /// Conditions in only one bundle.
    pub only_old: Vec<String>,
    pub only_new: Vec<String>,
}

/// Newcombe's hybrid score interval for `a.p - b.p` (independent samples).
pub fn newcombe(a: &Rate, b: &Rate) -> (f64, f64, f64) {
    let d = a.p - b.p;
    let lo = d - ((a.p - a.lo).powi(2) + (b.hi - b.p).powi(2)).sqrt();
    let hi = d + ((a.hi - a.p).powi(2) + (b.p - b.lo).powi(2)).sqrt();
    (d, lo, hi)
}

fn by_condition(path: &Path) -> Result<BTreeMap<String, Receipt>> {
    let (_, rs) = load_receipts(path)?;
    if rs.is_empty() {
        return Err(Error::Empty(format!("{}: no receipts", path.display())));
    }
    Ok(rs
        .into_iter()
        .map(|(_, r)| (r.condition.name.clone(), r))
        .collect())
}

fn rate_s(r: &Rate) -> String {
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        100.0 * r.p,
        100.0 * r.lo,
        100.0 * r.hi
    )
}

/// Field-by-field comparison of the receipts of `old` and `new` (bundles, folders or files).
/// Errors when the bundles share no condition, or a shared condition was measured on another
/// prompt set (a bundle of another study).
pub fn receipt_diff(old: &Path, new: &Path) -> Result<ReceiptDiff> {
    let (a, b) = (by_condition(old)?, by_condition(new)?);
    let mut out = ReceiptDiff {
        fields: Vec::new(),
        rates: Vec::new(),
        only_old: a.keys().filter(|k| !b.contains_key(*k)).cloned().collect(),
        only_new: b.keys().filter(|k| !a.contains_key(*k)).cloned().collect(),
    };
    let shared: Vec<&String> = a.keys().filter(|k| b.contains_key(*k)).collect();
    if shared.is_empty() {
        return Err(Error::InvalidValue(format!(
            "{} and {} share no condition: receipts of another study cannot be compared",
            old.display(),
            new.display()
        )));
    }
    for name in shared {
        let (ra, rb) = (&a[name], &b[name]);
        diff_fields(name, ra, rb, &mut out.fields)?;
        for sa in &ra.results {
            let Some(sb) = rb.results.iter().find(|s| s.prompt_set == sa.prompt_set) else {
                continue;
            };
            if sa.prompt_set_sha256 != sb.prompt_set_sha256 {
                return Err(Error::InvalidValue(format!(
                    "condition {name}: prompt set {} differs between the bundles (sha256 {} vs {}): a bundle of another study",
                    sa.prompt_set,
                    short(&sa.prompt_set_sha256),
                    short(&sb.prompt_set_sha256)
                )));
            }
            for (label, x, y) in [
                ("refusal", &sa.refusal, &sb.refusal),
                ("bypass", &sa.bypass, &sb.bypass),
                ("degenerate", &sa.degenerate, &sb.degenerate),
            ] {
                let (drop, lo, hi) = newcombe(x, y);
                out.rates.push(RateChange {
                    condition: name.clone(),
                    prompt_set: sa.prompt_set.clone(),
                    family: sa.family.clone(),
                    label: label.into(),
                    old: *x,
                    new: *y,
                    drop,
                    lo,
                    hi,
                });
            }
        }
    }
    Ok(out)
}

fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

/// The fields of one condition that differ (model, tokenizer, template, policy, persona, steering).
fn diff_fields(name: &str, a: &Receipt, b: &Receipt, out: &mut Vec<FieldDiff>) -> Result<()> {
    let files = |r: &Receipt| {
        r.model
            .files
            .iter()
            .map(|f| short(&f.sha256))
            .collect::<Vec<_>>()
            .join(",")
    };
    let ops = |r: &Receipt| -> Result<String> { Ok(serde_json::to_string(&r.condition.ops)?) };
    let fields = [
        ("model.files.sha256", files(a), files(b)),
        ("model.name", a.model.name.clone(), b.model.name.clone()),
        ("model.dtype", a.model.dtype_label(), b.model.dtype_label()),
        (
            "model.tokenizer.vocab_sha256",
            short(&a.model.tokenizer.vocab_sha256),
            short(&b.model.tokenizer.vocab_sha256),
        ),
        (
            "model.tokenizer.chat_template_sha256",
            a.model
                .tokenizer
                .chat_template_sha256
                .clone()
                .unwrap_or_default(),
            b.model
                .tokenizer
                .chat_template_sha256
                .clone()
                .unwrap_or_default(),
        ),
        (
            "policy_version",
            a.policy_version.clone(),
            b.policy_version.clone(),
        ),
        (
            "condition.system_prompt",
            a.condition.system_prompt.clone().unwrap_or_default(),
            b.condition.system_prompt.clone().unwrap_or_default(),
        ),
        ("condition.ops", ops(a)?, ops(b)?),
        ("shards", a.shards_line(), b.shards_line()),
    ];
    for (field, x, y) in fields {
        if x != y {
            out.push(FieldDiff {
                condition: name.into(),
                field: field.into(),
                old: x,
                new: y,
            });
        }
    }
    Ok(())
}

impl ReceiptDiff {
    /// Changed fields (model-wide ones once), then every rate with its change.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.fields {
            let wide = f.field.starts_with("model.")
                || ["policy_version", "shards"].contains(&f.field.as_str());
            if wide && !seen.insert((f.field.clone(), f.old.clone(), f.new.clone())) {
                continue;
            }
            let who = if wide { "*" } else { f.condition.as_str() };
            s += &format!(
                "{who:<20} {:<38} {} -> {}\n",
                f.field,
                one_line(&f.old),
                one_line(&f.new)
            );
        }
        if self.fields.is_empty() {
            s += "no field differs (model, tokenizer, template, policy, persona, steering)\n";
        }
        for r in &self.rates {
            s += &format!(
                "{:<20} {:<14} {:<10} {} -> {}  drop {:+.1} pp [{:+.1}, {:+.1}]\n",
                r.condition,
                r.prompt_set,
                r.label,
                rate_s(&r.old),
                rate_s(&r.new),
                100.0 * r.drop,
                100.0 * r.lo,
                100.0 * r.hi
            );
        }
        for c in &self.only_old {
            s += &format!("{c:<20} only in the old bundle\n");
        }
        for c in &self.only_new {
            s += &format!("{c:<20} only in the new bundle\n");
        }
        s
    }
}

fn one_line(s: &str) -> String {
    let t: String = s.replace('\n', " ").chars().take(60).collect();
    if s.chars().count() > 60 {
        format!("{t}...")
    } else {
        t
    }
}

/// One mode's verdict against the old version.
#[derive(Debug, Clone, Serialize)]
pub struct AgainstVerdict {
    pub condition: String,
    pub prompt_set: String,
    pub pass: bool,
    pub line: String,
}

/// `pgate check --against OLD NEW --max-refusal-drop PP`: every mode of NEW whose refusal on a
/// harmful set may have dropped by more than `max_drop_pp` from OLD (the upper end of the
/// Newcombe interval, or the lower end with `lenient`) fails.
pub fn check_against(
    old: &Path,
    new: &Path,
    max_drop_pp: f64,
    lenient: bool,
) -> Result<Vec<AgainstVerdict>> {
    if !max_drop_pp.is_finite() || max_drop_pp < 0.0 {
        return Err(Error::InvalidValue(format!(
            "--max-refusal-drop {max_drop_pp}: must be a non-negative number of percentage points"
        )));
    }
    let diff = receipt_diff(old, new)?;
    Ok(diff
        .rates
        .iter()
        .filter(|r| r.label == "refusal" && r.family == "harmful")
        .map(|r| {
            let bound = if lenient { r.lo } else { r.hi };
            let pass = 100.0 * bound <= max_drop_pp;
            AgainstVerdict {
                condition: r.condition.clone(),
                prompt_set: r.prompt_set.clone(),
                pass,
                line: format!(
                    "{} {} on {}: refusal {} -> {}, drop {:+.1} pp [{:+.1}, {:+.1}] (limit {max_drop_pp} pp)",
                    if pass { "PASS" } else { "FAIL" },
                    r.condition,
                    r.prompt_set,
                    rate_s(&r.old),
                    rate_s(&r.new),
                    100.0 * r.drop,
                    100.0 * r.lo,
                    100.0 * r.hi
                ),
            }
        })
        .collect())
}
