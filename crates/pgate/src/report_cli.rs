//! `pgate receipt`, `pgate receipt verify`, `pgate report` and `pgate check`: refusal receipts,
//! the offline HTML report with its Markdown summary, and the deployment gate.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use persona_gate::report::gate::{format_verdict, parse_rate};
use persona_gate::report::receipt::{load_receipts, resolve_stored};
use persona_gate::report::verify::format_check;
use persona_gate::report::{
    build_receipts, check, cosine_map, render_html, render_markdown, verify, write_receipts, Bound,
    Bundle, GateOptions, Receipt, ReceiptOptions, ReportInput, VerifyOptions,
};
use persona_gate::study::Store;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReceiptArgs {
    #[command(subcommand)]
    pub cmd: Option<ReceiptSub>,
    /// The study's results database (from `pgate study run`).
    #[arg(required = true)]
    pub db: Option<PathBuf>,
    /// Folder to write `bundle.json` and one receipt per condition into.
    #[arg(short, long, required = true)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: ReceiptCommon,
}

#[derive(clap::Args, Clone, Default)]
pub struct ReceiptCommon {
    /// Study name or hash prefix (default: the most recently run in the database).
    #[arg(long)]
    pub study: Option<String>,
    /// The safety-policy version to record (e.g. "acme-safety-2026.11").
    #[arg(long)]
    pub policy: Option<String>,
    /// A benign prompt set (repeatable; default: sets whose name or source contains
    /// "harmless" or "benign").
    #[arg(long)]
    pub benign: Vec<String>,
    /// The study file, if it moved since `pgate study run` (relative paths resolve from it).
    #[arg(long)]
    pub study_file: Option<PathBuf>,
    /// The refusal direction's name in the study (default: names containing "refusal").
    #[arg(long)]
    pub refusal_direction: Option<String>,
}

impl ReceiptCommon {
    fn options(&self) -> ReceiptOptions {
        ReceiptOptions {
            study: self.study.clone(),
            policy_version: self.policy.clone(),
            benign: self.benign.clone(),
            study_file: self.study_file.clone(),
            refusal_direction: self.refusal_direction.clone(),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum ReceiptSub {
    /// Recompute every hash a receipt records (model files, tokenizer, study, conditions,
    /// directions, prompt sets, result rows) and say which differ. Exit 1 when any differs.
    ///
    /// Example: pgate receipt verify receipts/
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A receipt file, a bundle.json, or a folder holding one.
    pub receipt: PathBuf,
    /// Results database (default: the one the receipts name).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Study file (default: the one the receipts name).
    #[arg(long)]
    pub study_file: Option<PathBuf>,
    /// Print every check, not only those that differ.
    #[arg(long, short)]
    pub verbose: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// A results database, or a receipts folder / bundle.json (its database is the one it names).
    pub input: PathBuf,
    /// Folder for report.html and summary.md.
    #[arg(short, long)]
    pub out: PathBuf,
    /// Results database when INPUT is a receipts folder and the database moved.
    #[arg(long)]
    pub db: Option<PathBuf>,
    #[command(flatten)]
    pub common: ReceiptCommon,
    /// Also gate in the Markdown summary with this refusal-drop limit (points).
    #[arg(long)]
    pub max_refusal_drop: Option<f64>,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// A receipts folder (bundle.json), a bundle.json, or receipt files.
    #[arg(required = true)]
    pub receipts: Vec<PathBuf>,
    /// Largest allowed drop in refusal rate against the baseline, in percentage points, judged by
    /// the 95% interval's upper end (see --bound).
    #[arg(long)]
    pub max_refusal_drop: f64,
    /// Largest allowed unsafe rate (0.05 or 5%), from a safety judge's verdicts.
    #[arg(long)]
    pub max_unsafe_rate: Option<String>,
    /// Largest allowed refusal rate on benign prompts (0.1 or 10%).
    #[arg(long)]
    pub max_benign_refusal: Option<String>,
    /// Smallest allowed measured agreement of the labelers that labeled the rows (0.95 or 95%):
    /// fails when a receipt's labeler was not measured or agrees less with careful labels.
    #[arg(long)]
    pub min_labeler_accuracy: Option<String>,
    /// Which end of each 95% interval is compared with the limits: upper (fail unless the data rule
    /// a violation out; default) or lower (fail only on a significant violation).
    #[arg(long, default_value = "upper")]
    pub bound: String,
    /// Only these conditions (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run_receipt(a: ReceiptArgs) -> Result<()> {
    if let Some(ReceiptSub::Verify(v)) = a.cmd {
        return run_verify(v);
    }
    let (Some(db), Some(out)) = (a.db, a.out) else {
        bail!("usage: pgate receipt STUDY_DB -o DIR (or pgate receipt verify RECEIPT)");
    };
    let sr = build_receipts(&db, &a.common.options())?;
    let files = write_receipts(&sr, &out)?;
    println!(
        "study {} ({}): {} receipts -> {}",
        sr.bundle.study.name,
        &sr.bundle.study.hash[..12],
        sr.receipts.len(),
        out.display()
    );
    for r in &sr.receipts {
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
        println!(
            "  {:<32} {}  {}{}",
            r.condition.name,
            &r.condition.hash[..12],
            rates.join("; "),
            if r.complete { "" } else { "  (incomplete)" }
        );
    }
    if sr.bundle.policy_version == "unspecified" {
        eprintln!("[pgate] no --policy given: receipts record policy_version \"unspecified\"");
    }
    eprintln!("[pgate] wrote {} files", files.len());
    Ok(())
}

fn run_verify(a: VerifyArgs) -> Result<()> {
    let (bundle, receipts) = load_receipts(&a.receipt)?;
    let rep = verify(
        &receipts,
        bundle.as_ref(),
        &VerifyOptions {
            db: a.db,
            study_file: a.study_file,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        for c in &rep.checks {
            if a.verbose || !c.ok {
                println!("{}", format_check(c));
            }
        }
        let bad = rep.failures().len();
        println!(
            "{} receipts, {} checks: {}",
            receipts.len(),
            rep.checks.len(),
            if bad == 0 {
                "all match".to_string()
            } else {
                format!("{bad} differ")
            }
        );
    }
    if !rep.ok() {
        std::process::exit(1);
    }
    Ok(())
}

fn is_receipts_path(p: &Path) -> bool {
    (p.is_dir() && p.join("bundle.json").exists()) || p.extension().is_some_and(|e| e == "json")
}

pub fn run_report(a: ReportArgs) -> Result<()> {
    let opts = a.common.options();
    // Receipts, rows and the re-read study.
    let (bundle, receipts, rows, study) = if is_receipts_path(&a.input) {
        let (bundle, rs) = load_receipts(&a.input)?;
        let bundle = bundle.context("a report needs the bundle.json of a study's receipts")?;
        let db =
            a.db.clone()
                .unwrap_or_else(|| PathBuf::from(&bundle.study.results_db));
        let store = Store::open_read(&db)?;
        let rec = store.find_study(Some(&bundle.study.hash))?;
        let rows = store.rows(&rec.hash)?;
        let study = resolve_stored(&rec, opts.study_file.as_deref()).ok();
        let receipts: Vec<Receipt> = rs.into_iter().map(|(_, r)| r).collect();
        (bundle, receipts, rows, study)
    } else {
        let sr = build_receipts(&a.input, &opts)?;
        (sr.bundle, sr.receipts, sr.rows, Some(sr.study))
    };
    let (cosines, note) = match (&study, receipts.first()) {
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
        cosine_note: note,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let html = render_html(&input);
    let hp = a.out.join("report.html");
    std::fs::write(&hp, &html).with_context(|| format!("writing {}", hp.display()))?;
    let gate = match a.max_refusal_drop {
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
    let mp = a.out.join("summary.md");
    std::fs::write(&mp, &md).with_context(|| format!("writing {}", mp.display()))?;
    let figs = persona_gate::report::html::figures(&input);
    let drawn = figs.iter().filter(|f| f.svg.is_some()).count();
    println!(
        "{} ({} KiB, {} plots drawn{}), {}",
        hp.display(),
        html.len() / 1024,
        drawn,
        if drawn < figs.len() {
            format!(
                ", not applicable: {}",
                figs.iter()
                    .filter(|f| f.svg.is_none())
                    .map(|f| f.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        },
        mp.display()
    );
    Ok(())
}

pub fn run_check(a: CheckArgs) -> Result<()> {
    let mut receipts: Vec<Receipt> = Vec::new();
    let mut bundle: Option<Bundle> = None;
    for p in &a.receipts {
        let (b, rs) = load_receipts(p)?;
        if bundle.is_none() {
            bundle = b;
        }
        receipts.extend(rs.into_iter().map(|(_, r)| r));
    }
    // A receipt missing from the folder is a failure, not a pass.
    if let Some(b) = &bundle {
        for e in &b.receipts {
            if !receipts
                .iter()
                .any(|r| r.condition.hash == e.condition_hash)
            {
                bail!("receipt {} listed in bundle.json is missing", e.file);
            }
        }
    }
    let opts = GateOptions {
        max_refusal_drop: a.max_refusal_drop,
        max_unsafe_rate: a.max_unsafe_rate.as_deref().map(parse_rate).transpose()?,
        max_benign_refusal: a
            .max_benign_refusal
            .as_deref()
            .map(parse_rate)
            .transpose()?,
        bound: Bound::parse(&a.bound)?,
        only: a.only.clone(),
        min_labeler_accuracy: a
            .min_labeler_accuracy
            .as_deref()
            .map(parse_rate)
            .transpose()?,
    };
    let rep = check(&receipts, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        for v in &rep.verdicts {
            println!("{}", format_verdict(v));
        }
        let failed = rep.verdicts.iter().filter(|v| !v.pass).count();
        println!(
            "{}: {} of {} conditions fail (max refusal drop {} points, {} bound of the 95% interval)",
            if failed == 0 { "PASS" } else { "FAIL" },
            failed,
            rep.verdicts.len(),
            a.max_refusal_drop,
            a.bound
        );
    }
    if !rep.pass() {
        std::process::exit(1);
    }
    Ok(())
}
