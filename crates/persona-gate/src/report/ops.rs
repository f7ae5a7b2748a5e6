//! Whole report operations, as `pgate receipt`, `pgate receipt verify|sign`, `pgate report` and
//! `pgate check` run them: thin entry points over the modules of [`super`] that return typed
//! results, each with the text the command prints.
//!
//! Why: which database a receipts folder reads its rows from, what a bundle must pass before it
//! is signed and how the report's files are written are decisions about receipts, not about a
//! command line; a caller other than `pgate` should make them the same way.

use std::path::{Path, PathBuf};

use super::dsse;
use super::gate::format_verdict;
use super::html::figures;
use super::receipt::{load_receipts, resolve_stored, write_receipts_noting};
use super::untrusted::{Located, ReadPolicy};
use super::verify::format_check;
use super::{
    build_receipts, check, cosine_map, render_html, render_markdown, verify, Bundle, GateOptions,
    GateReport, Receipt, ReceiptOptions, ReportInput, VerifyOptions, VerifyReport,
};
use crate::fsutil::write_atomic;
use crate::study::store::RowView;
use crate::study::Store;
use crate::{Error, Result};

/// Receipts written for one study.
#[derive(Debug, Clone)]
pub struct ReceiptsWritten {
    pub bundle: Bundle,
    pub receipts: Vec<Receipt>,
    pub files: Vec<PathBuf>,
    pub out: PathBuf,
    /// A signature of the previous receipts was removed (it no longer matches).
    pub removed_signature: bool,
}

/// Build the receipts of a study in the database `db` and write them with their bundle to `out`.
pub fn write_study_receipts(
    db: &Path,
    out: &Path,
    opts: &ReceiptOptions,
) -> Result<ReceiptsWritten> {
    let sr = build_receipts(db, opts)?;
    let (files, removed_signature) = write_receipts_noting(&sr, out)?;
    Ok(ReceiptsWritten {
        bundle: sr.bundle,
        receipts: sr.receipts,
        files,
        out: out.to_path_buf(),
        removed_signature,
    })
}

impl ReceiptsWritten {
    /// The study, then one line per condition with its refusal rates (stdout).
    pub fn summary(&self) -> String {
        let s = &self.bundle.study;
        let mut out = format!(
            "study {} ({}): {} receipts -> {}\n",
            s.name,
            &s.hash[..12.min(s.hash.len())],
            self.receipts.len(),
            self.out.display()
        );
        for r in &self.receipts {
            let rates: Vec<String> = r
                .results
                .iter()
                .map(|s| {
                    format!(
                        "{} refusal {:.1}% [{:.1}, {:.1}] n={}",
                        s.prompt_set,
                        100.0 * s.refusal.p,
                        100.0 * s.refusal.lo,
                        100.0 * s.refusal.hi,
                        s.n
                    )
                })
                .collect();
            out += &format!(
                "  {:<32} {}  {}{}\n",
                r.condition.name,
                &r.condition.hash[..12.min(r.condition.hash.len())],
                rates.join("; "),
                if r.complete { "" } else { "  (incomplete)" }
            );
        }
        out
    }

    /// What a person should know (stderr): labels changed after generation, labels backed by no
    /// labeler, the shards a merged study came from, no policy given, a signature removed, the
    /// files written.
    pub fn notes(&self) -> Vec<String> {
        let mut v = label_notes(&self.receipts);
        if let Some(s) = self.receipts.iter().find_map(|r| r.shards.as_ref()) {
            let differing: usize = self
                .receipts
                .iter()
                .filter_map(|r| r.shards.as_ref())
                .map(|s| s.differing.len())
                .sum();
            v.push(format!(
                "merged study: {}; recorded in each receipt's `shards`{}",
                s.summary(),
                if differing > 0 {
                    format!(" ({differing} results differed between shard databases: the first was kept)")
                } else {
                    String::new()
                }
            ));
        }
        if self.bundle.policy_version == "unspecified" {
            v.push("no --policy given: receipts record policy_version \"unspecified\"".into());
        }
        if self.removed_signature {
            v.push(format!(
                "removed {}: it signed the previous receipts (sign again with `pgate receipt sign`)",
                self.out.join(dsse::SIGNATURE_FILE).display()
            ));
        }
        v.push(format!("wrote {} files", self.files.len()));
        v
    }
}

/// When labels were changed after generation, and loudly when some are backed by nothing.
fn label_notes(receipts: &[Receipt]) -> Vec<String> {
    let mut v = Vec::new();
    for r in receipts {
        let Some(p) = r.labels.as_ref().and_then(|l| l.provenance.as_ref()) else {
            continue;
        };
        if p.unbacked > 0 {
            v.push(format!(
                "WARNING: {}: {} labels are backed by no labeler (edited by hand?): {}; `pgate receipt verify` and `pgate check` fail this receipt",
                r.condition.name,
                p.unbacked,
                p.unbacked_rows.join("; ")
            ));
        }
        if let Some(n) = p.describe_relabel() {
            v.push(format!("{}: {n}", r.condition.name));
        }
    }
    v
}

/// A verification of receipts at a path.
#[derive(Debug, Clone)]
pub struct Verified {
    pub report: VerifyReport,
    pub n_receipts: usize,
}

/// Load the receipts at `path` (a receipt, a `bundle.json` or a folder) and check them.
pub fn verify_path(path: &Path, opts: &VerifyOptions) -> Result<Verified> {
    let (bundle, receipts) = load_receipts(path)?;
    let report = verify(&receipts, bundle.as_ref(), opts)?;
    Ok(Verified {
        report,
        n_receipts: receipts.len(),
    })
}

impl Verified {
    /// The checks that differ (every check when `verbose`), notes, and a closing count.
    pub fn to_text(&self, verbose: bool) -> String {
        let rep = &self.report;
        let mut out = String::new();
        for c in &rep.checks {
            if verbose || !c.ok {
                out += &format!("{}\n", format_check(c));
            }
        }
        for n in &rep.notes {
            out += &format!("note     {n}\n");
        }
        let bad = rep.failures().len();
        let skipped = rep.skipped().len();
        out += &format!(
            "{} receipts, {} checks: {}{}\n",
            self.n_receipts,
            rep.checks.len() - skipped,
            if bad == 0 {
                "all match".to_string()
            } else {
                format!("{bad} differ")
            },
            if skipped == 0 {
                String::new()
            } else {
                format!(
                    "; {skipped} not checked (files outside the bundle folder: pass --root DIR, --model, --study-file or --db; -v lists them)"
                )
            }
        );
        out
    }
}

/// How a signing request ended.
#[derive(Debug, Clone)]
pub enum SignOutcome {
    /// The envelope at `path`, by key `keyid`, over `files` files.
    Signed {
        path: PathBuf,
        keyid: String,
        files: usize,
    },
    /// The bundle does not check out (seals, numbers against its rows, labels): these checks fail.
    Refused { failures: Vec<String> },
}

/// Sign the bundle folder `dir` with the private key at `key`, only if it checks out.
pub fn sign_checked(dir: &Path, key: &Path) -> Result<SignOutcome> {
    let key = dsse::load_signing_key(key)?;
    let (bundle, receipts) = load_receipts(dir)?;
    let bundle = bundle.ok_or_else(|| {
        Error::InvalidValue("sign a bundle folder (with bundle.json), not a receipt file".into())
    })?;
    if bundle.rows.is_none() {
        return Err(Error::InvalidValue(format!(
            "{}: the bundle has no rows (written by an older pgate): write it again with `pgate receipt DB -o DIR` so the signature covers the rows",
            dir.display()
        )));
    }
    // Sign only what checks out: seals, the numbers against the bundled rows, the labels.
    let opts = VerifyOptions {
        skip_files: true,
        ..Default::default()
    };
    let rep = verify(&receipts, Some(&bundle), &opts)?;
    let failures: Vec<String> = rep.failures().into_iter().map(format_check).collect();
    if !failures.is_empty() {
        return Ok(SignOutcome::Refused { failures });
    }
    let (path, keyid) = dsse::sign_bundle(dir, &key)?;
    Ok(SignOutcome::Signed {
        path,
        keyid,
        files: dsse::bundle_files(&bundle)?.len(),
    })
}

/// The report's files.
#[derive(Debug, Clone)]
pub struct ReportWritten {
    pub html: PathBuf,
    pub html_bytes: usize,
    pub markdown: PathBuf,
    pub plots_drawn: usize,
    /// Plots that do not apply to this study (their ids).
    pub not_applicable: Vec<String>,
}

impl ReportWritten {
    pub fn summary(&self) -> String {
        format!(
            "{} ({} KiB, {} plots drawn{}), {}",
            self.html.display(),
            self.html_bytes / 1024,
            self.plots_drawn,
            if self.not_applicable.is_empty() {
                String::new()
            } else {
                format!(", not applicable: {}", self.not_applicable.join(", "))
            },
            self.markdown.display()
        )
    }
}

/// The flags of `pgate report`.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ReportFlags {
    /// A results database, or a receipts folder / bundle.json (its database is the one it names).
    pub input: PathBuf,
    /// Folder for report.html and summary.md.
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
    /// Results database when INPUT is a receipts folder and the database moved.
    #[cfg_attr(feature = "cli", arg(long))]
    pub db: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub common: ReceiptOptions,
    /// Also gate in the Markdown summary with this refusal-drop limit (points).
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_refusal_drop: Option<f64>,
}

impl ReportFlags {
    /// [`write_report`] of the flags.
    pub fn write(&self) -> Result<ReportWritten> {
        let db = self.db.as_deref();
        write_report(
            &self.input,
            &self.out,
            db,
            &self.common,
            self.max_refusal_drop,
        )
    }
}

/// Write `report.html` and `summary.md` into `out` for `input`: a results database, or a receipts
/// folder / `bundle.json` (rows bundled, else from `db` or the database the bundle names when it
/// lies in the bundle folder). With `max_refusal_drop`, the summary also gates on it.
pub fn write_report(
    input: &Path,
    out: &Path,
    db: Option<&Path>,
    opts: &ReceiptOptions,
    max_refusal_drop: Option<f64>,
) -> Result<ReportWritten> {
    let (bundle, receipts, rows, study) = if is_receipts_path(input) {
        let (bundle, rs) = load_receipts(input)?;
        let bundle = bundle.ok_or_else(|| {
            Error::InvalidValue("a report needs the bundle.json of a study's receipts".into())
        })?;
        let (rows, store) = receipts_rows(input, &bundle, db)?;
        let study = store
            .as_ref()
            .and_then(|st| st.find_study(Some(&bundle.study.hash)).ok())
            .and_then(|rec| resolve_stored(&rec, opts.study_file.as_deref()).ok());
        let receipts: Vec<Receipt> = rs.into_iter().map(|(_, r)| r).collect();
        (bundle, receipts, rows, study)
    } else {
        let sr = build_receipts(input, opts)?;
        (sr.bundle, sr.receipts, sr.rows, Some(sr.study))
    };
    let (cosines, cosine_note) = match (&study, receipts.first()) {
        (Some(s), Some(r)) => match cosine_map(
            s,
            r.model.n_layers,
            r.model.d_model,
            opts.refusal_direction.as_deref(),
        ) {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(format!("No cosine map: {e}."))),
        },
        _ => (
            None,
            Some("No cosine map: the study's direction files could not be read.".into()),
        ),
    };
    let input = ReportInput {
        bundle: &bundle,
        receipts: &receipts,
        rows: &rows,
        cosines,
        cosine_note,
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let html = render_html(&input);
    let hp = out.join("report.html");
    write_atomic(&hp, html.as_bytes())?;
    let gate: Option<GateReport> = match max_refusal_drop {
        Some(pp) => Some(check(
            &receipts,
            &GateOptions {
                max_refusal_drop: pp,
                ..Default::default()
            },
        )?),
        None => None,
    };
    let md = render_markdown(&bundle, &receipts, gate.as_ref());
    let mp = out.join("summary.md");
    write_atomic(&mp, md.as_bytes())?;
    let figs = figures(&input);
    Ok(ReportWritten {
        html: hp,
        html_bytes: html.len(),
        markdown: mp,
        plots_drawn: figs.iter().filter(|f| f.svg.is_some()).count(),
        not_applicable: figs
            .iter()
            .filter(|f| f.svg.is_none())
            .map(|f| f.id.clone())
            .collect(),
    })
}

fn is_receipts_path(p: &Path) -> bool {
    (p.is_dir() && p.join("bundle.json").exists()) || p.extension().is_some_and(|e| e == "json")
}

/// The rows of a receipts folder: bundled when the bundle has them, else from the database
/// (`db`, or the one the bundle names when it lies in the bundle folder).
fn receipts_rows(
    input: &Path,
    bundle: &Bundle,
    db: Option<&Path>,
) -> Result<(Vec<RowView>, Option<Store>)> {
    let dir = if input.is_dir() {
        input.to_path_buf()
    } else {
        input.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let recorded = PathBuf::from(&bundle.study.results_db);
    let located = match db {
        Some(p) => ReadPolicy::explicit(p),
        None => {
            let pol = ReadPolicy::new(&dir, &[]);
            match pol.locate(&recorded) {
                Located::File(p) => Located::File(p),
                other => recorded
                    .file_name()
                    .map(|n| pol.locate(&dir.join(n)))
                    .filter(|l| matches!(l, Located::File(_)))
                    .unwrap_or(other),
            }
        }
    };
    let store = match located {
        Located::File(p) => Some(Store::open_read(&p)?),
        _ => None,
    };
    if let (Some(r), Some(l)) = (&bundle.rows, &bundle.labels) {
        let b = super::rows::read_rows(&dir, r, l)?;
        return Ok((b.rows, store));
    }
    let Some(st) = store else {
        return Err(Error::InvalidValue(format!(
            "{}: the bundle holds no rows and its database {} is not in the bundle folder: pass --db",
            input.display(),
            bundle.study.results_db
        )));
    };
    let rec = st.find_study(Some(&bundle.study.hash))?;
    let rows = st.rows(&rec.hash)?;
    Ok((rows, Some(st)))
}

impl GateReport {
    /// One line per condition, then PASS or FAIL with the limits (`pgate check`).
    pub fn to_text(&self, max_refusal_drop: f64, bound: &str) -> String {
        let mut out: String = self
            .verdicts
            .iter()
            .map(|v| format!("{}\n", format_verdict(v)))
            .collect();
        let failed = self.verdicts.iter().filter(|v| !v.pass).count();
        out += &format!(
            "{}: {} of {} conditions fail (max refusal drop {} points, {} bound of the 95% interval)\n",
            if failed == 0 { "PASS" } else { "FAIL" },
            failed,
            self.verdicts.len(),
            max_refusal_drop,
            bound
        );
        out
    }
}
