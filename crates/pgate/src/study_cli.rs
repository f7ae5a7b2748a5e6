//! `pgate study ...`: run a study file into a SQLite results database, watch its progress, print
//! its table, export it, judge it, merge shards.
//!
//! Each subcommand parses its flags into options, makes one call of
//! [`persona_gate::study::ops`] and prints the typed result (text forms: `persona_gate::study::text`).
//! What stays here is the terminal: progress bars and Ctrl-C.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};
use persona_gate::events::{Event, EventSink};
use persona_gate::study::cluster;
use persona_gate::study::cluster::merge;
use persona_gate::study::ops::{self, Stopped};

use crate::args::parse_device;
use crate::output::{show, show_sorted};
use crate::progress::Progress;

/// Set by the first Ctrl-C: the operation finishes the wave, batch or judge in flight, stores it
/// and returns.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(clap::Subcommand)]
pub enum StudyCmd {
    /// Run (or continue) a study: generate every missing result, then grade with the study's
    /// judges. Killed or interrupted runs continue where they stopped.
    ///
    /// Example: pgate study run examples/demo_study.toml --db demo.sqlite
    Run(RunArgs),
    /// Check a study file and list its conditions, hashes and work, without loading a model.
    ///
    /// Example: pgate study check examples/paper_study.toml
    Check { study: PathBuf },
    /// Done / total per condition and prompt set.
    ///
    /// Example: pgate study status --db demo.sqlite
    Status(StatusArgs),
    /// Label rates with Wilson 95% intervals and paired comparisons with the baseline.
    ///
    /// Example: pgate study table --db demo.sqlite --by-category --csv table.csv
    Table(TableArgs),
    /// Write every result row (outputs, labels, measurements, verdicts).
    ///
    /// Example: pgate study export --db demo.sqlite --format jsonl -o demo.jsonl
    Export(ops::ExportFlags),
    /// Grade stored rows that have no successful verdict (judge failures included).
    ///
    /// Example: pgate study judge --db demo.sqlite --judge sr
    Judge(JudgeArgs),
    /// Compare two studies of one database condition by condition (same condition names, same
    /// prompts): e.g. a local study and an endpoint study of the same model and persona modes.
    ///
    /// Example: pgate study compare --db all.sqlite local-q15 served-q15
    Compare(CompareArgs),
    /// Label the stored outputs again with another labeler (rules v2, the probe, the ensemble).
    /// Each row's previous label is kept in the database's label history; batches are committed
    /// as they finish, so an interrupted run continues where it stopped.
    ///
    /// Example: pgate study relabel --db demo.sqlite --labeler ensemble
    Relabel(RelabelArgs),
    /// Merge shard databases into one (results are keyed, so the merge is exact).
    ///
    /// Example: pgate study merge --db all.sqlite shard0.sqlite shard1.sqlite
    ///
    /// Shards of one study (given with --study, or the one study the first database holds) are
    /// checked: another study or labeler is refused, identical duplicates kept once, differing
    /// ones and missing items listed (exit status 1 while items are missing).
    Merge(merge::MergeFlags),
    /// Split a study into shards on a cluster: a Slurm array plus a merge job that waits for it
    /// (submitted with sbatch, or only written with --print), or Kubernetes Indexed Job and merge
    /// Job manifests (--k8s, written only). Submitting again runs only the unfinished shards.
    ///
    /// Example: pgate study submit paper.toml --slurm --shards 16 --dir /shared/paper --gpus-per-task 1 --time 4:00:00
    Submit(cluster::SubmitFlags),
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub flags: ops::RunFlags,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct RelabelArgs {
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
    #[command(flatten)]
    pub spec: ops::RelabelSpec,
    /// Read on CUDA device N (needs a build with --features cuda).
    #[arg(long)]
    pub cuda: Option<usize>,
    #[arg(long)]
    pub json: bool,
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(clap::Args)]
pub struct CompareArgs {
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
    #[command(flatten)]
    pub opts: ops::CompareOptions,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
    /// Progress of every shard of a `study submit` work folder, read while the tasks run.
    #[arg(long)]
    pub shards: Option<PathBuf>,
    /// Study name or hash prefix (default: the most recently run).
    #[arg(long)]
    pub study: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct TableArgs {
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
    #[command(flatten)]
    pub opts: ops::TableOptions,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct JudgeArgs {
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
    #[command(flatten)]
    pub spec: ops::JudgeSpec,
    #[arg(long)]
    pub cuda: Option<usize>,
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run_study_cmd(cmd: StudyCmd) -> Result<()> {
    match cmd {
        StudyCmd::Run(a) => run(a),
        StudyCmd::Check { study } => {
            print!("{}", ops::check(&study)?);
            Ok(())
        }
        StudyCmd::Status(a) if a.shards.is_some() => {
            let p = cluster::submission_progress(a.shards.as_deref().unwrap_or(&a.db))?;
            show_sorted(a.json, &p, || p.to_string())
        }
        StudyCmd::Status(a) => {
            let s = ops::status(&a.db, a.study.as_deref())?;
            show_sorted(a.json, &s, || s.to_string())
        }
        StudyCmd::Table(a) => {
            let t = ops::table(&a.db, &a.opts)?;
            let csv = a.opts.csv.as_ref();
            let csv = csv.map(|p| format!("table written to {}\n", p.display()));
            show(a.json, &t.rows, || {
                format!("{t}{}", csv.unwrap_or_default())
            })
        }
        StudyCmd::Export(a) => {
            println!("{}", a.run()?.summary(&a.out));
            Ok(())
        }
        StudyCmd::Judge(a) => judge(a),
        StudyCmd::Compare(a) => {
            let c = ops::compare(&a.db, &a.opts)?;
            show_sorted(a.json, &c, || c.to_string())
        }
        StudyCmd::Relabel(a) => relabel(a),
        StudyCmd::Merge(a) => {
            let m = a.run()?;
            print!("{}", m.to_text(&a.db));
            if m.missing() > 0 {
                bail!("{}: {} items missing", a.db.display(), m.missing());
            }
            Ok(())
        }
        StudyCmd::Submit(a) => {
            print!("{}", cluster::submit(&a.spec())?);
            Ok(())
        }
    }
}

fn run(a: RunArgs) -> Result<()> {
    let spec = a.flags.spec()?;
    install_ctrlc();
    if let Some(list) = &a.flags.gpus {
        let names = cluster::gpus::parse_devices(list)?;
        let r = cluster::gpus::run_on_devices(&spec, &names, &STOP, &mut progress(a.quiet))?;
        print!("{}", r.merge);
        return Ok(());
    }
    let r = ops::run(&spec, &STOP, &mut progress(a.quiet))?;
    match r.stopped {
        Some(Stopped::Generating) => {
            print!("{}", r.status);
            exit_interrupted("interrupted: run the same command again to continue")
        }
        Some(Stopped::Judging) => {
            exit_interrupted("interrupted while judging: `pgate study judge` continues")
        }
        None => print!("{}", r.status),
    }
    if r.gave_up() > 0 {
        bail!(
            "{} items failed on every try (failures are in the endpoint_failures table; run the same command again to retry them)",
            r.gave_up()
        );
    }
    Ok(())
}

fn judge(a: JudgeArgs) -> Result<()> {
    let spec = ops::JudgeSpec {
        device: parse_device(None, a.cuda)?,
        ..a.spec
    };
    install_ctrlc();
    let r = ops::judge(&a.db, &spec, &STOP, &mut progress(a.quiet))?;
    if r.interrupted {
        std::process::exit(130);
    }
    Ok(())
}

fn relabel(a: RelabelArgs) -> Result<()> {
    let spec = ops::RelabelSpec {
        device: parse_device(None, a.cuda)?,
        ..a.spec
    };
    install_ctrlc();
    let s = ops::relabel(&a.db, &spec, &STOP, &mut progress(a.quiet || a.json))?;
    show(a.json, &s, || s.to_string())?;
    if s.interrupted {
        exit_interrupted(
            "interrupted: labeled rows are stored; run the same command again to continue",
        );
    }
    Ok(())
}

fn install_ctrlc() {
    // A second install fails (tests may call twice in one process); the first handler stays.
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\n[pgate] second Ctrl-C: stopping now (written rows are kept)");
            std::process::exit(130);
        }
        eprintln!(
            "\n[pgate] Ctrl-C: finishing the current batch and saving it (Ctrl-C again to stop now)"
        );
    });
}

/// Exit status 130 (interrupted) after `msg`; what the operation stored stays.
fn exit_interrupted(msg: &str) -> ! {
    let _ = std::io::stdout().flush();
    eprintln!("[pgate] {msg}");
    std::process::exit(130)
}

/// The shared progress display for an operation's events; with `--quiet`, notes and warnings
/// only (no bars).
fn progress(quiet: bool) -> impl EventSink {
    let mut p = Progress::new();
    move |e: Event| match e {
        Event::Phase { .. } | Event::Progress { .. } | Event::PhaseEnd { .. } if quiet => {}
        e => p.event(e),
    }
}
