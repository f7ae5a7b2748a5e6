//! `pgate serve`, `pgate guard calibrate|eval|eval-output` and `pgate serve-bench`: argument
//! parsing and printing over `persona_gate_serve` (the flags are the library's option types).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use persona_gate::events::Event;
use persona_gate_serve::bench::BenchFlags;
use persona_gate_serve::ops::{
    self, CalibrateJob, GuardEval, GuardEvalJob, OutputEval, OutputEvalJob, ServeFlags,
};

use crate::args::WithModel;
use crate::output::write_json;

pub fn run_serve(a: WithModel<ServeFlags>) -> Result<()> {
    Ok(a.job.serve(&a.m, &mut notes("[pgate serve]"), |addr| {
        // Tests and scripts read this line for the port.
        println!("listening on http://{addr}");
        let _ = std::io::stdout().flush();
    })?)
}

/// A sink printing the notes and warnings of an operation on stderr after `prefix`.
fn notes(prefix: &'static str) -> impl FnMut(Event) {
    move |e| match e {
        Event::Note(s) => eprintln!("{prefix} {s}"),
        Event::Warning(s) => eprintln!("{prefix} warning: {s}"),
        _ => {}
    }
}

#[derive(Subcommand)]
pub enum GuardCmd {
    /// Fit the guard: a logistic refusal-intent probability from the refusal direction's
    /// projection under the default persona, and the spread of the persona direction's projection
    /// per layer; report true and false positive rates on held-out sets.
    ///
    /// Example: pgate guard calibrate q15 --refusal refusal.safetensors --persona compliant.safetensors -o q15-guard.json
    Calibrate(WithModel<CalibrateJob>),
    /// Guard flag rates under a preset: on harmful prompts the default persona refuses (it
    /// generates them first) and on harmless prompts.
    ///
    /// Example: pgate guard eval q15 --guard-file q15-guard.json --presets presets.toml --preset compliant --harmful strongreject --harmless harmless_val --harmless-skip 200
    Eval(WithModel<GuardEvalJob>),
    /// Output guard rates: generate under each preset, label the answers, and report the share
    /// flagged among compliant answers to requests the default persona refuses (true positives)
    /// and among refusals and answers to harmless requests (false positives), as a Markdown table.
    ///
    /// Example: pgate guard eval-output q15 --guard-file examples/serve/q15-guard.json --presets examples/serve/presets.toml --directions examples/directions/q15 --preset compliant,builtin -n 50
    EvalOutput(WithModel<OutputEvalJob>),
}

pub fn run_guard(cmd: GuardCmd) -> Result<()> {
    let mut log = notes("[pgate guard]");
    match cmd {
        GuardCmd::Calibrate(WithModel { m, job }) => {
            let input = job.input()?;
            let model = m.load()?;
            let t0 = Instant::now();
            let g = ops::calibrate_guard(&model, &input, &job.out, &mut log)?;
            print!("{}", g.to_text());
            println!("wrote {} ({:.0} s)", job.out.display(), secs(t0));
        }
        GuardCmd::Eval(WithModel { m, job }) => {
            let out = job.out.clone();
            let eval = GuardEval::new(job)?;
            let model = m.load()?;
            let t0 = Instant::now();
            let r = eval.run(&model, &mut log)?;
            if let Some(p) = &out {
                r.write_rows(p)?;
            }
            print!("{}", r.to_text());
            println!("({:.0} s)", secs(t0));
        }
        GuardCmd::EvalOutput(WithModel { m, job }) => {
            let out = job.out.clone();
            let eval = OutputEval::new(job)?;
            let model = m.load()?;
            let t0 = Instant::now();
            let r = eval.run(&model, &mut log)?;
            print!("{}", r.markdown());
            if let Some(p) = &out {
                write_json(p, &r)?;
                println!("wrote {}", p.display());
            }
            println!("({:.0} s)", secs(t0));
        }
    }
    Ok(())
}

fn secs(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

pub fn run_serve_bench(a: BenchFlags) -> Result<()> {
    let r = persona_gate_serve::bench::run(&a.config(), |m| eprintln!("[serve-bench] {m}"))?;
    print!("{}", r.summary());
    if let Some(p) = &a.out {
        write_json(p, &r)?;
    }
    if r.errors > 0 {
        bail!("{} requests failed (other than 429)", r.errors);
    }
    Ok(())
}
