//! `pgate receipt`, `pgate receipt verify`, `pgate report` and `pgate check`: refusal receipts,
//! the offline HTML report with its Markdown summary, and the deployment gate.

use std::path::PathBuf;

use anyhow::{bail, Result};
use persona_gate::report::gate::parse_rate;
use persona_gate::report::ops::{
    sign_checked, verify_path, write_report, write_study_receipts, SignOutcome,
};
use persona_gate::report::{
    check_paths, dsse, Bound, GateOptions, GateSources, ReceiptOptions, VerifyOptions,
};

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
    pub common: ReceiptOptions,
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
    /// Compare two bundles of one study run on two model versions, field by field (model hash,
    /// tokenizer, template, policy, persona text, steering) and rate by rate (Newcombe 95%
    /// interval of each change).
    ///
    /// Example: pgate receipt diff receipts-v1/ receipts-v2/
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(long)]
        json: bool,
    },
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
    #[command(flatten)]
    pub opts: VerifyOptions,
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
    pub common: ReceiptOptions,
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
    /// Gate a new version against the receipts of the old one (same study): each mode fails when
    /// its refusal may have dropped from OLD by more than --max-refusal-drop (Newcombe 95%
    /// interval, end per --bound). Example: pgate check --against v1/ v2/ --max-refusal-drop 10
    #[arg(long, value_name = "OLD")]
    pub against: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run_receipt(a: ReceiptArgs) -> Result<()> {
    match a.cmd {
        Some(ReceiptSub::Verify(v)) => return run_verify(v),
        Some(ReceiptSub::Sign(v)) => return run_sign(v),
        Some(ReceiptSub::Diff { old, new, json }) => {
            return crate::drift_cli::run_diff(&old, &new, json)
        }
        None => {}
    }
    let (Some(db), Some(out)) = (a.db, a.out) else {
        bail!("usage: pgate receipt STUDY_DB -o DIR (or pgate receipt verify RECEIPT)");
    };
    let written = write_study_receipts(&db, &out, &a.common)?;
    print!("{}", written.summary());
    for n in written.notes() {
        eprintln!("[pgate] {n}");
    }
    Ok(())
}

fn run_verify(a: VerifyArgs) -> Result<()> {
    let v = verify_path(&a.receipt, &a.opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v.report)?);
    } else {
        print!("{}", v.to_text(a.verbose));
    }
    if !v.report.ok() {
        std::process::exit(1);
    }
    Ok(())
}

fn run_sign(a: SignArgs) -> Result<()> {
    match sign_checked(&a.dir, &a.key)? {
        SignOutcome::Signed { path, keyid, files } => println!(
            "signed {files} files of {} with key {} -> {}",
            a.dir.display(),
            &keyid[..16],
            path.display()
        ),
        SignOutcome::Refused { failures } => {
            for f in &failures {
                eprintln!("{f}");
            }
            bail!(
                "{}: {} checks fail; not signing (see `pgate receipt verify`)",
                a.dir.display(),
                failures.len()
            );
        }
    }
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

pub fn run_report(a: ReportArgs) -> Result<()> {
    let opts = a.common;
    let written = write_report(&a.input, &a.out, a.db.as_deref(), &opts, a.max_refusal_drop)?;
    println!("{}", written.summary());
    Ok(())
}

pub fn run_check(a: CheckArgs) -> Result<()> {
    if let Some(old) = &a.against {
        return run_check_against(old, &a);
    }
    let rate = |s: &Option<String>| s.as_deref().map(parse_rate).transpose();
    let opts = GateOptions {
        max_refusal_drop: a.max_refusal_drop,
        max_unsafe_rate: rate(&a.max_unsafe_rate)?,
        max_benign_refusal: rate(&a.max_benign_refusal)?,
        bound: Bound::parse(&a.bound)?,
        only: a.only.clone(),
        min_labeler_accuracy: rate(&a.min_labeler_accuracy)?,
    };
    let sources = GateSources {
        pubkey: a.pubkey.clone(),
        db: a.db.clone(),
    };
    let rep = check_paths(&a.receipts, &opts, &sources)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", rep.to_text(a.max_refusal_drop, &a.bound));
    }
    if !rep.pass() {
        std::process::exit(1);
    }
    Ok(())
}

/// `pgate check --against OLD NEW...`: one line per mode and harmful set, exit 1 on a failure.
fn run_check_against(old: &std::path::Path, a: &CheckArgs) -> Result<()> {
    let lenient = Bound::parse(&a.bound)? == Bound::Lower;
    let mut pass = true;
    for new in &a.receipts {
        let verdicts =
            persona_gate::drift::receipts::check_against(old, new, a.max_refusal_drop, lenient)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&verdicts)?);
        }
        for v in &verdicts {
            pass &= v.pass;
            if !a.json {
                println!("{}", v.line);
            }
        }
    }
    if !pass {
        std::process::exit(1);
    }
    Ok(())
}
