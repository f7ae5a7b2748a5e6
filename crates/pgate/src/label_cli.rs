//! `pgate label`: label outputs with a measured labeler, train the probe, measure labelers on the
//! development set. Parsing and printing only; the operations live in `persona_gate::label`.

use anyhow::{bail, Result};
use persona_gate::label::files::{CutJob, DevsetEval, LabelFlags, LengthStudy, TrainJob};

use crate::args::WithModel;
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
    Train(WithModel<TrainJob>),
    /// Measure rules v1, rules v2, the probe and the ensemble on a split of the development set.
    ///
    /// Example: pgate label eval q15 --devset data/labels/devset.jsonl --split held
    Eval(WithModel<DevsetEval>),
    /// How many ensemble labels change when the development set's answers are cut shorter.
    ///
    /// Example: pgate label lengths q15 --devset data/labels/devset.jsonl --lengths 24,64,128,256
    Lengths(WithModel<LengthStudy>),
    /// Cut each row's output to its first N tokens (the view a shorter generation would give;
    /// exact for greedy decoding): sets "max_tokens" and suffixes "id" with "@N".
    ///
    /// Example: pgate label cut q15 --in rows.jsonl --tokens 24 -o rows24.jsonl
    Cut(WithModel<CutJob>),
}

pub fn run(cmd: LabelCmd) -> Result<()> {
    match (cmd.sub, cmd.run) {
        (Some(LabelSub::Train(a)), _) => train(a),
        (Some(LabelSub::Eval(a)), _) => eval(a),
        (Some(LabelSub::Lengths(a)), _) => {
            print!("{}", a.job.run(&a.m.load()?, &mut Progress::new())?);
            Ok(())
        }
        (Some(LabelSub::Cut(a)), _) => {
            println!("{}", a.job.run(&a.m.load()?)?);
            Ok(())
        }
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

fn train(a: WithModel<TrainJob>) -> Result<()> {
    let run = a.job.run(&a.m.load()?, &mut Progress::new())?;
    run.probe.save(&a.job.out)?;
    print!("{}", run.summary(&a.job.out));
    Ok(a.job.write_reports(&run)?)
}

fn eval(a: WithModel<DevsetEval>) -> Result<()> {
    let r = a.job.run(&a.m.load()?, &mut Progress::new())?;
    println!("{}", r.summary());
    if let Some(j) = &a.job.json {
        write_json(j, &r)?;
    }
    Ok(())
}
