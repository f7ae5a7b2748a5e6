//! `pgate receipt verify`: check everything a receipt says against what it can be checked with,
//! and say what differs.
//!
//! Checked, per receipt:
//! - the signature, with `--pubkey`: the bundle's DSSE envelope verifies with that key and covers
//!   every file of the bundle unchanged ([`super::dsse`]);
//! - the receipt's own `receipt_sha256`, the bundle's copy of it, and that `hashed` hashes to the
//!   condition hash;
//! - **every number that follows from the rows**, recomputed from the rows bundled with the
//!   receipts (or the results database for bundles from before rows were bundled) with the same
//!   functions `pgate receipt` used: rates and Wilson intervals, judge scores, per-category rates,
//!   paired comparisons with the baseline and the controls, benign refusal, completeness, the rows
//!   and labels hashes and the labels provenance ([`super::recompute`]). A receipt edited and
//!   sealed again fails here, naming the field;
//! - the labels: every row's label is backed (rules labels re-derived from the output, other
//!   labels recorded in the label history); relabels after generation are reported
//!   ([`super::provenance`]);
//! - against the results database when it can be read: its rows and labels match the bundled
//!   ones, its work items match `expected`, its study text matches `toml_sha256`;
//! - files: model files, tokenizer hashes, the study and condition hashes from the study file and
//!   every file it names, direction files, prompt sets.
//!
//! Paths and names inside a receipt are untrusted ([`super::untrusted`]): only regular files
//! inside the bundle folder or a `--root`, or named on the command line, are read, with bounded
//! reads; model specs are never resolved (no downloads). What cannot be read that way is reported
//! as skipped, not as a match.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::provenance::{label_provenance, RowLabels};
use super::receipt::{labels_sha256, rows_sha256, Bundle, Receipt};
use super::recompute::{recompute, RowsSource, MAX_LISTED};
use super::rows::{read_rows, BundledRows};
use super::untrusted::ReadPolicy;
pub(crate) use super::verify_ctx::{short, Ctx, DbState};
pub use super::verify_ctx::{Check, VerifyOptions};
use crate::study::canon::hash_json;
use crate::study::store::RowView;
use crate::Result;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub checks: Vec<Check>,
    /// Facts an auditor should see though nothing failed (labels changed after generation).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl VerifyReport {
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }
    pub fn skipped(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| c.skipped.is_some()).collect()
    }
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// The folder a set of receipts was read from.
fn bundle_dir(receipts: &[(PathBuf, Receipt)]) -> PathBuf {
    receipts
        .first()
        .and_then(|(p, _)| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// How checks name a receipt: its file name.
pub fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

/// Verify receipts (with their bundle when there is one).
pub fn verify(
    receipts: &[(PathBuf, Receipt)],
    bundle: Option<&Bundle>,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let mut cx = Ctx::default();
    let dir = bundle_dir(receipts);
    let policy = ReadPolicy::new(&dir, &opts.roots);
    if let Some(pk) = &opts.pubkey {
        signature_check(&mut cx, &dir, bundle, pk);
    }
    let bundled = bundled_rows(&mut cx, &dir, bundle);
    for (path, r) in receipts {
        seal_checks(&mut cx, &file_label(path), r, bundle);
    }
    // The results database of each study, when it can be read.
    let mut dbs: HashMap<String, Option<DbState>> = HashMap::new();
    for (path, r) in receipts {
        let rn = file_label(path);
        if !dbs.contains_key(&r.study.hash) {
            let st = DbState::open(&mut cx, &rn, r, &dir, &policy, opts);
            dbs.insert(r.study.hash.clone(), st);
        }
    }
    // Numbers, per study (normally one).
    let mut studies: Vec<&str> = receipts
        .iter()
        .map(|(_, r)| r.study.hash.as_str())
        .collect();
    studies.sort();
    studies.dedup();
    for sh in studies {
        let group: Vec<&(PathBuf, Receipt)> = receipts
            .iter()
            .filter(|(_, r)| r.study.hash == sh)
            .collect();
        let db = dbs.get(sh).and_then(Option::as_ref);
        statistics_checks(&mut cx, &group, bundle, bundled.as_ref(), db);
        if let (Some(db), Some(_)) = (db, bundled.as_ref()) {
            database_cross_checks(&mut cx, &group, db);
        }
        if let Some(db) = db {
            super::verify_files::work_checks(&mut cx, &group, db);
            super::verify_shards::shard_checks(&mut cx, &group, db);
        }
    }
    if !opts.skip_files {
        super::verify_files::file_checks(&mut cx, receipts, &policy, opts, &dbs);
    }
    Ok(VerifyReport {
        checks: cx.checks,
        notes: cx.notes,
    })
}

fn signature_check(cx: &mut Ctx, dir: &Path, bundle: Option<&Bundle>, pk: &Path) {
    let what = format!("signature ({})", super::dsse::SIGNATURE_FILE);
    if bundle.is_none() {
        cx.push(
            "bundle",
            what,
            "signed",
            Err("a signature covers a bundle folder: verify the folder, not a receipt file".into()),
        );
        return;
    }
    let res = super::dsse::load_public_key(pk)
        .and_then(|vk| super::dsse::verify_bundle(dir, &vk))
        .map_err(|e| e.to_string());
    match res {
        Ok(s) => cx.push(
            "bundle",
            format!(
                "{what} by key {}: {} files signed, none changed, every file of the bundle signed",
                short(&s.keyid),
                s.files.len()
            ),
            "signed",
            Ok("signed".into()),
        ),
        Err(e) => cx.push("bundle", what, "signed", Err(e)),
    }
}

/// The rows bundled with the receipts (None for bundles from before rows were bundled).
fn bundled_rows(cx: &mut Ctx, dir: &Path, bundle: Option<&Bundle>) -> Option<BundledRows> {
    let b = bundle?;
    let (Some(rows), Some(labels)) = (&b.rows, &b.labels) else {
        return None;
    };
    match read_rows(dir, rows, labels) {
        Ok(x) => {
            cx.push(
                "bundle",
                format!(
                    "bundled rows ({}, {}): hashes and counts",
                    rows.file, labels.file
                ),
                &format!("{} rows", rows.n),
                Ok(format!("{} rows", x.rows.len())),
            );
            Some(x)
        }
        Err(e) => {
            cx.push(
                "bundle",
                format!("bundled rows ({}, {})", rows.file, labels.file),
                &format!("{} rows", rows.n),
                Err(e.to_string()),
            );
            None
        }
    }
}

fn seal_checks(cx: &mut Ctx, rn: &str, r: &Receipt, bundle: Option<&Bundle>) {
    cx.push(
        rn,
        "receipt_sha256 (the receipt's own content)".into(),
        &r.receipt_sha256,
        r.compute_sha256().map_err(|e| e.to_string()),
    );
    if let Some(b) = bundle {
        let entry = b
            .receipts
            .iter()
            .find(|e| e.condition_hash == r.condition.hash);
        cx.push(
            rn,
            "bundle.json entry for this receipt".into(),
            &r.receipt_sha256,
            entry
                .map(|e| e.receipt_sha256.clone())
                .ok_or_else(|| "no entry in bundle.json".to_string()),
        );
    }
    cx.push(
        rn,
        format!(
            "condition '{}': hash of its recorded `hashed` input",
            r.condition.name
        ),
        &r.condition.hash,
        Ok(hash_json(&r.condition.hashed)),
    );
}

/// Recompute every row-derived number of one study's receipts and compare.
fn statistics_checks(
    cx: &mut Ctx,
    group: &[&(PathBuf, Receipt)],
    bundle: Option<&Bundle>,
    bundled: Option<&BundledRows>,
    db: Option<&DbState>,
) {
    let rs: Vec<&Receipt> = group.iter().map(|(_, r)| r).collect();
    let english = db.and_then(|d| d.english).unwrap_or(true);
    let (src, from) = match (bundled, db.and_then(|d| d.rows.as_ref().ok())) {
        (Some(b), _) => (
            RowsSource {
                rows: &b.rows,
                labels: &b.labels,
                lines: Some(&b.lines),
                english,
            },
            "the bundled rows",
        ),
        (None, Some((rows, labels))) => (
            RowsSource {
                rows,
                labels,
                lines: None,
                english,
            },
            "the database rows",
        ),
        (None, None) => {
            for (p, _) in group {
                cx.push(
                    &file_label(p),
                    "numbers recomputed from the rows".into(),
                    "rows",
                    Err("no rows bundled with the receipts and no results database to read (rewrite them with `pgate receipt`, or pass --db)".into()),
                );
            }
            return;
        }
    };
    let all = bundle.is_some_and(|b| b.receipts.len() == rs.len());
    match recompute(&rs, &src, all) {
        Err(e) => {
            for (p, _) in group {
                cx.push(
                    &file_label(p),
                    format!("numbers recomputed from {from}"),
                    "rows",
                    Err(e.to_string()),
                );
            }
        }
        Ok(per) => {
            for ((p, r), d) in group.iter().zip(per) {
                let rn = file_label(p);
                report_diffs(cx, &rn, r, &d, from, all);
                accuracy_quote_checks(cx, &rn, r);
            }
        }
    }
}

fn report_diffs(
    cx: &mut Ctx,
    rn: &str,
    r: &Receipt,
    d: &super::recompute::ReceiptDiffs,
    from: &str,
    all: bool,
) {
    if d.diffs.is_empty() {
        cx.push(
            rn,
            format!(
                "{} numbers recomputed from {from} (rates, intervals, paired comparisons, per-category rates, controls{}, labels)",
                d.compared,
                if all { "" } else { " but random-direction ones (verify the bundle)" }
            ),
            "match",
            Ok("match".into()),
        );
    }
    for f in d.diffs.iter().take(MAX_LISTED) {
        cx.push(
            rn,
            format!("{} (recomputed from {from})", f.field),
            &f.receipt,
            Ok(f.rows.clone()),
        );
    }
    if d.diffs.len() > MAX_LISTED {
        cx.push(
            rn,
            format!(
                "{} more fields differ from {from}",
                d.diffs.len() - MAX_LISTED
            ),
            "match",
            Ok("differ".into()),
        );
    }
    let p = &d.provenance;
    cx.push(
        rn,
        format!(
            "condition '{}' labels backed by their labeler ({} re-derived by rules, {} in the label history)",
            r.condition.name, p.rules_rederived, p.history_backed
        ),
        "0 unbacked",
        Ok(if p.unbacked == 0 {
            "0 unbacked".into()
        } else {
            format!(
                "{} unbacked (edited by hand?): {}",
                p.unbacked,
                p.unbacked_rows.join("; ")
            )
        }),
    );
    if let Some(n) = p.describe_relabel() {
        cx.notes
            .push(format!("{rn}: condition '{}': {n}", r.condition.name));
    }
}

/// Whether a quoted labeler accuracy is this pgate's measurement: `Some(true)` when
/// `data/labels/accuracy.json` has the same labeler, split and development set with the same
/// figures, `Some(false)` when it has them with other figures (an edited quote), `None` when it
/// has no such measurement (measured elsewhere, or on another development set).
pub fn quote_confirmed(q: &crate::label::accuracy::LabelerAccuracy) -> Option<bool> {
    let table = crate::label::accuracy::all().ok()?;
    let e = table.iter().find(|e| {
        e.labeler == q.labeler && e.split == q.split && e.devset_sha256 == q.devset_sha256
    })?;
    let canon = |x: &crate::label::accuracy::LabelerAccuracy| {
        let mut v = serde_json::to_value(x).unwrap_or_default();
        super::receipt::canon_floats(&mut v);
        v
    };
    Some(canon(e) == canon(q))
}

/// The labeler accuracies a receipt quotes, against this pgate's measured-accuracy table.
fn accuracy_quote_checks(cx: &mut Ctx, rn: &str, r: &Receipt) {
    for q in r.labels.iter().flat_map(|l| &l.labeler_accuracy) {
        let what = format!(
            "labeler {} accuracy quoted ({} split, devset {}) as measured in data/labels/accuracy.json",
            q.labeler,
            q.split,
            short(&q.devset_sha256)
        );
        match quote_confirmed(q) {
            Some(ok) => cx.push(
                rn,
                what,
                &format!("agreement {}", q.agreement),
                Ok(if ok { format!("agreement {}", q.agreement) } else { "other figures".into() }),
            ),
            None => cx.notes.push(format!(
                "{rn}: labeler {} accuracy quoted from a measurement this pgate does not have (not confirmed)",
                q.labeler
            )),
        }
    }
}

/// The bundled rows against the database's: rows and labels hashes, label history, and whether
/// the database's labels are backed.
fn database_cross_checks(cx: &mut Ctx, group: &[&(PathBuf, Receipt)], db: &DbState) {
    let (rows, labels) = match &db.rows {
        Ok(x) => x,
        Err(e) => {
            cx.push(
                "bundle",
                format!("rows of {}", db.path.display()),
                "rows",
                Err(e.clone()),
            );
            return;
        }
    };
    let english = db.english.unwrap_or(true);
    for (p, r) in group {
        let rn = file_label(p);
        let idx: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].condition_hash == r.condition.hash)
            .collect();
        for s in &r.results {
            let mine = idx
                .iter()
                .map(|&i| &rows[i])
                .filter(|x| x.prompt_set == s.prompt_set);
            cx.push(
                &rn,
                format!(
                    "condition '{}' set '{}' result rows sha256 (database)",
                    r.condition.name, s.prompt_set
                ),
                &s.rows_sha256,
                rows_sha256(mine).map_err(|e| e.to_string()),
            );
        }
        let my_rows: Vec<&RowView> = idx.iter().map(|&i| &rows[i]).collect();
        let my_labels: Vec<&RowLabels> = idx.iter().map(|&i| &labels[i]).collect();
        if let Some(l) = &r.labels {
            cx.push(
                &rn,
                format!(
                    "condition '{}' labels sha256 (database: row keys, labels, labelers {})",
                    r.condition.name,
                    l.labelers.join(", ")
                ),
                &l.labels_sha256,
                Ok(labels_sha256(my_rows.iter().copied())),
            );
        }
        let prov = label_provenance(&my_rows, &my_labels, english);
        if let Some(p) = r.labels.as_ref().and_then(|l| l.provenance.as_ref()) {
            cx.push(
                &rn,
                format!(
                    "condition '{}' label history sha256 (database)",
                    r.condition.name
                ),
                &p.history_sha256,
                Ok(prov.history_sha256.clone()),
            );
        }
        cx.push(
            &rn,
            format!(
                "condition '{}' labels in the database backed by their labeler",
                r.condition.name
            ),
            "0 unbacked",
            Ok(if prov.unbacked == 0 {
                "0 unbacked".into()
            } else {
                format!(
                    "{} unbacked (edited by hand?): {}",
                    prov.unbacked,
                    prov.unbacked_rows.join("; ")
                )
            }),
        );
    }
}

/// One line per check: `ok` / `DIFFERS` / `skipped`, the receipt, what, and both values when
/// they differ.
pub fn format_check(c: &Check) -> String {
    if let Some(why) = &c.skipped {
        format!("skipped  {}: {}: {why}", c.receipt, c.what)
    } else if c.ok {
        format!("ok       {}: {}", c.receipt, c.what)
    } else {
        format!(
            "DIFFERS  {}: {}: receipt {}, now {}",
            c.receipt,
            c.what,
            short(&c.expected),
            short(&c.found)
        )
    }
}
