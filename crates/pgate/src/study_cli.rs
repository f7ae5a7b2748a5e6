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
use persona_gate::study::cluster::merge::{merge_op, MergeOutcome};
use persona_gate::study::cluster::{self, K8sOptions, ShardBy, SlurmOptions};
use persona_gate::study::export::Format;
use persona_gate::study::ops::{self, Stopped};

use crate::args::parse_device;
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
    Export(ExportArgs),
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
    Merge {
        #[arg(long, default_value = "results.sqlite")]
        db: PathBuf,
        /// The study file the shards ran.
        #[arg(long)]
        study: Option<PathBuf>,
        #[arg(required = true)]
        from: Vec<PathBuf>,
    },
    /// Split a study into shards on a cluster: a Slurm array plus a merge job that waits for it
    /// (submitted with sbatch, or only written with --print), or Kubernetes Indexed Job and merge
    /// Job manifests (--k8s, written only). Submitting again runs only the unfinished shards.
    ///
    /// Example: pgate study submit paper.toml --slurm --shards 16 --dir /shared/paper --gpus-per-task 1 --time 4:00:00
    Submit(SubmitArgs),
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    pub study: PathBuf,
    /// Work folder on a filesystem every node sees: scripts, shard databases, logs.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub shards: u64,
    /// Merged database (default: DIR/results.sqlite).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// How items are split: tokens (prompt groups balanced by expected tokens) or hash.
    #[arg(long, value_enum, default_value = "tokens")]
    pub shard_by: ShardBy,
    #[arg(long, required_unless_present = "k8s", conflicts_with = "k8s")]
    pub slurm: bool,
    /// Write Kubernetes manifests (Indexed Job + merge Job); implies --print.
    #[arg(long)]
    pub k8s: bool,
    /// Write the scripts without submitting them.
    #[arg(long)]
    pub print: bool,
    /// The pgate the tasks run (default: this one).
    #[arg(long)]
    pub pgate: Option<PathBuf>,
    #[command(flatten)]
    pub slurm_opts: SlurmOptions,
    #[command(flatten)]
    pub k8s_opts: K8sOptions,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The study file (TOML).
    pub study: PathBuf,
    /// Results database (created if missing).
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
    /// Generate at most N items in this run.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only items of shard I of K (I/K, e.g. 0/4); merge the shards with `pgate study merge`.
    #[arg(long)]
    pub shard: Option<String>,
    /// How --shard splits the items: hash (default) or tokens (balanced prompt groups).
    #[arg(long, value_enum, default_value = "hash")]
    pub shard_by: ShardBy,
    /// One worker per device (0,1 = cuda:0,cuda:1; `cpu` entries run CPU workers), each a
    /// token-balanced shard into DB.shards/, merged into --db at the end.
    #[arg(long, conflicts_with_all = ["shard", "cuda"])]
    pub gpus: Option<String>,
    /// Items generated between stop checks (default: 4 batches).
    #[arg(long)]
    pub wave: Option<usize>,
    /// Skip the judging phase.
    #[arg(long)]
    pub no_judge: bool,
    /// Run on CUDA device N (needs a build with --features cuda).
    #[arg(long)]
    pub cuda: Option<usize>,
    /// Endpoint studies: requests in flight (default: the study's endpoint `concurrency`).
    #[arg(long)]
    pub concurrency: Option<usize>,
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
pub struct ExportArgs {
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
    #[arg(long)]
    pub study: Option<String>,
    /// jsonl, csv or parquet.
    #[arg(long, default_value = "jsonl")]
    pub format: String,
    #[arg(short, long)]
    pub out: PathBuf,
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
            if a.json {
                return print_json(&p);
            }
            print!("{p}");
            Ok(())
        }
        StudyCmd::Status(a) => {
            let s = ops::status(&a.db, a.study.as_deref())?;
            if a.json {
                print_json(&s)
            } else {
                print!("{s}");
                Ok(())
            }
        }
        StudyCmd::Table(a) => table(a),
        StudyCmd::Export(a) => {
            let format = Format::parse(&a.format)?;
            let e = ops::export(&a.db, a.study.as_deref(), format, &a.out)?;
            println!(
                "{} rows of study {} -> {}",
                e.rows,
                e.study,
                a.out.display()
            );
            Ok(())
        }
        StudyCmd::Judge(a) => judge(a),
        StudyCmd::Compare(a) => {
            let c = ops::compare(&a.db, &a.opts)?;
            if a.json {
                print_json(&c)
            } else {
                print!("{c}");
                Ok(())
            }
        }
        StudyCmd::Relabel(a) => relabel(a),
        StudyCmd::Merge { db, study, from } => match merge_op(&db, study.as_deref(), &from)? {
            MergeOutcome::Shards(m) => {
                print!("{m}");
                if !m.complete() {
                    bail!("{}: {} items missing", db.display(), m.missing.len());
                }
                Ok(())
            }
            MergeOutcome::Plain(m) => {
                for (f, added) in &m.sources {
                    println!("{}: {added} new results", f.display());
                }
                println!("{}: {} results", db.display(), m.total);
                Ok(())
            }
        },
        StudyCmd::Submit(a) => submit(a),
    }
}

fn submit(a: SubmitArgs) -> Result<()> {
    let spec = cluster::SubmitSpec {
        study: a.study,
        dir: a.dir,
        db: a.db,
        shards: a.shards,
        by: a.shard_by,
        pgate: a.pgate,
        print_only: a.print || a.k8s,
        scheduler: if a.k8s {
            cluster::Scheduler::Kubernetes(a.k8s_opts)
        } else {
            cluster::Scheduler::Slurm(a.slurm_opts)
        },
    };
    print!("{}", cluster::submit(&spec)?);
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    let spec = ops::RunSpec {
        shard: a.shard.as_deref().map(ops::parse_shard).transpose()?,
        shard_by: a.shard_by,
        study: a.study,
        db: a.db,
        limit: a.limit,
        wave: a.wave,
        judge: !a.no_judge,
        device: parse_device(None, a.cuda)?,
        concurrency: a.concurrency,
    };
    install_ctrlc();
    if let Some(list) = &a.gpus {
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

fn table(a: TableArgs) -> Result<()> {
    let t = ops::table(&a.db, &a.opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&t.rows)?);
        return Ok(());
    }
    print!("{t}");
    if let Some(p) = &a.opts.csv {
        println!("table written to {}", p.display());
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
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{s}");
    }
    if s.interrupted {
        exit_interrupted(
            "interrupted: labeled rows are stored; run the same command again to continue",
        );
    }
    Ok(())
}

/// JSON through `serde_json::Value`, whose maps are sorted: the key order these commands have
/// always printed.
fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::to_value(v)?)?
    );
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
