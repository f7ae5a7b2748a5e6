//! `pgate label`: label outputs with a measured labeler, train the probe, measure labelers on the
//! development set. Parsing and printing only; the operations live in `persona_gate::label`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use persona_gate::directions::DirectionSet;
use persona_gate::label::devset;
use persona_gate::label::features::ReadOptions;
use persona_gate::label::jsonl;
use persona_gate::label::ops::{self, LabelerChoice};
use persona_gate::label::probe::{self, ProbeTrainOptions};
use persona_gate::label::{LabelInput, LabelVerdict, LabelerId};
use persona_gate::model::Model;

use crate::ModelArgs;

/// Label outputs (rows with `prompt` and `output`) as refusal / bypass / degenerate.
///
/// Example: pgate label q15 --in outputs.jsonl -o labeled.jsonl
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LabelCmd {
    #[command(subcommand)]
    pub sub: Option<LabelSub>,
    #[command(flatten)]
    pub run: Option<LabelArgs>,
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
pub struct LabelArgs {
    /// Reader model for the probe and ensemble labelers (not needed for --labeler rules).
    pub model: Option<String>,
    /// JSONL rows with "prompt" and "output" (optional "system", "id"; other fields are kept).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Where the labeled rows go (JSONL).
    #[arg(short, long)]
    pub out: PathBuf,
    /// rules (v2, default: the best measured on the held-back split), rules-v1, probe, ensemble,
    /// or judge (needs --judge-url and --judge-model).
    #[arg(long, default_value = "rules")]
    pub labeler: String,
    /// Probe file (default: the built-in probe for the reader model).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// Also record every other labeler's verdict under "verdicts".
    #[arg(long)]
    pub all: bool,
    /// OpenAI-compatible base URL of an LLM judge (--labeler judge).
    #[arg(long)]
    pub judge_url: Option<String>,
    /// Model name at the judge endpoint.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// strongreject (rubric score) or guard (Llama-Guard-style unsafe verdict).
    #[arg(long, default_value = "strongreject")]
    pub judge_mode: String,
    /// Attempts per row before a judge call counts as failed (the row keeps its rules label).
    #[arg(long, default_value_t = 3)]
    pub judge_attempts: u32,
    #[arg(long, default_value = "q")]
    pub dtype: String,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long, default_value = "data/labels/devset.jsonl")]
    pub devset: PathBuf,
    #[arg(short, long)]
    pub out: PathBuf,
    /// Refusal direction file (per-layer vectors): adds its projection as a probe feature.
    #[arg(long)]
    pub refusal: Option<PathBuf>,
    /// Output tokens the probe reads.
    #[arg(long, default_value_t = 128)]
    pub max_output_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Measure every labeler on this split with the probe just trained (same read).
    #[arg(long, default_value = "held")]
    pub eval_split: String,
    /// Also count how ensemble labels move when the split's full answers are cut to these lengths.
    #[arg(long, value_delimiter = ',', default_value = "24,64,128,256")]
    pub lengths: Vec<usize>,
    /// Write the measurements (JSON) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// A fast probe: refusal head at 15-30% depth, degenerate head on text measures only, so
    /// labeling reads no losses and stops the forward at the refusal layer.
    #[arg(long)]
    pub fast: bool,
    /// Write the measured accuracies in the format of data/labels/accuracy.json here (what
    /// receipts quote and `pgate check --min-labeler-accuracy` reads).
    #[arg(long)]
    pub accuracy: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long, default_value = "data/labels/devset.jsonl")]
    pub devset: PathBuf,
    /// Probe file (default: the built-in probe for the reader model).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// held (default: never tuned on), tune, or all.
    #[arg(long, default_value = "held")]
    pub split: String,
    /// Write the measurements as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

#[derive(clap::Args)]
pub struct LengthsArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long, default_value = "data/labels/devset.jsonl")]
    pub devset: PathBuf,
    #[arg(long)]
    pub probe: Option<PathBuf>,
    #[arg(long, default_value = "24,64,128,256", value_delimiter = ',')]
    pub lengths: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

pub fn run(cmd: LabelCmd) -> Result<()> {
    match (cmd.sub, cmd.run) {
        (Some(LabelSub::Train(a)), _) => train(a),
        (Some(LabelSub::Eval(a)), _) => eval(a),
        (Some(LabelSub::Lengths(a)), _) => lengths(a),
        (Some(LabelSub::Cut(a)), _) => cut(a),
        (None, Some(a)) => label(a),
        (None, None) => {
            anyhow::bail!("pgate label needs --in and -o (or a subcommand: train, eval, lengths)")
        }
    }
}

fn bar(what: &'static str) -> impl FnMut(usize, usize) {
    move |d, n| {
        eprint!("\r[pgate] {what}: {d}/{n}");
        if d == n {
            eprintln!();
        }
    }
}

fn label(a: LabelArgs) -> Result<()> {
    let choice = if a.labeler == "judge" {
        LabelerChoice::Judge(Box::new(judge_config(&a)?))
    } else {
        LabelerChoice::parse(&a.labeler, a.probe.clone())?
    };
    let rows = jsonl::read(&a.input)?;
    let model = load_reader(&a, choice.needs_model() || a.all)?;
    let t = std::time::Instant::now();
    let mut chosen = ops::make_labeler(&choice, model.as_ref(), a.batch_size, true)?;
    let id = chosen.id();
    let verdicts = chosen.label_batch(&rows.inputs, &mut bar("labeling"))?;
    let others = if a.all {
        other_verdicts(&a, model.as_ref(), &rows.inputs)?
    } else {
        Vec::new()
    };
    let objects: Vec<_> = rows
        .objects
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let extra: Vec<(LabelerId, LabelVerdict)> = others
                .iter()
                .map(|(lid, vs)| (lid.clone(), vs[i].clone()))
                .collect();
            jsonl::labeled(o, (&id, &verdicts[i]), &extra)
        })
        .collect();
    jsonl::write(&a.out, &objects)?;
    let count = |l| verdicts.iter().filter(|v| v.label == l).count();
    use persona_gate::label::Label;
    println!(
        "{} rows labeled by {id} in {:.1} s: {} refusal, {} bypass, {} degenerate -> {}",
        verdicts.len(),
        t.elapsed().as_secs_f64(),
        count(Label::Refusal),
        count(Label::Bypass),
        count(Label::Degenerate),
        a.out.display()
    );
    Ok(())
}

fn other_verdicts(
    a: &LabelArgs,
    model: Option<&Model>,
    inputs: &[LabelInput],
) -> Result<Vec<(LabelerId, Vec<LabelVerdict>)>> {
    let mut out = Vec::new();
    for name in ["rules-v1", "rules", "probe"] {
        let c = LabelerChoice::parse(name, a.probe.clone())?;
        let mut l = ops::make_labeler(&c, model, a.batch_size, true)?;
        let v = l.label_batch(inputs, &mut |_, _| {})?;
        out.push((l.id(), v));
    }
    Ok(out)
}

fn load_reader(a: &LabelArgs, needed: bool) -> Result<Option<Model>> {
    match (&a.model, needed) {
        (Some(m), true) => Ok(Some(
            ModelArgs {
                dtype: a.dtype.clone(),
                ..ModelArgs::named(m.clone())
            }
            .load()?,
        )),
        (None, true) => anyhow::bail!(
            "--labeler {} reads with a model: give MODEL (e.g. pgate label q15 --in ...)",
            a.labeler
        ),
        (_, false) => Ok(None),
    }
}

fn judge_config(a: &LabelArgs) -> Result<persona_gate::eval::judge::JudgeConfig> {
    use persona_gate::eval::judge::{JudgeConfig, JudgeKind, JudgeMode};
    let (Some(url), Some(model)) = (&a.judge_url, &a.judge_model) else {
        anyhow::bail!("--labeler judge needs --judge-url and --judge-model");
    };
    let mode = match a.judge_mode.as_str() {
        "strongreject" => JudgeMode::StrongReject,
        "guard" => JudgeMode::Guard,
        m => anyhow::bail!("unknown --judge-mode '{m}' (strongreject or guard)"),
    };
    let cfg = JudgeConfig {
        name: Some(format!("judge-{}", mode.name())),
        kind: JudgeKind::Http,
        mode: Some(mode),
        base_url: Some(url.clone()),
        model: Some(model.clone()),
        max_attempts: a.judge_attempts,
        ..Default::default()
    };
    cfg.check()?;
    Ok(cfg)
}

fn train(a: TrainArgs) -> Result<()> {
    let rows = devset::load(&a.devset)?;
    let model = a.m.load()?;
    let refusal_direction = match &a.refusal {
        None => None,
        Some(p) => {
            let set = DirectionSet::load(p)
                .with_context(|| format!("refusal direction {}", p.display()))?;
            Some(
                (0..set.n_layers())
                    .map(|l| set.layer(l).map(<[f32]>::to_vec))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        }
    };
    let n_layers = model.config().n_layers;
    let layer_sets = if a.fast {
        probe::fast_layer_sets(n_layers)
    } else {
        Vec::new()
    };
    let max_layer = layer_sets.iter().flatten().copied().max();
    let opts = ProbeTrainOptions {
        layer_sets,
        refusal_direction,
        read: ReadOptions {
            max_output_tokens: a.max_output_tokens,
            batch_size: a.batch_size,
            losses: !a.fast,
            max_layer: if a.fast { max_layer } else { None },
        },
        folds: 5,
        train: Default::default(),
        text_only_degenerate: a.fast,
    };
    let mut last = String::new();
    let (p, r) = ops::train_and_measure(
        &model,
        &rows,
        &opts,
        &a.eval_split,
        &a.lengths,
        &mut |what, d, n| {
            if what != last {
                last = what.to_string();
            }
            eprint!("\r[pgate] {what}: {d}/{n}   ");
            if d == n {
                eprintln!();
            }
        },
    )?;
    p.save(&a.out)?;
    println!(
        "probe trained on {} tune rows ({} refusal, {} bypass, {} degenerate): refusal head layers {:?} (cv accuracy {:.3}), degenerate head cv F1 {:.3} -> {}",
        p.trained_on.n_rows,
        p.trained_on.n_refusal,
        p.trained_on.n_bypass,
        p.trained_on.n_degenerate,
        p.refusal.layers,
        p.refusal.cv_accuracy,
        p.degenerate.cv_f1,
        a.out.display()
    );
    println!(
        "read {} rows ({} tokens) in {:.1} s: {:.1} tok/s\n",
        r.rows_read,
        r.tokens_read,
        r.read_seconds,
        r.tokens_read as f64 / r.read_seconds.max(1e-9)
    );
    for e in &r.evaluation.evaluations {
        println!("{}", e.to_markdown());
    }
    if !r.lengths.is_empty() {
        println!("| tokens | ensemble labels differing from the careful label of the full answer | differing from the full-length ensemble label |\n|---:|---:|---:|");
        for l in &r.lengths {
            println!(
                "| {} | {} / {} | {} / {} |",
                l.tokens, l.differ_from_full_careful, l.n, l.differ_from_longest, l.n
            );
        }
    }
    if let Some(f) = &a.report {
        std::fs::write(f, serde_json::to_string_pretty(&r)?)
            .with_context(|| f.display().to_string())?;
    }
    if let Some(f) = &a.accuracy {
        let devset_sha256 = persona_gate::hash::sha256_file(&a.devset)?;
        let list = ops::accuracy_entries(&r.evaluation, &devset_sha256);
        std::fs::write(f, serde_json::to_string_pretty(&list)? + "\n")
            .with_context(|| f.display().to_string())?;
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let rows = devset::load(&a.devset)?;
    let model = a.m.load()?;
    let p = ops::resolve_probe(&model, a.probe.as_deref())?;
    let r = ops::evaluate_devset(
        &model,
        &rows,
        &p,
        &a.split,
        a.batch_size,
        &mut bar("reading"),
    )?;
    for e in &r.evaluations {
        println!("{}", e.to_markdown());
    }
    println!(
        "probe read {} rows in {:.1} s (probe sha256 {})",
        r.evaluations[0].n, r.read_seconds, r.probe_sha256
    );
    if let Some(j) = &a.json {
        std::fs::write(j, serde_json::to_string_pretty(&r)?)
            .with_context(|| j.display().to_string())?;
    }
    Ok(())
}

fn lengths(a: LengthsArgs) -> Result<()> {
    let rows = devset::load(&a.devset)?;
    let model = a.m.load()?;
    let p = ops::resolve_probe(&model, a.probe.as_deref())?;
    let out = ops::length_study(
        &model,
        &rows,
        &p,
        &a.lengths,
        a.batch_size,
        &mut bar("reading"),
    )?;
    println!("| tokens | labels differing from the careful label of the full answer | differing from the longest cut |\n|---:|---:|---:|");
    for r in out {
        println!(
            "| {} | {} / {} | {} / {} |",
            r.tokens, r.differ_from_full_careful, r.n, r.differ_from_longest, r.n
        );
    }
    Ok(())
}

fn cut(a: CutArgs) -> Result<()> {
    let rows = jsonl::read(&a.input)?;
    let model = a.m.load()?;
    let mut out = Vec::with_capacity(rows.objects.len());
    for (mut o, r) in rows.objects.into_iter().zip(&rows.inputs) {
        let text = ops::cut_tokens(&model, &r.output, a.tokens)?;
        o.insert("output".into(), serde_json::Value::String(text));
        o.insert("max_tokens".into(), a.tokens.into());
        if let Some(id) = &r.id {
            o.insert("id".into(), format!("{id}@{}", a.tokens).into());
        }
        out.push(o);
    }
    jsonl::write(&a.out, &out)?;
    println!(
        "{} rows cut to {} tokens -> {}",
        out.len(),
        a.tokens,
        a.out.display()
    );
    Ok(())
}
