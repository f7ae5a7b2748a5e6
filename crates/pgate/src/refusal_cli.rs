//! `pgate extract refusal` (Arditi et al. selection) and `pgate eval` (label rates of a prompt set
//! under an intervention plan).

use std::path::PathBuf;

use anyhow::{Context, Result};
use persona_gate::directions::Position;
use persona_gate::eval::{wilson, Label, PromptSet};
use persona_gate::generate::{generate_chat, ChatPrompt, GenSettings, Sampling};
use persona_gate::label::rules::generation_label as label_output;
use persona_gate::refusal::{select_refusal_direction, SelectOptions};

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
    /// Harmful instructions for the means (file or name).
    #[arg(long, default_value = "harmful_train")]
    pub harmful: String,
    /// Harmless instructions for the means (file or name).
    #[arg(long, default_value = "harmless_train")]
    pub harmless: String,
    /// Harmful validation prompts for selection.
    #[arg(long, default_value = "harmful_val")]
    pub harmful_val: String,
    /// Harmless validation prompts for selection.
    #[arg(long, default_value = "harmless_val")]
    pub harmless_val: String,
    #[arg(long, default_value_t = 128)]
    pub n_train: usize,
    #[arg(long, default_value_t = 32)]
    pub n_val: usize,
    /// Template positions for candidates, e.g. last or -1,-2,-3.
    #[arg(long, default_value = "last", value_delimiter = ',')]
    pub positions: Vec<String>,
    #[arg(long, default_value_t = 0.1)]
    pub kl_max: f64,
    #[arg(long, default_value_t = 1)]
    pub layer_stride: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Write the candidate scores as JSON here.
    #[arg(long)]
    pub scores: Option<PathBuf>,
}

pub fn run_refusal(a: RefusalArgs) -> Result<()> {
    let model = a.m.load()?;
    let load =
        |s: &str, n: usize| -> Result<Vec<String>> { Ok(PromptSet::load(s)?.take(n).texts()) };
    let positions = a
        .positions
        .iter()
        .map(|p| Position::parse(p))
        .collect::<persona_gate::Result<Vec<_>>>()?;
    let opts = SelectOptions {
        positions,
        kl_max: a.kl_max,
        batch_size: a.batch_size,
        layer_stride: a.layer_stride,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let sel = select_refusal_direction(
        &model,
        &load(&a.harmful, a.n_train)?,
        &load(&a.harmless, a.n_train)?,
        &load(&a.harmful_val, a.n_val)?,
        &load(&a.harmless_val, a.n_val)?,
        &opts,
        |msg| eprintln!("[pgate] {msg}"),
    )?;
    println!(
        "baseline refusal score: harmful {:.2}, harmless {:.2}",
        sel.baseline_harmful, sel.baseline_harmless
    );
    println!(
        "{:>5} {:>6} {:>8} {:>8} {:>8} {:>8}  note",
        "layer", "pos", "norm", "bypass", "induce", "KL"
    );
    for s in &sel.scores {
        let mark = if s.layer == sel.layer && s.position == sel.position {
            "<- selected".to_string()
        } else {
            s.filtered.clone().unwrap_or_default()
        };
        println!(
            "{:>5} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.3}  {mark}",
            s.layer, s.position, s.norm, s.bypass, s.induce, s.kl
        );
    }
    sel.direction.save(&a.out)?;
    if let Some(p) = &a.scores {
        std::fs::write(p, serde_json::to_string_pretty(&sel)?)
            .with_context(|| format!("writing {}", p.display()))?;
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
    let mut set = PromptSet::load(&a.prompts)?;
    set.items.drain(..a.skip.min(set.items.len()));
    if set.items.is_empty() {
        anyhow::bail!(
            "prompt set {} has no prompts after skipping {}",
            a.prompts,
            a.skip
        );
    }
    if let Some(n) = a.n {
        set = set.take(n);
    }
    a.plan.check()?;
    let model = a.m.load()?;
    let plan = a.plan.load(&model)?;
    let prompts: Vec<ChatPrompt> = set
        .items
        .iter()
        .map(|i| ChatPrompt {
            id: Some(i.id.clone()),
            system: a.system.clone(),
            user: i.text.clone(),
        })
        .collect();
    let settings = GenSettings {
        max_new_tokens: a.max_tokens,
        sampling: Sampling::greedy(),
        batch_size: a.batch_size,
    };
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} prompts  {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut out = match &a.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut counts = [0usize; 3];
    let t0 = std::time::Instant::now();
    let (_, stats) = generate_chat(&model, &prompts, &settings, plan, |_, c| {
        let l = label_output(&c.text, true);
        counts[l.label as usize] += 1;
        if let Some(f) = out.as_mut() {
            let row = serde_json::json!({"id": c.id, "prompt": c.user, "output": c.text, "label": l.label, "labeler": "rules@2", "rule": l});
            use std::io::Write;
            writeln!(f, "{row}")
                .and_then(|_| f.flush())
                .map_err(|e| persona_gate::Error::io("--out", e))?;
        }
        bar.inc(1);
        Ok(())
    })?;
    bar.finish_and_clear();
    let n = prompts.len();
    println!(
        "{} prompts of {} ({:.0} s, decode {:.1} tok/s)",
        n,
        set.name,
        t0.elapsed().as_secs_f64(),
        stats.decode_tokens as f64 / stats.decode_secs.max(1e-9)
    );
    for (label, k) in [
        (Label::Refusal, counts[0]),
        (Label::Bypass, counts[1]),
        (Label::Degenerate, counts[2]),
    ] {
        println!("{:<11} {:>4}/{n}  {}", label.name(), k, wilson(k, n));
    }
    Ok(())
}
