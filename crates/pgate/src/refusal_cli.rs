//! `pgate extract refusal` (Arditi et al. selection) and `pgate eval` (label rates of a prompt set
//! under an intervention plan): parsing and printing over `persona_gate::refusal`.

use std::path::PathBuf;

use anyhow::Result;
use persona_gate::refusal::rates::{label_rates, select_prompts, RateOptions};
use persona_gate::refusal::{extract_refusal, RefusalFlags};

use crate::args::write_json;
use crate::progress::Progress;
use crate::ModelArgs;

/// Extract and select the refusal direction.
///
/// Example: pgate extract refusal q15 -o refusal.safetensors --n-train 64 --n-val 16
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

/// Label rates of a prompt set under an optional intervention plan.
///
/// Example: pgate eval q15 --prompts harmful_val -n 100 --ablate refusal.safetensors[12]@0-27
#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Prompt set: a file (csv/json/jsonl/txt) or a name (strongreject, harmful_val, demo_harmful, ...).
    #[arg(long)]
    pub prompts: String,
    /// Use N prompts (after --skip).
    #[arg(short = 'n', long)]
    pub n: Option<usize>,
    /// Skip the first K prompts (e.g. those used for extraction).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// System prompt (a persona mode).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub plan: crate::args::PlanArgs,
    /// Write every output with its label as JSONL.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let set = select_prompts(&a.prompts, a.skip, a.n)?;
    a.plan.check()?;
    let model = a.m.load()?;
    let opts = RateOptions {
        system: a.system,
        max_tokens: a.max_tokens,
        batch_size: a.batch_size,
        plan: a.plan.load(&model)?,
        out: a.out,
    };
    let report = label_rates(&model, &set, &opts, &mut Progress::new())?;
    print!("{}", report.to_text());
    Ok(())
}
