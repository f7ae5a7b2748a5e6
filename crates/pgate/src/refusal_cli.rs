//! `pgate extract refusal` (Arditi et al. selection) and `pgate eval` (label rates of a prompt set
//! under an intervention plan): parsing and printing over `persona_gate::refusal`.

use anyhow::Result;
use persona_gate::refusal::rates::{label_rates, RateFlags};
use persona_gate::refusal::{extract_refusal, RefusalFlags};

use crate::args::{load_plan, WithModel};
use crate::progress::Progress;

pub fn run_refusal(a: WithModel<RefusalFlags>) -> Result<()> {
    let job = a.job.job()?;
    let model = a.m.load()?;
    let t0 = std::time::Instant::now();
    let sel = extract_refusal(&model, &job, &mut Progress::new())?;
    print!("{}", sel.to_table());
    a.job.write(&sel)?;
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", sel.selected_line(&a.job.out, secs));
    Ok(())
}

pub fn run_eval(a: WithModel<RateFlags>) -> Result<()> {
    let set = a.job.prompt_set()?;
    a.job.plan.check()?;
    let model = a.m.load()?;
    let opts = a.job.options(load_plan(&a.job.plan, &model)?);
    let report = label_rates(&model, &set, &opts, &mut Progress::new())?;
    print!("{}", report.to_text());
    Ok(())
}
