//! `pgate label`: label outputs with a measured labeler, train the probe, measure labelers on the
//! development set. Parsing and printing only; the operations live in `persona_gate::label`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use persona_gate::label::files::{cut_file, DevsetEval, LabelFlags, LengthStudy, TrainJob};

use crate::output::write_json;
use crate::progress::Progress;
use crate::ModelArgs;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LabelCmd {
    #[command(subcommand)]
    pub sub: Option<LabelSub>,
    /// Reader model for the probe and ensemble labelers (not needed for --labeler rules).
    pub model: Option<String>,
    #[command(flatten)]
    pub run: Option<LabelFlags>,
}

#[derive(clap::Subcommand)]
pub enum LabelSub {
    /// Train the refusal probe and degenerate detector on the development set's tune split.
    ///
    /// Example: pgate label train q15 --devset data/labels/devset.jsonl -o q15.probe.json
    Train(TrainArgs),
    /// Measure rules v1, rules v2, the probe and the ensemble on a split of the development set.
    ///
    /// Example: pgate label eval q15 --devset data/labels/devset.jsonl --split held
    Eval(EvalArgs),
    /// How many ensemble labels change when the development set's answers are cut shorter.
    ///
    /// Example: pgate label lengths q15 --devset data/labels/devset.jsonl --lengths 24,64,128,256
    Lengths(LengthsArgs),
    /// Cut each row's output to its first N tokens (the view a shorter generation would give;
    /// exact for greedy decoding): sets "max_tokens" and suffixes "id" with "@N".
    ///
    /// Example: pgate label cut q15 --in rows.jsonl --tokens 24 -o rows24.jsonl
    Cut(CutArgs),
}

#[derive(clap::Args)]
pub struct CutArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long = "in")]
    pub input: PathBuf,
    #[arg(long)]
    pub tokens: usize,
    #[arg(short, long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(short, long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub job: TrainJob,
    /// Write the measurements (JSON) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the measured accuracies in the format of data/labels/accuracy.json here (what
    /// receipts quote and `pgate check --min-labeler-accuracy` reads).
    #[arg(long)]
    pub accuracy: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[command(flatten)]
    pub eval: DevsetEval,
    /// Write the measurements as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct LengthsArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[command(flatten)]
    pub study: LengthStudy,
}

pub fn run(cmd: LabelCmd) -> Result<()> {
    match (cmd.sub, cmd.run) {
        (Some(LabelSub::Train(a)), _) => train(a),
        (Some(LabelSub::Eval(a)), _) => eval(a),
        (Some(LabelSub::Lengths(a)), _) => lengths(a),
        (Some(LabelSub::Cut(a)), _) => cut(a),
        (None, Some(f)) => label(cmd.model, f),
        (None, None) => {
            bail!("pgate label needs --in and -o (or a subcommand: train, eval, lengths)")
        }
    }
}

fn label(model: Option<String>, f: LabelFlags) -> Result<()> {
    if f.labeler == "judge" && (f.judge_url.is_none() || f.judge_model.is_none()) {
        bail!("--labeler judge needs --judge-url and --judge-model");
    }
    let job = f.prepare()?;
    let model = match (&model, job.needs_model()) {
        (Some(m), true) => Some(
            ModelArgs {
                dtype: f.dtype.clone(),
                ..ModelArgs::named(m.clone())
            }
            .load()?,
        ),
        (None, true) => bail!(
            "--labeler {} reads with a model: give MODEL (e.g. pgate label q15 --in ...)",
            f.labeler
        ),
        (_, false) => None,
    };
    let run = job.run(model.as_ref(), &f.out, &mut Progress::new())?;
    println!("{}", run.summary());
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    let model = a.m.load()?;
    let job = a.job;
    let run = job.run(&model, &mut Progress::new())?;
    run.probe.save(&a.out)?;
    print!("{}", run.summary(&a.out));
    if let Some(f) = &a.report {
        write_json(f, &run.report)?;
    }
    if let Some(f) = &a.accuracy {
        let text = serde_json::to_string_pretty(&run.accuracy_entries())? + "\n";
        std::fs::write(f, text).with_context(|| f.display().to_string())?;
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let r = a.eval.run(&a.m.load()?, &mut Progress::new())?;
    println!("{}", r.summary());
    if let Some(j) = &a.json {
        write_json(j, &r)?;
    }
    Ok(())
}

fn lengths(a: LengthsArgs) -> Result<()> {
    print!("{}", a.study.run(&a.m.load()?, &mut Progress::new())?);
    Ok(())
}

fn cut(a: CutArgs) -> Result<()> {
    let model = a.m.load()?;
    let n = cut_file(&model, &a.input, a.tokens, &a.out)?;
    println!("{n} rows cut to {} tokens -> {}", a.tokens, a.out.display());
    Ok(())
}
