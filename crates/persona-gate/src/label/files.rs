//! Labeling operations over files, as `pgate label` runs them: label a JSONL file, train and
//! measure the probe on the development set and write what it found, cut rows to N tokens. Each
//! returns a typed result that prints itself; progress goes to an event sink.
//!
//! Why beside [`super::ops`]: `ops` works on rows in memory (what studies and the server reuse);
//! this module adds the files, the reports and the tables around those operations, so that a
//! caller other than the command gets the same outputs.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::devset::{self, DevRow};
use super::features::ReadOptions;
use super::jsonl;
use super::ops::{self, DevReport, LabelerChoice, LengthRow, TrainReport};
use super::probe::{self, ProbeFile, ProbeTrainOptions};
use super::{Label, LabelVerdict, LabelerId};
use crate::directions::DirectionSet;
use crate::eval::judge::{JudgeConfig, JudgeKind, JudgeMode};
use crate::events::{Event, EventSink};
use crate::model::Model;
use crate::{Error, Result};

/// Progress of a labeler, as events: a phase named `what` whose total is learnt from the first
/// report.
fn phase_progress<'a>(what: &'a str, sink: &'a mut dyn EventSink) -> impl FnMut(usize, usize) + 'a {
    let mut started = false;
    move |done, total| {
        if !started {
            started = true;
            sink.event(Event::Phase {
                name: what.into(),
                unit: "rows".into(),
                total,
            });
        }
        sink.event(Event::Progress { done, total });
        if done == total {
            sink.event(Event::PhaseEnd { name: what.into() });
            started = false;
        }
    }
}

impl LabelerChoice {
    /// An OpenAI-compatible LLM judge at `base_url` serving `model`, asked in `mode`
    /// (`strongreject`: rubric score, `guard`: Llama-Guard-style verdict), `attempts` tries a row.
    pub fn http_judge(base_url: &str, model: &str, mode: &str, attempts: u32) -> Result<Self> {
        let mode = match mode {
            "strongreject" => JudgeMode::StrongReject,
            "guard" => JudgeMode::Guard,
            m => {
                return Err(Error::InvalidValue(format!(
                    "unknown judge mode '{m}' (strongreject or guard)"
                )))
            }
        };
        let cfg = JudgeConfig {
            name: Some(format!("judge-{}", mode.name())),
            kind: JudgeKind::Http,
            mode: Some(mode),
            base_url: Some(base_url.into()),
            model: Some(model.into()),
            max_attempts: attempts,
            ..Default::default()
        };
        cfg.check()?;
        Ok(LabelerChoice::Judge(Box::new(cfg)))
    }
}

/// The flags of `pgate label` besides the reader model: what to label, with which labeler, where
/// the rows go. The judge's URL and model are checked by the caller (their error names the flags).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct LabelFlags {
    /// JSONL rows with "prompt" and "output" (optional "system", "id"; other fields are kept).
    #[cfg_attr(feature = "cli", arg(long = "in"))]
    pub input: PathBuf,
    /// Where the labeled rows go (JSONL).
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
    /// rules (v2, default: the best measured on the held-back split), rules-v1, probe, ensemble,
    /// or judge (needs --judge-url and --judge-model).
    #[cfg_attr(feature = "cli", arg(long, default_value = "rules"))]
    pub labeler: String,
    /// Probe file (default: the built-in probe for the reader model).
    #[cfg_attr(feature = "cli", arg(long))]
    pub probe: Option<PathBuf>,
    /// Also record every other labeler's verdict under "verdicts".
    #[cfg_attr(feature = "cli", arg(long))]
    pub all: bool,
    /// OpenAI-compatible base URL of an LLM judge (--labeler judge).
    #[cfg_attr(feature = "cli", arg(long))]
    pub judge_url: Option<String>,
    /// Model name at the judge endpoint.
    #[cfg_attr(feature = "cli", arg(long))]
    pub judge_model: Option<String>,
    /// strongreject (rubric score) or guard (Llama-Guard-style unsafe verdict).
    #[cfg_attr(feature = "cli", arg(long, default_value = "strongreject"))]
    pub judge_mode: String,
    /// Attempts per row before a judge call counts as failed (the row keeps its rules label).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub judge_attempts: u32,
    #[cfg_attr(feature = "cli", arg(long, default_value = "q"))]
    pub dtype: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
}

impl LabelFlags {
    /// The job: rows read, labeler chosen (`judge` with the URL and model given).
    pub fn prepare(&self) -> Result<LabelJob> {
        let choice = match (self.labeler.as_str(), &self.judge_url, &self.judge_model) {
            ("judge", Some(url), Some(model)) => {
                LabelerChoice::http_judge(url, model, &self.judge_mode, self.judge_attempts)?
            }
            _ => LabelerChoice::parse(&self.labeler, self.probe.clone())?,
        };
        LabelJob::prepare(
            &self.input,
            choice,
            self.all,
            self.probe.clone(),
            self.batch_size,
        )
    }
}

/// One labeling of a JSONL file: rows read and labeler chosen up front (so a bad file or name
/// fails before a reader model loads), run with [`LabelJob::run`].
pub struct LabelJob {
    rows: jsonl::Rows,
    choice: LabelerChoice,
    /// Also record every other labeler's verdict under `verdicts`.
    all: bool,
    probe: Option<PathBuf>,
    batch_size: usize,
}

/// What a labeling wrote.
#[derive(Debug, Clone, Serialize)]
pub struct LabelRun {
    pub labeler: LabelerId,
    pub rows: usize,
    pub refusal: usize,
    pub bypass: usize,
    pub degenerate: usize,
    pub seconds: f64,
    pub out: PathBuf,
}

impl LabelRun {
    pub fn summary(&self) -> String {
        format!(
            "{} rows labeled by {} in {:.1} s: {} refusal, {} bypass, {} degenerate -> {}",
            self.rows,
            self.labeler,
            self.seconds,
            self.refusal,
            self.bypass,
            self.degenerate,
            self.out.display()
        )
    }
}

impl LabelJob {
    /// Read the rows of `input` (`prompt` and `output`, other fields kept).
    pub fn prepare(
        input: &Path,
        choice: LabelerChoice,
        all: bool,
        probe: Option<PathBuf>,
        batch_size: usize,
    ) -> Result<Self> {
        Ok(LabelJob {
            rows: jsonl::read(input)?,
            choice,
            all,
            probe,
            batch_size,
        })
    }

    /// Whether [`LabelJob::run`] needs a reader model.
    pub fn needs_model(&self) -> bool {
        self.choice.needs_model() || self.all
    }

    /// Label every row and write them to `out` (JSONL, written whole or not at all).
    pub fn run(
        self,
        model: Option<&Model>,
        out: &Path,
        sink: &mut dyn EventSink,
    ) -> Result<LabelRun> {
        let t = std::time::Instant::now();
        let mut chosen = ops::make_labeler(&self.choice, model, self.batch_size, true)?;
        let id = chosen.id();
        let inputs = &self.rows.inputs;
        let verdicts = chosen.label_batch(inputs, &mut phase_progress("labeling", sink))?;
        let mut others: Vec<(LabelerId, Vec<LabelVerdict>)> = Vec::new();
        if self.all {
            for name in ["rules-v1", "rules", "probe"] {
                let c = LabelerChoice::parse(name, self.probe.clone())?;
                let mut l = ops::make_labeler(&c, model, self.batch_size, true)?;
                let v = l.label_batch(inputs, &mut |_, _| {})?;
                others.push((l.id(), v));
            }
        }
        let objects: Vec<_> = self
            .rows
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
        jsonl::write(out, &objects)?;
        let count = |l| verdicts.iter().filter(|v| v.label == l).count();
        Ok(LabelRun {
            labeler: id,
            rows: verdicts.len(),
            refusal: count(Label::Refusal),
            bypass: count(Label::Bypass),
            degenerate: count(Label::Degenerate),
            seconds: t.elapsed().as_secs_f64(),
            out: out.to_path_buf(),
        })
    }
}

/// How to train the probe and where it and its measurements go (`pgate label train`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TrainJob {
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
    #[cfg_attr(feature = "cli", arg(long, default_value = "data/labels/devset.jsonl"))]
    pub devset: PathBuf,
    /// Refusal direction file (per-layer vectors): adds its projection as a probe feature.
    #[cfg_attr(feature = "cli", arg(long))]
    pub refusal: Option<PathBuf>,
    /// Output tokens the probe reads.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 128))]
    pub max_output_tokens: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Measure every labeler on this split with the probe just trained (same read).
    #[cfg_attr(feature = "cli", arg(long, default_value = "held"))]
    pub eval_split: String,
    /// Also count how ensemble labels move when the split's full answers are cut to these lengths.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_delimiter = ',', default_value = "24,64,128,256")
    )]
    pub lengths: Vec<usize>,
    /// A fast probe: refusal head at 15-30% depth, degenerate head on text measures only, so
    /// labeling reads no losses and stops the forward at the refusal layer.
    #[cfg_attr(feature = "cli", arg(long))]
    pub fast: bool,
    /// Write the measurements (JSON) here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub report: Option<PathBuf>,
    /// Write the measured accuracies in the format of data/labels/accuracy.json here (what
    /// receipts quote and `pgate check --min-labeler-accuracy` reads).
    #[cfg_attr(feature = "cli", arg(long))]
    pub accuracy: Option<PathBuf>,
}

/// A trained probe and its measurements.
#[derive(Debug, Clone)]
pub struct TrainRun {
    pub probe: ProbeFile,
    pub report: TrainReport,
    /// sha256 of the development set file (what accuracy entries cite).
    pub devset_sha256: String,
}

impl TrainJob {
    fn options(&self, model: &Model) -> Result<ProbeTrainOptions> {
        let refusal_direction = match &self.refusal {
            None => None,
            Some(p) => {
                let set = DirectionSet::load(p).map_err(|e| {
                    Error::InvalidValue(format!("refusal direction {}: {e}", p.display()))
                })?;
                Some(
                    (0..set.n_layers())
                        .map(|l| set.layer(l).map(<[f32]>::to_vec))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let layer_sets = if self.fast {
            probe::fast_layer_sets(model.config().n_layers)
        } else {
            Vec::new()
        };
        let max_layer = layer_sets.iter().flatten().copied().max();
        Ok(ProbeTrainOptions {
            layer_sets,
            refusal_direction,
            read: ReadOptions {
                max_output_tokens: self.max_output_tokens,
                batch_size: self.batch_size,
                losses: !self.fast,
                max_layer: if self.fast { max_layer } else { None },
            },
            folds: 5,
            train: Default::default(),
            text_only_degenerate: self.fast,
        })
    }

    /// Read the development set once, train the probe on its tune split, measure every labeler on
    /// the evaluation split and run the length study (progress by phase: `reading`, `lengths`).
    pub fn run(&self, model: &Model, sink: &mut dyn EventSink) -> Result<TrainRun> {
        let rows = devset::load(&self.devset)?;
        let opts = self.options(model)?;
        let mut phase = String::new();
        let mut total = 0;
        let (probe, report) = ops::train_and_measure(
            model,
            &rows,
            &opts,
            &self.eval_split,
            &self.lengths,
            &mut |what, done, n| {
                if what != phase || n != total {
                    phase = what.to_string();
                    total = n;
                    sink.event(Event::Phase {
                        name: what.into(),
                        unit: "rows".into(),
                        total: n,
                    });
                }
                sink.event(Event::Progress { done, total: n });
            },
        )?;
        sink.event(Event::PhaseEnd { name: phase });
        Ok(TrainRun {
            probe,
            report,
            devset_sha256: crate::hash::sha256_file(&self.devset)?,
        })
    }

    /// Write the measurements to `--report` and the accuracies to `--accuracy` (those given).
    pub fn write_reports(&self, run: &TrainRun) -> Result<()> {
        if let Some(f) = &self.report {
            std::fs::write(f, serde_json::to_string_pretty(&run.report)?)
                .map_err(|e| Error::io(format!("writing {}", f.display()), e))?;
        }
        if let Some(f) = &self.accuracy {
            let text = serde_json::to_string_pretty(&run.accuracy_entries())? + "\n";
            std::fs::write(f, text).map_err(|e| Error::io(f, e))?;
        }
        Ok(())
    }
}

impl TrainRun {
    /// What the probe was trained on and its cross-validated quality, the read's cost, every
    /// labeler's table and the length study.
    pub fn summary(&self, out: &Path) -> String {
        let (p, r) = (&self.probe, &self.report);
        let mut s = format!(
            "probe trained on {} tune rows ({} refusal, {} bypass, {} degenerate): refusal head layers {:?} (cv accuracy {:.3}), degenerate head cv F1 {:.3} -> {}\n",
            p.trained_on.n_rows,
            p.trained_on.n_refusal,
            p.trained_on.n_bypass,
            p.trained_on.n_degenerate,
            p.refusal.layers,
            p.refusal.cv_accuracy,
            p.degenerate.cv_f1,
            out.display()
        );
        s += &format!(
            "read {} rows ({} tokens) in {:.1} s: {:.1} tok/s\n\n",
            r.rows_read,
            r.tokens_read,
            r.read_seconds,
            r.tokens_read as f64 / r.read_seconds.max(1e-9)
        );
        for e in &r.evaluation.evaluations {
            s += &format!("{}\n", e.to_markdown());
        }
        if !r.lengths.is_empty() {
            s += &length_table(
                &r.lengths,
                "ensemble labels differing from the careful label of the full answer",
                "differing from the full-length ensemble label",
            );
        }
        s
    }

    /// The measured accuracies in the format of `data/labels/accuracy.json` (what receipts quote
    /// and `pgate check --min-labeler-accuracy` reads).
    pub fn accuracy_entries(&self) -> Vec<super::accuracy::LabelerAccuracy> {
        ops::accuracy_entries(&self.report.evaluation, &self.devset_sha256)
    }
}

/// The length study as a Markdown table.
pub fn length_table(rows: &[LengthRow], careful: &str, longest: &str) -> String {
    let mut s = format!("| tokens | {careful} | {longest} |\n|---:|---:|---:|\n");
    for l in rows {
        s += &format!(
            "| {} | {} / {} | {} / {} |\n",
            l.tokens, l.differ_from_full_careful, l.n, l.differ_from_longest, l.n
        );
    }
    s
}

/// Measure every labeler on `split` of the development set at `devset` (`pgate label eval`).
/// `pgate label eval`: every labeler measured on a split of the development set.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct DevsetEval {
    #[cfg_attr(feature = "cli", arg(long, default_value = "data/labels/devset.jsonl"))]
    pub devset: PathBuf,
    /// Probe file (default: the built-in probe for the reader model).
    #[cfg_attr(feature = "cli", arg(long))]
    pub probe: Option<PathBuf>,
    /// held (default: never tuned on), tune, or all.
    #[cfg_attr(feature = "cli", arg(long, default_value = "held"))]
    pub split: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Write the measurements as JSON here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: Option<PathBuf>,
}

impl DevsetEval {
    /// [`evaluate_devset_file`] with these settings.
    pub fn run(&self, model: &Model, sink: &mut dyn EventSink) -> Result<DevReport> {
        let probe = self.probe.as_deref();
        evaluate_devset_file(
            model,
            &self.devset,
            probe,
            &self.split,
            self.batch_size,
            sink,
        )
    }
}

/// `pgate label lengths`: how many ensemble labels change when the answers are cut shorter.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct LengthStudy {
    #[cfg_attr(feature = "cli", arg(long, default_value = "data/labels/devset.jsonl"))]
    pub devset: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub probe: Option<PathBuf>,
    #[cfg_attr(
        feature = "cli",
        arg(long, default_value = "24,64,128,256", value_delimiter = ',')
    )]
    pub lengths: Vec<usize>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
}

impl LengthStudy {
    /// [`length_study_file`], as the table `pgate label lengths` prints.
    pub fn run(&self, model: &Model, sink: &mut dyn EventSink) -> Result<String> {
        let probe = self.probe.as_deref();
        let rows = length_study_file(
            model,
            &self.devset,
            probe,
            &self.lengths,
            self.batch_size,
            sink,
        )?;
        let careful = "labels differing from the careful label of the full answer";
        Ok(length_table(
            &rows,
            careful,
            "differing from the longest cut",
        ))
    }
}

pub fn evaluate_devset_file(
    model: &Model,
    devset: &Path,
    probe: Option<&Path>,
    split: &str,
    batch_size: usize,
    sink: &mut dyn EventSink,
) -> Result<DevReport> {
    let rows: Vec<DevRow> = devset::load(devset)?;
    let p = ops::resolve_probe(model, probe)?;
    ops::evaluate_devset(
        model,
        &rows,
        &p,
        split,
        batch_size,
        &mut phase_progress("reading", sink),
    )
}

impl DevReport {
    /// Every labeler's table, then the probe's read time.
    pub fn summary(&self) -> String {
        let mut s: String = self
            .evaluations
            .iter()
            .map(|e| format!("{}\n", e.to_markdown()))
            .collect();
        s += &format!(
            "probe read {} rows in {:.1} s (probe sha256 {})",
            self.evaluations.first().map_or(0, |e| e.n),
            self.read_seconds,
            self.probe_sha256
        );
        s
    }
}

/// The length study on the development set at `devset` (`pgate label lengths`).
pub fn length_study_file(
    model: &Model,
    devset: &Path,
    probe: Option<&Path>,
    lengths: &[usize],
    batch_size: usize,
    sink: &mut dyn EventSink,
) -> Result<Vec<LengthRow>> {
    let rows = devset::load(devset)?;
    let p = ops::resolve_probe(model, probe)?;
    ops::length_study(
        model,
        &rows,
        &p,
        lengths,
        batch_size,
        &mut phase_progress("reading", sink),
    )
}

/// `pgate label cut`: which rows, how many tokens, where the cut rows go.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CutJob {
    #[cfg_attr(feature = "cli", arg(long = "in"))]
    pub input: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub tokens: usize,
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
}

impl CutJob {
    /// [`cut_file`], and the line saying what it wrote.
    pub fn run(&self, model: &Model) -> Result<String> {
        let n = cut_file(model, &self.input, self.tokens, &self.out)?;
        Ok(format!(
            "{n} rows cut to {} tokens -> {}",
            self.tokens,
            self.out.display()
        ))
    }
}

/// Cut each row of `input` to its first `tokens` tokens and write them to `out`: `output` cut,
/// `max_tokens` set, `id` suffixed with `@N`. Returns the number of rows.
pub fn cut_file(model: &Model, input: &Path, tokens: usize, out: &Path) -> Result<usize> {
    let rows = jsonl::read(input)?;
    let mut cut = Vec::with_capacity(rows.objects.len());
    for (mut o, r) in rows.objects.into_iter().zip(&rows.inputs) {
        let text = ops::cut_tokens(model, &r.output, tokens)?;
        o.insert("output".into(), serde_json::Value::String(text));
        o.insert("max_tokens".into(), tokens.into());
        if let Some(id) = &r.id {
            o.insert("id".into(), format!("{id}@{tokens}").into());
        }
        cut.push(o);
    }
    jsonl::write(out, &cut)?;
    Ok(cut.len())
}
