//! `pgate receipt`, `pgate receipt verify`, `pgate report` and `pgate check`: refusal receipts,
//! the offline HTML report with its Markdown summary, and the deployment gate.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use persona_gate::fsutil::write_atomic;
use persona_gate::report::gate::{format_verdict, parse_rate};
use persona_gate::report::receipt::{load_receipts, resolve_stored, write_receipts_noting};
use persona_gate::report::untrusted::{Located, ReadPolicy};
use persona_gate::report::verify::format_check;
use persona_gate::report::{
    build_receipts, check, check_paths, cosine_map, dsse, render_html, render_markdown, verify,
    Bound, GateOptions, GateSources, Receipt, ReceiptOptions, ReportInput, VerifyOptions,
};
use persona_gate::study::store::RowView;
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
    /// Check receipts: recompute every number from the rows bundled with them (rates, intervals,
    /// paired comparisons, per-category rates), check the labels, the signature (--pubkey), the
    /// database and every hash (model files, tokenizer, study, conditions, directions, prompt
    /// sets). Paths inside receipts are read only inside the bundle folder or a --root. Exit 1
    /// when anything differs.
    ///
    /// Example: pgate receipt verify receipts/ --root . --pubkey receipts.key.pub
    Verify(VerifyArgs),
    /// Sign a bundle with an Ed25519 key (`pgate keygen`): writes DIR/receipts.dsse.json, a DSSE
    /// envelope around an in-toto Statement naming every file of the bundle with its sha256. The
    /// bundle is checked first (seals, numbers against its rows, labels); a bundle that does not
    /// check out is not signed.
    ///
    /// Example: pgate receipt sign receipts/ --key ~/.config/pgate/receipts.key
    Sign(SignArgs),
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// The bundle folder (written by `pgate receipt DB -o DIR`).
    pub dir: PathBuf,
    /// The private key file (from `pgate keygen`; mode 0600).
    #[arg(long)]
    pub key: PathBuf,
}

#[derive(clap::Args)]
pub struct KeygenArgs {
    /// The private key file to create (its public key goes to FILE.pub). Existing files are
    /// never overwritten.
    #[arg(short, long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A receipt file, a bundle.json, or a folder holding one.
    pub receipt: PathBuf,
    /// Results database (default: the one the receipts name).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Study file (default: the one the receipts name, when it is inside the bundle folder or a
    /// --root).
    #[arg(long)]
    pub study_file: Option<PathBuf>,
    /// The model: a weights file, or the folder holding the receipts' model files (default: the
    /// recorded paths, when inside the bundle folder or a --root). Model names are never resolved
    /// or downloaded.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A folder the paths inside the receipts may lead into, besides the bundle folder
    /// (repeatable), e.g. `--root .` for a project whose study, directions and prompt files live
    /// in it. Paths elsewhere are reported as not checked.
    #[arg(long)]
    pub root: Vec<PathBuf>,
    /// Require a signature by this public key (`KEY.pub` from `pgate keygen`) over every file of
    /// the bundle.
    #[arg(long)]
    pub pubkey: Option<PathBuf>,
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
    /// Gate only on bundles signed with this public key (`KEY.pub`): an unsigned bundle, another
    /// key's signature or a file changed since signing fails every condition.
    #[arg(long)]
    pub pubkey: Option<PathBuf>,
    /// Results database, for bundles written before rows were bundled with the receipts.
    #[arg(long)]
    pub db: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run_receipt(a: ReceiptArgs) -> Result<()> {
    match a.cmd {
        Some(ReceiptSub::Verify(v)) => return run_verify(v),
        Some(ReceiptSub::Sign(v)) => return run_sign(v),
        None => {}
    }
    let (Some(db), Some(out)) = (a.db, a.out) else {
        bail!("usage: pgate receipt STUDY_DB -o DIR (or pgate receipt verify RECEIPT)");
    };
    let sr = build_receipts(&db, &a.common.options())?;
    let (files, removed_sig) = write_receipts_noting(&sr, &out)?;
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
    label_warnings(&sr.receipts);
    if sr.bundle.policy_version == "unspecified" {
        eprintln!("[pgate] no --policy given: receipts record policy_version \"unspecified\"");
    }
    if removed_sig {
        eprintln!(
            "[pgate] removed {}: it signed the previous receipts (sign again with `pgate receipt sign`)",
            out.join(dsse::SIGNATURE_FILE).display()
        );
    }
    eprintln!("[pgate] wrote {} files", files.len());
    Ok(())
}

/// Say when labels were changed after generation, and loudly when some are backed by nothing.
fn label_warnings(receipts: &[Receipt]) {
    for r in receipts {
        let Some(p) = r.labels.as_ref().and_then(|l| l.provenance.as_ref()) else {
            continue;
        };
        if p.unbacked > 0 {
            eprintln!(
                "[pgate] WARNING: {}: {} labels are backed by no labeler (edited by hand?): {}; `pgate receipt verify` and `pgate check` fail this receipt",
                r.condition.name,
                p.unbacked,
                p.unbacked_rows.join("; ")
            );
        }
        if let Some(n) = p.describe_relabel() {
            eprintln!("[pgate] {}: {n}", r.condition.name);
        }
    }
}

fn run_verify(a: VerifyArgs) -> Result<()> {
    let (bundle, receipts) = load_receipts(&a.receipt)?;
    let rep = verify(
        &receipts,
        bundle.as_ref(),
        &VerifyOptions {
            db: a.db,
            study_file: a.study_file,
            model: a.model,
            roots: a.root,
            pubkey: a.pubkey,
            skip_files: false,
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
        for n in &rep.notes {
            println!("note     {n}");
        }
        let bad = rep.failures().len();
        let skipped = rep.skipped().len();
        println!(
            "{} receipts, {} checks: {}{}",
            receipts.len(),
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
    }
    if !rep.ok() {
        std::process::exit(1);
    }
    Ok(())
}

fn run_sign(a: SignArgs) -> Result<()> {
    let key = dsse::load_signing_key(&a.key)?;
    let (bundle, receipts) = load_receipts(&a.dir)?;
    let bundle = bundle.context("sign a bundle folder (with bundle.json), not a receipt file")?;
    if bundle.rows.is_none() {
        bail!(
            "{}: the bundle has no rows (written by an older pgate): write it again with `pgate receipt DB -o DIR` so the signature covers the rows",
            a.dir.display()
        );
    }
    // Sign only what checks out: seals, the numbers against the bundled rows, the labels.
    let rep = verify(
        &receipts,
        Some(&bundle),
        &VerifyOptions {
            skip_files: true,
            ..Default::default()
        },
    )?;
    let bad = rep.failures();
    if !bad.is_empty() {
        for c in &bad {
            eprintln!("{}", format_check(c));
        }
        bail!(
            "{}: {} checks fail; not signing (see `pgate receipt verify`)",
            a.dir.display(),
            bad.len()
        );
    }
    let (path, keyid) = dsse::sign_bundle(&a.dir, &key)?;
    println!(
        "signed {} files of {} with key {} -> {}",
        persona_gate::report::dsse::bundle_files(&bundle)?.len(),
        a.dir.display(),
        &keyid[..16],
        path.display()
    );
    Ok(())
}

pub fn run_keygen(a: KeygenArgs) -> Result<()> {
    let (public, keyid) = dsse::keygen(&a.out)?;
    println!(
        "private key {} (mode 0600: keep it out of any repository), public key {} (key id {})",
        a.out.display(),
        public.display(),
        &keyid[..16]
    );
    Ok(())
}

/// The rows of a receipts folder: bundled when the bundle has them, else from the database
/// (`--db`, or the one the bundle names when it lies in the bundle folder).
fn receipts_rows(
    input: &Path,
    bundle: &persona_gate::report::Bundle,
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
        let b = persona_gate::report::rows::read_rows(&dir, r, l)?;
        return Ok((b.rows, store));
    }
    let Some(st) = store else {
        bail!(
            "{}: the bundle holds no rows and its database {} is not in the bundle folder: pass --db",
            input.display(),
            bundle.study.results_db
        );
    };
    let rec = st.find_study(Some(&bundle.study.hash))?;
    let rows = st.rows(&rec.hash)?;
    Ok((rows, Some(st)))
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
        let (rows, store) = receipts_rows(&a.input, &bundle, a.db.as_deref())?;
        let study = store
            .as_ref()
            .and_then(|st| st.find_study(Some(&bundle.study.hash)).ok())
            .and_then(|rec| resolve_stored(&rec, opts.study_file.as_deref()).ok());
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
    write_atomic(&hp, html.as_bytes())?;
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
    write_atomic(&mp, md.as_bytes())?;
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
    let rep = check_paths(
        &a.receipts,
        &opts,
        &GateSources {
            pubkey: a.pubkey.clone(),
            db: a.db.clone(),
        },
    )?;
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
