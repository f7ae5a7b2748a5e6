//! `pgate study ...`: run a study file into a SQLite results database, watch its progress, print
//! its table, export it, judge it, merge shards.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use persona_gate::eval::judge::JudgeKind;
use persona_gate::model::{DTypeMode, LoadOptions, Model};
use persona_gate::study::export::{export, report_csv, Format};
use persona_gate::study::judging::{judge_study, make_judge, JudgeEvent, JudgeOptions};
use persona_gate::study::report::{pct, pval, report, ReportOptions, ReportRow};
use persona_gate::study::runner::RunEvent;
use persona_gate::study::store::StudyRecord;
use persona_gate::study::{run_endpoint_study, run_study, RunOptions, Store, Study, StudyFile};

/// Set by the first Ctrl-C: the run finishes the wave in flight, writes it, and stops.
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
    Merge {
        #[arg(long, default_value = "results.sqlite")]
        db: PathBuf,
        #[arg(required = true)]
        from: Vec<PathBuf>,
    },
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
    /// Study name or hash prefix (default: every study in the database).
    #[arg(long)]
    pub study: Option<String>,
    /// rules (v2), rules-v1, probe or ensemble.
    #[arg(long)]
    pub labeler: String,
    /// Reader model of the probe and ensemble labelers (default: the study's own model).
    #[arg(long)]
    pub model: Option<String>,
    /// Probe file (default: the built-in probe for the reader model).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// Rows labeled and committed together.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Also label again the rows this labeler labeled already.
    #[arg(long)]
    pub redo: bool,
    /// Reader model numeric mode (f32, bf16, f16, q).
    #[arg(long, default_value = "q")]
    pub dtype: String,
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
    /// First study (name or hash prefix), e.g. the local one.
    pub a: String,
    /// Second study, e.g. the endpoint one.
    pub b: String,
    #[arg(long)]
    pub json: bool,
    /// Also list up to N pairs whose labels differ (condition, prompt, both labels and outputs).
    #[arg(long, default_value_t = 0)]
    pub show: usize,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "results.sqlite")]
    pub db: PathBuf,
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
    #[arg(long)]
    pub study: Option<String>,
    /// Also write the table as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// One row per prompt category within each condition and prompt set.
    #[arg(long)]
    pub by_category: bool,
    /// Compare with this condition instead of the study's baseline.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Paired-bootstrap resamples (default: the study's `stats.bootstrap`).
    #[arg(long)]
    pub bootstrap: Option<usize>,
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
    /// Study name or hash prefix (default: the most recently run).
    #[arg(long)]
    pub study: Option<String>,
    /// Take the judges from this study file instead of the stored one (e.g. to add a judge).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Only this judge (by name).
    #[arg(long)]
    pub judge: Option<String>,
    /// Grade every row again, also those with a verdict.
    #[arg(long)]
    pub redo: bool,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub cuda: Option<usize>,
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run_study_cmd(cmd: StudyCmd) -> Result<()> {
    match cmd {
        StudyCmd::Run(a) => run(a),
        StudyCmd::Check { study } => check(&study),
        StudyCmd::Status(a) => status(a),
        StudyCmd::Table(a) => table(a),
        StudyCmd::Export(a) => {
            let format = Format::parse(&a.format)?;
            let store = Store::open_read(&a.db)?;
            let rec = store.find_study(a.study.as_deref())?;
            let rows = store.rows(&rec.hash)?;
            let n = export(&rows, format, &a.out)?;
            println!("{n} rows of study {} -> {}", rec.name, a.out.display());
            Ok(())
        }
        StudyCmd::Judge(a) => judge(a),
        StudyCmd::Compare(a) => compare(a),
        StudyCmd::Relabel(a) => relabel(a),
        StudyCmd::Merge { db, from } => {
            let mut store = Store::open(&db)?;
            for f in &from {
                let added = store.merge_from(f)?;
                println!("{}: {added} new results", f.display());
            }
            println!("{}: {} results", db.display(), store.count_results()?);
            Ok(())
        }
    }
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

fn device(cuda: Option<usize>) -> Result<persona_gate::device::Device> {
    Ok(match cuda {
        None => persona_gate::device::Device::Cpu,
        Some(i) => persona_gate::device::cuda(i)?,
    })
}

fn bar(len: u64, what: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {what}  {{elapsed_precise}} eta {{eta}}  {{msg}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// A message above the progress bar (or on stderr when the bar is hidden).
fn say(pb: &indicatif::ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

fn parse_shard(s: &str) -> Result<(u64, u64)> {
    let (i, k) = s
        .split_once('/')
        .with_context(|| format!("--shard '{s}' must be I/K, e.g. 0/4"))?;
    let (i, k): (u64, u64) = (
        i.trim()
            .parse()
            .with_context(|| format!("--shard '{s}': I is not a number"))?,
        k.trim()
            .parse()
            .with_context(|| format!("--shard '{s}': K is not a number"))?,
    );
    if k == 0 || i >= k {
        bail!("--shard '{s}': need 0 <= I < K");
    }
    Ok((i, k))
}

fn run(a: RunArgs) -> Result<()> {
    let study = Study::load(&a.study)?;
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    let mut store = Store::open(&a.db)?;
    install_ctrlc();
    let dev = device(a.cuda)?;
    if study.endpoint().is_some() {
        return run_endpoint(&a, &study, shard, &mut store, dev);
    }
    if a.concurrency.is_some() {
        bail!("--concurrency is for endpoint studies ([model] endpoint); local studies batch with [generation] batch_size");
    }
    let m = &study.file.model;
    let t_load = std::time::Instant::now();
    let mut model = Model::load(
        &study.model_spec(),
        &LoadOptions {
            dtype: DTypeMode::parse(&m.dtype)?,
            device: dev.clone(),
        },
    )?;
    model.decoder.set_batch_invariant(m.batch_invariant)?;
    eprintln!(
        "[pgate] study {} ({}): {} conditions, {} prompt sets, model {} loaded in {:.1} s",
        study.name,
        &study.hash[..12],
        study.conditions.len(),
        study.prompt_sets.len(),
        model.info.name,
        t_load.elapsed().as_secs_f64()
    );
    let opts = RunOptions {
        limit: a.limit,
        shard,
        wave: a.wave,
        source_path: Some(a.study.clone()),
        concurrency: None,
    };
    let mut progress = RunProgress::new("generate", a.quiet);
    let summary = run_study(&study, &mut store, &model, &opts, &STOP, &mut |ev| {
        progress.on(ev)
    })?;
    progress.finish();
    eprintln!(
        "[pgate] wrote {} results in {:.1} s ({} decode tokens)",
        summary.written, summary.secs, summary.decode_tokens
    );
    if summary.decode_secs > 0.0 {
        eprintln!(
            "[pgate] engine: prefill {:.1} tok/s, decode {:.1} tok/s; {:.1}% of wall time outside the engine (labels, scores, storage); {:.1} generated tok/s end to end",
            summary.prefill_tokens as f64 / summary.prefill_secs.max(1e-9),
            summary.decode_tokens as f64 / summary.decode_secs,
            100.0 * summary.overhead_fraction(),
            summary.decode_tokens as f64 / summary.secs.max(1e-9),
        );
    }
    drop(model);
    if summary.interrupted {
        print_status(&store, &store.find_study(Some(&study.hash))?)?;
        eprintln!("[pgate] interrupted: run the same command again to continue");
        drop(store);
        std::process::exit(130);
    }
    if !a.no_judge {
        for cfg in &study.file.judges {
            if cfg.kind == JudgeKind::Rules {
                continue;
            }
            let Some(j) = make_judge(cfg, dev.clone())? else {
                continue;
            };
            judge_with(
                &store,
                &study.hash,
                j.as_ref(),
                cfg,
                &JudgeOptions::default(),
                a.quiet,
            )?;
            if STOP.load(Ordering::SeqCst) {
                eprintln!("[pgate] interrupted while judging: `pgate study judge` continues");
                drop(store);
                std::process::exit(130);
            }
        }
    }
    print_status(&store, &store.find_study(Some(&study.hash))?)?;
    Ok(())
}

/// The progress bar of `study run` (local and endpoint): planned work, then one tick per stored
/// row with the running label counts.
struct RunProgress {
    pb: indicatif::ProgressBar,
    labels: [usize; 3],
    /// What happens to the pending items: "generate" or "request".
    verb: &'static str,
}

impl RunProgress {
    fn new(verb: &'static str, quiet: bool) -> Self {
        Self {
            pb: bar(0, "items", quiet),
            labels: [0; 3],
            verb,
        }
    }

    fn on(&mut self, ev: RunEvent<'_>) {
        match ev {
            RunEvent::Planned { planned, summary } => {
                self.pb.set_length(planned as u64);
                let others = if summary.other_shards > 0 {
                    format!(", {} in other shards", summary.other_shards)
                } else {
                    String::new()
                };
                say(
                    &self.pb,
                    format!(
                        "[pgate] {} items: {} stored, {} to {}{others}",
                        summary.total, summary.already, planned, self.verb
                    ),
                );
            }
            RunEvent::Written { label, .. } => {
                self.labels[label as usize] += 1;
                let [r, b, d] = self.labels;
                self.pb
                    .set_message(format!("refusal {r} bypass {b} degenerate {d}"));
                self.pb.inc(1);
            }
        }
    }

    fn finish(&self) {
        self.pb.finish_and_clear();
    }
}

/// `study run` for an endpoint study: no model is loaded; requests go to the server.
fn run_endpoint(
    a: &RunArgs,
    study: &Study,
    shard: Option<(u64, u64)>,
    store: &mut Store,
    dev: persona_gate::device::Device,
) -> Result<()> {
    let ep = study.endpoint().context("endpoint study")?;
    eprintln!(
        "[pgate] study {} ({}): {} conditions, {} prompt sets, endpoint {} model {} (black box: persona / system prompts and sampling only), {} requests in flight",
        study.name,
        &study.hash[..12],
        study.conditions.len(),
        study.prompt_sets.len(),
        ep.normalized_base(),
        ep.model,
        a.concurrency.unwrap_or(ep.concurrency)
    );
    let opts = RunOptions {
        limit: a.limit,
        shard,
        wave: None,
        source_path: Some(a.study.clone()),
        concurrency: a.concurrency,
    };
    let mut progress = RunProgress::new("request", a.quiet);
    let summary = run_endpoint_study(study, store, &opts, &STOP, &mut |ev| progress.on(ev))?;
    progress.finish();
    let e = summary.endpoint.clone().unwrap_or_default();
    eprintln!(
        "[pgate] wrote {} results in {:.1} s: {:.2} items/s, {:.1} completion tok/s at {} in flight; {} tries, {} failed (recorded), {} items gave up{}",
        summary.written,
        summary.secs,
        summary.written as f64 / summary.secs.max(1e-9),
        e.completion_tokens as f64 / summary.secs.max(1e-9),
        e.concurrency,
        e.requests,
        e.failed_tries,
        e.gave_up,
        if e.gave_up > 0 { " (run again to retry them)" } else { "" }
    );
    eprintln!(
        "[pgate] usage: {} prompt + {} completion tokens{}; server reported model {}",
        e.prompt_tokens,
        e.completion_tokens,
        e.cost
            .map(|c| format!(", estimated cost {c:.4}"))
            .unwrap_or_default(),
        if e.reported_models.is_empty() {
            "-".to_string()
        } else {
            e.reported_models.join(", ")
        }
    );
    if summary.interrupted {
        print_status(store, &store.find_study(Some(&study.hash))?)?;
        eprintln!("[pgate] interrupted: run the same command again to continue");
        std::process::exit(130);
    }
    if !a.no_judge {
        for cfg in &study.file.judges {
            if cfg.kind == JudgeKind::Rules {
                continue;
            }
            let Some(j) = make_judge(cfg, dev.clone())? else {
                continue;
            };
            judge_with(
                store,
                &study.hash,
                j.as_ref(),
                cfg,
                &JudgeOptions::default(),
                a.quiet,
            )?;
            if STOP.load(Ordering::SeqCst) {
                eprintln!("[pgate] interrupted while judging: `pgate study judge` continues");
                std::process::exit(130);
            }
        }
    }
    print_status(store, &store.find_study(Some(&study.hash))?)?;
    if e.gave_up > 0 {
        bail!(
            "{} items failed on every try (failures are in the endpoint_failures table; run the same command again to retry them)",
            e.gave_up
        );
    }
    Ok(())
}

fn judge_with(
    store: &Store,
    study_hash: &str,
    j: &dyn persona_gate::eval::judge::Judge,
    cfg: &persona_gate::eval::judge::JudgeConfig,
    opts: &JudgeOptions,
    quiet: bool,
) -> Result<()> {
    let pb = bar(0, "judged", quiet);
    let (mut ok, mut failed) = (0usize, 0usize);
    let s = judge_study(store, study_hash, j, cfg, opts, &STOP, &mut |ev| match ev {
        JudgeEvent::Planned { todo } => {
            pb.set_length(todo as u64);
            say(
                &pb,
                format!(
                    "[pgate] judge '{}' ({}): {todo} rows to grade",
                    j.name(),
                    j.mode().name()
                ),
            );
        }
        JudgeEvent::Done { ok: good } => {
            if good {
                ok += 1;
            } else {
                failed += 1;
            }
            pb.set_message(format!("ok {ok} failed {failed}"));
            pb.inc(1);
        }
    })?;
    pb.finish_and_clear();
    eprintln!(
        "[pgate] judge '{}': {} graded, {} failed (failures are stored per row; `pgate study judge` retries them)",
        s.judge, s.ok, s.failed
    );
    Ok(())
}

fn check(path: &Path) -> Result<()> {
    let study = Study::load(path)?;
    match study.endpoint() {
        None => println!(
            "study {} ({}), model {} ({})",
            study.name, study.hash, study.file.model.spec, study.file.model.dtype
        ),
        Some(ep) => println!(
            "study {} ({}), endpoint {} model {} (black box: system prompts and sampling only; {} requests in flight{}{})",
            study.name,
            study.hash,
            ep.normalized_base(),
            ep.model,
            ep.concurrency,
            ep.requests_per_minute
                .map(|r| format!(", {r} requests/min"))
                .unwrap_or_default(),
            ep.tokens_per_minute
                .map(|t| format!(", {t} tokens/min"))
                .unwrap_or_default()
        ),
    }
    for s in &study.prompt_sets {
        println!(
            "prompts {:<16} {:>5} prompts  {} (skip {}, set sha256 {})",
            s.name,
            s.items.len(),
            s.source,
            s.skip,
            &s.hash[..12]
        );
    }
    let samples = study.file.generation.samples;
    for (i, c) in study.conditions.iter().enumerate() {
        let n: usize = c
            .prompt_sets
            .iter()
            .map(|&s| study.prompt_sets[s].items.len() * samples)
            .sum();
        let ops: Vec<String> = c
            .ops
            .iter()
            .map(|o| format!("{} {}", o.field.key(), o.text))
            .collect();
        println!(
            "condition {:<28} {}  {:>5} items  {}{}{}",
            c.name,
            &c.hash[..12],
            n,
            c.persona
                .as_deref()
                .map(|p| format!("persona {p}; "))
                .or_else(|| c.system.as_ref().map(|_| "system prompt; ".to_string()))
                .unwrap_or_default(),
            if ops.is_empty() {
                "no ops".to_string()
            } else {
                ops.join("; ")
            },
            if i == study.baseline {
                "  (baseline)"
            } else {
                ""
            }
        );
    }
    for j in &study.file.judges {
        println!(
            "judge {} ({:?}{})",
            j.display_name(),
            j.kind,
            j.effective_mode()
                .map(|m| format!(", {}", m.name()))
                .unwrap_or_default()
        );
    }
    println!("{} work items", study.items().len());
    Ok(())
}

fn print_status(store: &Store, rec: &StudyRecord) -> Result<()> {
    let rows = store.status(&rec.hash)?;
    println!(
        "study {} ({}), db {}",
        rec.name,
        &rec.hash[..12],
        store.path().display()
    );
    let w = rows
        .iter()
        .map(|r| r.condition.len())
        .max()
        .unwrap_or(9)
        .max(9);
    let ws = rows
        .iter()
        .map(|r| r.prompt_set.len())
        .max()
        .unwrap_or(3)
        .max(3);
    println!("{:<w$}  {:<ws$}  {:>11}", "condition", "set", "done/total");
    let (mut d, mut t) = (0, 0);
    for r in &rows {
        println!(
            "{:<w$}  {:<ws$}  {:>11}",
            r.condition,
            r.prompt_set,
            format!("{}/{}", r.done, r.total)
        );
        d += r.done;
        t += r.total;
    }
    println!(
        "{:<w$}  {:<ws$}  {:>11}  ({:.0}%)",
        "total",
        "",
        format!("{d}/{t}"),
        100.0 * d as f64 / t.max(1) as f64
    );
    print_endpoint(store, rec)
}

/// For an endpoint study: the target, what the server reported, failures, usage and cost.
fn print_endpoint(store: &Store, rec: &StudyRecord) -> Result<()> {
    let Some(t) = store.target(&rec.hash)? else {
        return Ok(());
    };
    let prices = stored_file(rec)
        .ok()
        .and_then(|f| f.model.endpoint().cloned());
    println!(
        "target: endpoint {} model {}; server reported {}; white-box fields do not apply (no weights, tokenizer, directions)",
        t.target["base_url"].as_str().unwrap_or("?"),
        t.target["model"].as_str().unwrap_or("?"),
        if t.reported_models.is_empty() {
            "no model name yet".to_string()
        } else {
            format!("model {}", t.reported_models.join(", "))
        }
    );
    let usage = store.endpoint_usage(&rec.hash)?;
    let failures = store.endpoint_failures(&rec.hash)?;
    let w = usage
        .iter()
        .map(|u| u.condition.len())
        .max()
        .unwrap_or(9)
        .max(9);
    println!(
        "{:<w$}  {:>6}  {:>6}  {:>13}  {:>17}  {:>13}  {:>10}",
        "condition",
        "rows",
        "tries",
        "failed tries",
        "prompt tokens",
        "completion tok",
        "est. cost"
    );
    let (mut tp, mut tc) = (0u64, 0u64);
    for u in &usage {
        tp += u.prompt_tokens;
        tc += u.completion_tokens;
        let cost = prices
            .as_ref()
            .and_then(|p| p.cost(u.prompt_tokens, u.completion_tokens));
        println!(
            "{:<w$}  {:>6}  {:>6}  {:>13}  {:>17}  {:>13}  {:>10}",
            u.condition,
            u.rows,
            u.tries_ok_rows + u.failed_tries,
            u.failed_tries,
            u.prompt_tokens,
            u.completion_tokens,
            cost.map(|c| format!("{c:.4}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    let cost = prices.as_ref().and_then(|p| p.cost(tp, tc));
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &failures {
        *kinds.entry(f.kind.as_str()).or_default() += 1;
    }
    println!(
        "usage: {tp} prompt + {tc} completion tokens{}; {} failed tries recorded{}",
        cost.map(|c| format!(
            ", estimated cost {c:.4} (price_input_per_mtok / price_output_per_mtok)"
        ))
        .unwrap_or_else(|| ", no prices given".into()),
        failures.len(),
        if kinds.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                kinds
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(())
}

fn status(a: StatusArgs) -> Result<()> {
    let store = Store::open_read(&a.db)?;
    let rec = store.find_study(a.study.as_deref())?;
    if a.json {
        let rows = store.status(&rec.hash)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "study": rec.name, "hash": rec.hash, "conditions": rows,
                "done": rows.iter().map(|r| r.done).sum::<usize>(),
                "total": rows.iter().map(|r| r.total).sum::<usize>(),
            }))?
        );
        return Ok(());
    }
    print_status(&store, &rec)
}

fn stored_file(rec: &StudyRecord) -> Result<StudyFile> {
    // The stored TOML is checked again; relative paths resolve from the recorded file's folder.
    let base = rec
        .source_path
        .as_deref()
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(StudyFile::parse(&rec.toml, &base)?)
}

fn table(a: TableArgs) -> Result<()> {
    let store = Store::open_read(&a.db)?;
    let rec = store.find_study(a.study.as_deref())?;
    let file = stored_file(&rec).ok();
    let rows = store.rows(&rec.hash)?;
    if rows.is_empty() {
        bail!(
            "study {} has no results yet in {} (pgate study run ...)",
            rec.name,
            a.db.display()
        );
    }
    if let Some(b) = &a.baseline {
        if !rows.iter().any(|r| &r.condition == b) {
            bail!("--baseline '{b}' has no results in study {}", rec.name);
        }
    }
    let opts = ReportOptions {
        baseline: a.baseline.clone(),
        by_category: a.by_category,
        bootstrap: a
            .bootstrap
            .or(file.as_ref().map(|f| f.stats.bootstrap))
            .unwrap_or(2000),
        seed: file.as_ref().map(|f| f.stats.seed).unwrap_or(0),
    };
    let rep = report(&rows, &rec.baseline, &opts);
    if let Some(p) = &a.csv {
        std::fs::write(p, report_csv(&rep)).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
        return Ok(());
    }
    print_table(&rec, &rep, &opts);
    if let Some(p) = &a.csv {
        println!("table written to {}", p.display());
    }
    Ok(())
}

fn print_table(rec: &StudyRecord, rep: &[ReportRow], opts: &ReportOptions) {
    let baseline = opts.baseline.as_deref().unwrap_or(&rec.baseline);
    println!(
        "study {} ({}); rates with Wilson 95% intervals; paired vs '{}' over the same prompts: refusal difference with a {}-resample bootstrap 95% interval, McNemar exact p (mid-p)",
        rec.name,
        &rec.hash[..12],
        baseline,
        opts.bootstrap
    );
    let wc = rep
        .iter()
        .map(|r| r.condition.len())
        .max()
        .unwrap_or(9)
        .max(9);
    let ws = rep
        .iter()
        .map(|r| {
            r.prompt_set.len()
                + r.category
                    .as_ref()
                    .map(|c| c.chars().count() + 1)
                    .unwrap_or(0)
        })
        .max()
        .unwrap_or(3)
        .max(3);
    println!(
        "{:<wc$}  {:<ws$}  {:>4}  {:<22}  {:<22}  {:<22}  {:>5}  {:<24}  McNemar p (mid-p)",
        "condition", "set", "n", "refusal", "bypass", "degenerate", "leak", "Δrefusal [95% CI]",
    );
    for r in rep {
        let set = match &r.category {
            Some(c) => format!("{}/{}", r.prompt_set, c),
            None => r.prompt_set.clone(),
        };
        let (diff, p) = match &r.vs_baseline {
            None => ("-".to_string(), "-".to_string()),
            Some(v) if v.n_pairs == 0 => ("no pairs".into(), "-".into()),
            Some(v) => (
                format!(
                    "{:+.1} [{:+.1}, {:+.1}]",
                    100.0 * v.diff.diff,
                    100.0 * v.diff.lo,
                    100.0 * v.diff.hi
                ),
                format!(
                    "{} ({})  b={} c={}",
                    pval(v.mcnemar.p_exact),
                    pval(v.mcnemar.p_mid),
                    v.mcnemar.b,
                    v.mcnemar.c
                ),
            ),
        };
        println!(
            "{:<wc$}  {:<ws$}  {:>4}  {:<22}  {:<22}  {:<22}  {:>5.2}  {:<24}  {}",
            r.condition,
            set,
            r.n,
            pct(&r.refusal),
            pct(&r.bypass),
            pct(&r.degenerate),
            r.leakage_mean,
            diff,
            p
        );
    }
    let judged: Vec<&ReportRow> = rep.iter().filter(|r| !r.judges.is_empty()).collect();
    if judged.is_empty() {
        println!("judges: none ran (StrongREJECT and safety not judged; leak = rule-based leakage proxy)");
        return;
    }
    println!();
    println!(
        "{:<wc$}  {:<ws$}  {:<12}  {:>6}  {:>6}  {:>8}  {:<22}  {:>7}",
        "condition", "set", "judge", "judged", "failed", "SR score", "unsafe", "leakage"
    );
    for r in judged {
        let set = match &r.category {
            Some(c) => format!("{}/{}", r.prompt_set, c),
            None => r.prompt_set.clone(),
        };
        for j in &r.judges {
            println!(
                "{:<wc$}  {:<ws$}  {:<12}  {:>6}  {:>6}  {:>8}  {:<22}  {:>7}",
                r.condition,
                set,
                j.judge,
                j.judged,
                j.failed,
                j.strongreject_mean
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or_else(|| "-".into()),
                j.unsafe_rate
                    .as_ref()
                    .map(pct)
                    .unwrap_or_else(|| "-".into()),
                j.leakage_mean
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
    }
}

fn judge(a: JudgeArgs) -> Result<()> {
    let store = Store::open(&a.db)?;
    let rec = store.find_study(a.study.as_deref())?;
    let file = match &a.file {
        Some(p) => StudyFile::load(p)?,
        None => stored_file(&rec)?,
    };
    let judges: Vec<_> = file
        .judges
        .iter()
        .filter(|j| a.judge.as_ref().is_none_or(|n| &j.display_name() == n))
        .filter(|j| j.kind != JudgeKind::Rules)
        .collect();
    if judges.is_empty() {
        bail!(
            "no model judge to run{} (study {} has: {}); add a [[judge]] with kind = \"http\" or \"local\" and pass --file",
            a.judge.as_deref().map(|n| format!(" named '{n}'")).unwrap_or_default(),
            rec.name,
            if file.judges.is_empty() {
                "none".to_string()
            } else {
                file.judges.iter().map(|j| j.display_name()).collect::<Vec<_>>().join(", ")
            }
        );
    }
    install_ctrlc();
    let dev = device(a.cuda)?;
    for cfg in judges {
        let Some(j) = make_judge(cfg, dev.clone())? else {
            continue;
        };
        judge_with(
            &store,
            &rec.hash,
            j.as_ref(),
            cfg,
            &JudgeOptions {
                limit: a.limit,
                redo_all: a.redo,
            },
            a.quiet,
        )?;
        if STOP.load(Ordering::SeqCst) {
            drop(store);
            std::process::exit(130);
        }
    }
    Ok(())
}

/// Pairs the rows of two studies by condition name, prompt (id and text) and sample: two studies
/// that drew different subsets of one prompt source pair on the prompts they share.
fn compare(a: CompareArgs) -> Result<()> {
    use persona_gate::eval::paired::mcnemar_pairs;
    use persona_gate::eval::wilson;
    use std::collections::BTreeMap;
    let store = Store::open_read(&a.db)?;
    let ra = store.find_study(Some(&a.a))?;
    let rb = store.find_study(Some(&a.b))?;
    // (condition, prompt id, prompt text, sample) -> (label, output)
    type Key = (String, String, String, i64);
    type Entry = (String, String);
    type Index = BTreeMap<Key, Entry>;
    let index = |rec: &StudyRecord| -> Result<(Vec<String>, Index)> {
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
    };
    let (order, ma) = index(&ra)?;
    let (_, mb) = index(&rb)?;
    let mut out = Vec::new();
    let mut flips = Vec::new();
    for c in &order {
        let pairs: Vec<(&Entry, &Entry)> = ma
            .iter()
            .filter(|(k, _)| &k.0 == c)
            .filter_map(|(k, va)| {
                mb.get(k).map(|vb| {
                    if va.0 != vb.0 {
                        flips.push((k.clone(), va.clone(), vb.clone()));
                    }
                    (va, vb)
                })
            })
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let n = pairs.len();
        let refused: Vec<(bool, bool)> = pairs
            .iter()
            .map(|(x, y)| (x.0 == "refusal", y.0 == "refusal"))
            .collect();
        let agree = pairs.iter().filter(|(x, y)| x.0 == y.0).count();
        let same = pairs
            .iter()
            .filter(|(x, y)| x.1.trim() == y.1.trim())
            .count();
        let ka = refused.iter().filter(|p| p.0).count();
        let kb = refused.iter().filter(|p| p.1).count();
        out.push(serde_json::json!({
            "condition": c,
            "n": n,
            "refusal_a": wilson(ka, n),
            "refusal_b": wilson(kb, n),
            "labels_agree": agree,
            "outputs_identical": same,
            "mcnemar": mcnemar_pairs(&refused),
        }));
    }
    if out.is_empty() {
        bail!(
            "studies {} and {} share no (condition name, prompt) pairs with results",
            ra.name,
            rb.name
        );
    }
    if a.json {
        let disagreements: Vec<_> = flips
            .iter()
            .take(a.show)
            .map(|(k, x, y)| {
                serde_json::json!({
                    "condition": k.0, "prompt_id": k.1, "sample": k.3,
                    "label_a": x.0, "label_b": y.0, "output_a": x.1, "output_b": y.1,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "a": ra.name, "b": rb.name, "conditions": out, "disagreements": disagreements
            }))?
        );
        return Ok(());
    }
    println!(
        "A = {} ({}), B = {} ({}); pairs: same condition name, prompt and sample; refusal with Wilson 95%",
        ra.name,
        &ra.hash[..12],
        rb.name,
        &rb.hash[..12]
    );
    let w = order.iter().map(|c| c.len()).max().unwrap_or(9).max(9);
    println!(
        "{:<w$}  {:>5}  {:<22}  {:<22}  {:>13}  {:>13}  McNemar p",
        "condition", "n", "refusal A", "refusal B", "labels agree", "same output"
    );
    for o in &out {
        let n = o["n"].as_u64().unwrap_or(0) as f64;
        let rate = |k: &str| -> String {
            serde_json::from_value::<persona_gate::eval::Rate>(o[k].clone())
                .map(|r| pct(&r))
                .unwrap_or_default()
        };
        println!(
            "{:<w$}  {:>5}  {:<22}  {:<22}  {:>13}  {:>13}  {}",
            o["condition"].as_str().unwrap_or(""),
            o["n"].as_u64().unwrap_or(0),
            rate("refusal_a"),
            rate("refusal_b"),
            format!(
                "{} ({:.0}%)",
                o["labels_agree"],
                100.0 * o["labels_agree"].as_f64().unwrap_or(0.0) / n.max(1.0)
            ),
            format!(
                "{} ({:.0}%)",
                o["outputs_identical"],
                100.0 * o["outputs_identical"].as_f64().unwrap_or(0.0) / n.max(1.0)
            ),
            o["mcnemar"]["p_exact"]
                .as_f64()
                .map(pval)
                .unwrap_or_else(|| "-".into())
        );
    }
    if a.show > 0 {
        println!(
            "\nlabels differ on {} pairs{}",
            flips.len(),
            if flips.len() > a.show {
                format!(" (first {})", a.show)
            } else {
                String::new()
            }
        );
        let clip = |t: &str| -> String {
            let t = t.trim().replace('\n', " ");
            match t.char_indices().nth(100) {
                Some((i, _)) => format!("{}...", &t[..i]),
                None => t,
            }
        };
        for (k, x, y) in flips.iter().take(a.show) {
            println!("{} / {} (sample {}):", k.0, k.1, k.3);
            println!("  A {:<10} {:?}", x.0, clip(&x.1));
            println!("  B {:<10} {:?}", y.0, clip(&y.1));
        }
    }
    Ok(())
}

/// The stored studies to relabel and the reader model spec they share (None for endpoint studies,
/// whose model is not local).
fn relabel_targets(
    store: &Store,
    which: Option<&str>,
) -> Result<(Vec<StudyRecord>, Vec<StudyFile>)> {
    let recs = match which {
        Some(w) => vec![store.find_study(Some(w))?],
        None => store.studies()?,
    };
    if recs.is_empty() {
        bail!(
            "{}: no study has been run against this database",
            store.path().display()
        );
    }
    let files = recs.iter().map(stored_file).collect::<Result<Vec<_>>>()?;
    Ok((recs, files))
}

/// The reader model: --model, else the one local model the studies ran (resolved like
/// `Study::model_spec`).
fn reader_spec(a: &RelabelArgs, files: &[StudyFile]) -> Result<String> {
    if let Some(m) = &a.model {
        return Ok(m.clone());
    }
    let mut specs: Vec<String> = Vec::new();
    for f in files {
        if f.model.endpoint().is_some() {
            bail!("--labeler {} reads with a local model, and this is an endpoint study: give --model (e.g. --model q15)", a.labeler);
        }
        let local = f.base_dir.join(&f.model.spec);
        let spec = if Path::new(&f.model.spec).is_relative() && local.exists() {
            local.to_string_lossy().to_string()
        } else {
            f.model.spec.clone()
        };
        if !specs.contains(&spec) {
            specs.push(spec);
        }
    }
    match specs.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "the studies ran different models ({}): pick one with --study or give --model",
            specs.join(", ")
        ),
    }
}

fn relabel(a: RelabelArgs) -> Result<()> {
    use persona_gate::label::ops::{make_labeler, LabelerChoice};
    use persona_gate::study::relabel::{relabel_study, RelabelEvent, RelabelOptions};
    if a.labeler == "judge" {
        bail!("--labeler judge: study relabel takes rules, rules-v1, probe or ensemble (LLM judges grade stored rows with `pgate study judge`)");
    }
    if !a.db.exists() {
        bail!(
            "{}: no results database here (run `pgate study run STUDY.toml --db {}` first)",
            a.db.display(),
            a.db.display()
        );
    }
    let mut store = Store::open(&a.db)?;
    let (recs, files) = relabel_targets(&store, a.study.as_deref())?;
    let choice = LabelerChoice::parse(&a.labeler, a.probe.clone())?;
    let model = if choice.needs_model() {
        let spec = reader_spec(&a, &files)?;
        eprintln!("[pgate] reader model {spec}");
        Some(
            crate::ModelArgs {
                model: spec,
                dtype: a.dtype.clone(),
                cuda: a.cuda,
                device: None,
                batch_invariant: false,
            }
            .load()?,
        )
    } else {
        None
    };
    // The wrong-language rule only when every study's prompts are English.
    let english = files.iter().all(|f| f.english);
    let mut labeler = make_labeler(&choice, model.as_ref(), 8, english)?;
    install_ctrlc();
    let pb = bar(0, "rows", a.quiet || a.json);
    let opts = RelabelOptions {
        batch_size: a.batch_size,
        redo: a.redo,
        stop: Some(&STOP),
    };
    // --study: that study only; else every study of the database.
    let which = a.study.as_ref().map(|_| recs[0].hash.clone());
    let summary = relabel_study(
        &mut store,
        which.as_deref(),
        labeler.as_mut(),
        &opts,
        &mut |ev| match ev {
            RelabelEvent::Planned {
                rows,
                todo,
                labeler,
            } => {
                pb.set_length(todo as u64);
                say(&pb, format!("[pgate] {rows} rows: {todo} to label with {labeler}, {} labeled by it already", rows - todo));
            }
            RelabelEvent::Stored { done, .. } => pb.set_position(done as u64),
        },
    )?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_relabel(&summary);
    }
    if summary.interrupted {
        eprintln!(
            "[pgate] interrupted: labeled rows are stored; run the same command again to continue"
        );
        drop(store);
        std::process::exit(130);
    }
    Ok(())
}

fn print_relabel(s: &persona_gate::study::relabel::RelabelSummary) {
    println!(
        "{} rows labeled by {} in {:.1} s ({} labeled by it already): {} labels changed",
        s.relabeled, s.labeler, s.secs, s.skipped, s.changed
    );
    for st in &s.studies {
        println!("study {} ({})", st.study, &st.hash[..12.min(st.hash.len())]);
        let wc = st
            .conditions
            .iter()
            .map(|c| c.condition.len())
            .max()
            .unwrap_or(9)
            .max(9);
        let ws = st
            .conditions
            .iter()
            .map(|c| c.prompt_set.len())
            .max()
            .unwrap_or(3)
            .max(3);
        println!(
            "  {:<wc$}  {:<ws$}  {:>5}  {:>7}  {:<24}  changes",
            "condition", "set", "n", "changed", "refusal before -> after"
        );
        for c in &st.conditions {
            let moves: Vec<String> = c
                .transitions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "  {:<wc$}  {:<ws$}  {:>5}  {:>7}  {:<24}  {}",
                c.condition,
                c.prompt_set,
                c.n,
                c.changed,
                format!(
                    "{:.1}% -> {:.1}%",
                    100.0 * c.refusal_rate_before(),
                    100.0 * c.refusal_rate_after()
                ),
                if moves.is_empty() {
                    "-".to_string()
                } else {
                    moves.join(", ")
                }
            );
        }
    }
}
