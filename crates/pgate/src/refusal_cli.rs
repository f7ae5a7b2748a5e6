//! `pgate extract refusal` (Arditi et al. selection) and `pgate eval` (label rates of a prompt set
//! under an intervention plan): parsing and printing over `persona_gate::refusal`.

use std::path::PathBuf;

use anyhow::Result;
use persona_gate::refusal::rates::{label_rates, RateFlags};
use persona_gate::refusal::{extract_refusal, RefusalFlags};

use crate::output::write_json;
use crate::progress::Progress;
use crate::ModelArgs;

#[derive(clap::Args)]
pub struct RefusalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(short, long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub job: RefusalFlags,
    /// Write the candidate scores as JSON here.
    #[arg(long)]
    pub scores: Option<PathBuf>,
}

pub fn run_refusal(a: RefusalArgs) -> Result<()> {
    let job = a.job.job()?;
    let model = a.m.load()?;
    let t0 = std::time::Instant::now();
    let sel = extract_refusal(&model, &job, &mut Progress::new())?;
    print!("{}", sel.to_table());
    sel.direction.save(&a.out)?;
    if let Some(p) = &a.scores {
        write_json(p, &sel)?;
    }
    println!(
        "selected layer {} position {} -> {} ({:.0} s)",
        sel.layer,
        sel.position,
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[command(flatten)]
    pub flags: RateFlags,
    #[command(flatten)]
    pub plan: persona_gate::directions::PlanFlags,
    /// Write every output with its label as JSONL.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let set = a.flags.prompt_set()?;
    a.plan.check()?;
    let model = a.m.load()?;
    let opts = a
        .flags
        .options(crate::args::load_plan(&a.plan, &model)?, a.out);
    let report = label_rates(&model, &set, &opts, &mut Progress::new())?;
    print!("{}", report.to_text());
    Ok(())
}
