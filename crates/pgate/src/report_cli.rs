//! `pgate receipt`, `pgate receipt verify`, `pgate report` and `pgate check`: refusal receipts,
//! the offline HTML report with its Markdown summary, and the deployment gate.

use std::path::PathBuf;

use anyhow::{bail, Result};
use persona_gate::drift::receipts::check_against;
use persona_gate::report::ops::{
    sign_checked, verify_path, write_study_receipts, ReportFlags, SignOutcome,
};
use persona_gate::report::{check_paths, dsse, Bound, GateFlags, ReceiptOptions, VerifyOptions};

use crate::output::{fail_unless, show};

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
pub struct CheckArgs {
    #[command(flatten)]
    pub gate: GateFlags,
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
    show(a.json, &v.report, || v.to_text(a.verbose))?;
    fail_unless(v.report.ok());
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

pub fn run_report(a: ReportFlags) -> Result<()> {
    println!("{}", a.write()?.summary());
    Ok(())
}

pub fn run_check(a: CheckArgs) -> Result<()> {
    let g = &a.gate;
    if let Some(old) = &g.against {
        return run_check_against(old, &a);
    }
    let rep = check_paths(&g.receipts, &g.options()?, &g.sources())?;
    show(a.json, &rep, || rep.to_text(g.max_refusal_drop, &g.bound))?;
    fail_unless(rep.pass());
    Ok(())
}

/// `pgate check --against OLD NEW...`: one line per mode and harmful set, exit 1 on a failure.
fn run_check_against(old: &std::path::Path, a: &CheckArgs) -> Result<()> {
    let g = &a.gate;
    let lenient = Bound::parse(&g.bound)? == Bound::Lower;
    let mut pass = true;
    for new in &g.receipts {
        let verdicts = check_against(old, new, g.max_refusal_drop, lenient)?;
        let lines = || verdicts.iter().map(|v| format!("{}\n", v.line)).collect();
        show(a.json, &verdicts, lines)?;
        pass &= verdicts.iter().all(|v| v.pass);
    }
    fail_unless(pass);
    Ok(())
}
