//! Label rates of a prompt set under a persona (system prompt) and an intervention plan: greedy
//! answers, each labeled by rules v2, counted with Wilson 95% intervals (`pgate eval`).
//!
//! Why in the library: a quick rate check is the smallest study there is; the Python package and
//! scripts want the counts as numbers, not the command's printout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::eval::{wilson, Label, PromptSet};
use crate::events::{Event, EventSink};
use crate::generate::{generate_chat, ChatPrompt, GenSettings, Sampling};
use crate::intervene::CompiledPlan;
use crate::label::rules::generation_label;
use crate::model::Model;
use crate::{Error, Result};

/// The labeler every row is labeled by (recorded in the rows written).
pub const RATES_LABELER: &str = "rules@2";

/// Prompts `skip..skip + n` of a prompt set (a file or a name); errors when none are left.
pub fn select_prompts(spec: &str, skip: usize, n: Option<usize>) -> Result<PromptSet> {
    let mut set = PromptSet::load(spec)?;
    set.items.drain(..skip.min(set.items.len()));
    if set.items.is_empty() {
        return Err(Error::Empty(format!(
            "prompt set {spec} has no prompts after skipping {skip}"
        )));
    }
    Ok(match n {
        Some(n) => set.take(n),
        None => set,
    })
}

/// How the answers are generated and where the labeled rows go.
#[derive(Debug, Clone)]
pub struct RateOptions {
    /// System prompt (a persona mode); the template's default when absent.
    pub system: Option<String>,
    pub max_tokens: usize,
    pub batch_size: usize,
    pub plan: Option<Arc<CompiledPlan>>,
    /// Write every answer with its label here (JSONL, flushed row by row).
    pub out: Option<PathBuf>,
}

/// The flags of `pgate eval` besides the model: which prompts, under which system prompt and
/// intervention plan, how long the answers, where the labeled rows go.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RateFlags {
    /// Prompt set: a file (csv/json/jsonl/txt) or a name (strongreject, harmful_val, demo_harmful, ...).
    #[cfg_attr(feature = "cli", arg(long))]
    pub prompts: String,
    /// Use N prompts (after --skip).
    #[cfg_attr(feature = "cli", arg(short = 'n', long))]
    pub n: Option<usize>,
    /// Skip the first K prompts (e.g. those used for extraction).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub skip: usize,
    /// System prompt (a persona mode).
    #[cfg_attr(feature = "cli", arg(long))]
    pub system: Option<String>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 48))]
    pub max_tokens: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub batch_size: usize,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub plan: crate::directions::PlanFlags,
    /// Write every output with its label as JSONL.
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<PathBuf>,
}

impl RateFlags {
    /// The prompts ([`select_prompts`]).
    pub fn prompt_set(&self) -> Result<PromptSet> {
        select_prompts(&self.prompts, self.skip, self.n)
    }

    /// The options with `plan` (from [`RateFlags::plan`]) compiled by the caller.
    pub fn options(&self, plan: Option<Arc<CompiledPlan>>) -> RateOptions {
        RateOptions {
            system: self.system.clone(),
            max_tokens: self.max_tokens,
            batch_size: self.batch_size,
            plan,
            out: self.out.clone(),
        }
    }
}

/// Counts of each label over a prompt set.
#[derive(Debug, Clone, Serialize)]
pub struct RateReport {
    pub prompt_set: String,
    pub n: usize,
    pub refusal: usize,
    pub bypass: usize,
    pub degenerate: usize,
    pub seconds: f64,
    pub decode_tok_s: f64,
}

impl RateReport {
    /// One line for the run, then one per label with its Wilson interval.
    pub fn to_text(&self) -> String {
        let n = self.n;
        let mut out = format!(
            "{} prompts of {} ({:.0} s, decode {:.1} tok/s)\n",
            n, self.prompt_set, self.seconds, self.decode_tok_s
        );
        for (label, k) in [
            (Label::Refusal, self.refusal),
            (Label::Bypass, self.bypass),
            (Label::Degenerate, self.degenerate),
        ] {
            out += &format!("{:<11} {:>4}/{n}  {}\n", label.name(), k, wilson(k, n));
        }
        out
    }
}

/// Generate greedily for every prompt of `set`, label each answer, count; progress and one row
/// event per answer (its label) go to `sink`.
pub fn label_rates(
    model: &Model,
    set: &PromptSet,
    opts: &RateOptions,
    sink: &mut dyn EventSink,
) -> Result<RateReport> {
    let prompts: Vec<ChatPrompt> = set
        .items
        .iter()
        .map(|i| ChatPrompt {
            id: Some(i.id.clone()),
            system: opts.system.clone(),
            user: i.text.clone(),
        })
        .collect();
    let settings = GenSettings {
        max_new_tokens: opts.max_tokens,
        sampling: Sampling::greedy(),
        batch_size: opts.batch_size,
    };
    let mut out = match &opts.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| Error::io(p, e))?,
        )),
        None => None,
    };
    let out_path = opts.out.clone().unwrap_or_default();
    let total = prompts.len();
    sink.event(Event::Phase {
        name: "generate".into(),
        unit: "prompts".into(),
        total,
    });
    let mut counts = [0usize; 3];
    let t0 = std::time::Instant::now();
    let (_, stats) = generate_chat(model, &prompts, &settings, opts.plan.clone(), |_, c| {
        let l = generation_label(&c.text, true);
        counts[l.label as usize] += 1;
        if let Some(f) = out.as_mut() {
            let row = serde_json::json!({"id": c.id, "prompt": c.user, "output": c.text, "label": l.label, "labeler": RATES_LABELER, "rule": l});
            writeln!(f, "{row}")
                .and_then(|_| f.flush())
                .map_err(|e| Error::io(&out_path, e))?;
        }
        sink.event(Event::Row {
            key: c.id.clone().unwrap_or_default(),
            outcome: l.label.name().into(),
        });
        sink.event(Event::Progress {
            done: counts.iter().sum(),
            total,
        });
        Ok(())
    })?;
    sink.event(Event::PhaseEnd {
        name: "generate".into(),
    });
    Ok(RateReport {
        prompt_set: set.name.clone(),
        n: total,
        refusal: counts[0],
        bypass: counts[1],
        degenerate: counts[2],
        seconds: t0.elapsed().as_secs_f64(),
        decode_tok_s: stats.decode_tokens as f64 / stats.decode_secs.max(1e-9),
    })
}
