//! `pgate guard eval`: the input guard's flag rates under one preset, measured offline.
//!
//! The default persona first answers the harmful prompts (greedy, labeled by rules v2), so "the
//! default persona refuses" means what the model did, not the guard's estimate; then every harmful
//! and harmless prompt is scored the way the server scores a request under the preset (last-token
//! residuals under the default persona and under the preset). Optionally the preset answers the
//! harmful prompts too, showing that it complies where the default refuses.

use std::path::{Path, PathBuf};

use persona_gate::eval::{wilson, Label, Rate};
use persona_gate::events::{Event, EventSink};
use persona_gate::generate::{generate_chat, ChatPrompt, GenSettings, Sampling};
use persona_gate::label::rules::generation_label;
use persona_gate::model::Model;
use persona_gate::{Error, Result};
use serde::Serialize;

use crate::guard::{capture_last, encode_default, GuardCalibration, GuardReport, NamedPrompts};
use crate::ops::PromptSlice;
use crate::presets::{build_presets, DirectionRegistry, GuardMode, Preset, PresetFile};

/// What `pgate guard eval` is told besides the model (its flags).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct GuardEvalJob {
    #[cfg_attr(feature = "cli", arg(long))]
    pub guard_file: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub presets: PathBuf,
    /// Preset to score under.
    #[cfg_attr(feature = "cli", arg(long))]
    pub preset: String,
    /// Direction files or folders the presets name.
    #[cfg_attr(feature = "cli", arg(long, num_args = 1..))]
    pub directions: Vec<PathBuf>,
    #[cfg_attr(feature = "cli", arg(long, default_value = "strongreject"))]
    pub harmful: String,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub harmful_skip: usize,
    /// Harmful prompts (all when absent).
    #[cfg_attr(feature = "cli", arg(short = 'n', long))]
    pub n: Option<usize>,
    #[cfg_attr(feature = "cli", arg(long, default_value = "harmless_val"))]
    pub harmless: String,
    /// Skip harmless prompts used as held-out by calibration.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 100))]
    pub harmless_skip: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 100))]
    pub harmless_n: usize,
    /// New tokens of the default persona's answers (labelled refusal / bypass / degenerate).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 48))]
    pub max_tokens: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub batch_size: usize,
    /// Also generate under the preset and label those answers (shows the preset complies).
    #[cfg_attr(feature = "cli", arg(long))]
    pub generate_preset: bool,
    /// Write one JSON line per prompt (scores, flag, labels) here.
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<PathBuf>,
}

/// One harmful prompt: the default persona's answer and label, the preset's label, the scores.
#[derive(Debug, Clone, Serialize)]
pub struct HarmfulRow {
    pub prompt: String,
    pub default_label: Label,
    pub default_answer: String,
    pub preset_label: Option<Label>,
    pub guard: GuardReport,
}

/// The evaluation's result.
#[derive(Debug, Clone, Serialize)]
pub struct GuardEvalReport {
    pub model: String,
    pub preset: String,
    pub guard_file: PathBuf,
    pub refusal_layer: usize,
    pub threshold: f64,
    pub shift_threshold: f64,
    pub harmful_set: String,
    pub harmless_set: String,
    pub harmful: Vec<HarmfulRow>,
    /// Scores of the harmless prompts, with the prompt.
    pub harmless: Vec<(String, GuardReport)>,
    /// Whether the preset answered the harmful prompts too.
    pub preset_generated: bool,
}

/// [`GuardEvalJob`] with its files read, waiting for the model.
pub struct GuardEval {
    job: GuardEvalJob,
    guard: GuardCalibration,
    dirs: DirectionRegistry,
    file: PresetFile,
    harmful: NamedPrompts,
    harmless: NamedPrompts,
}

impl GuardEval {
    pub fn new(job: GuardEvalJob) -> Result<Self> {
        Ok(Self {
            guard: GuardCalibration::load(&job.guard_file)?,
            dirs: DirectionRegistry::from_paths(&job.directions)?,
            file: PresetFile::load(&job.presets)?,
            harmful: PromptSlice::new(&job.harmful, job.harmful_skip, job.n.unwrap_or(usize::MAX))
                .load()?,
            harmless: PromptSlice::new(&job.harmless, job.harmless_skip, job.harmless_n).load()?,
            job,
        })
    }

    /// Generate, label and score; progress as notes.
    pub fn run(self, model: &Model, sink: &mut dyn EventSink) -> Result<GuardEvalReport> {
        let (job, g) = (&self.job, &self.guard);
        g.check_model(model)?;
        let presets = build_presets(
            Some((&self.file, &job.presets)),
            &self.dirs,
            model,
            GuardMode::Monitor,
            GuardMode::Off,
        )?;
        let preset = presets.get(&job.preset).ok_or_else(|| {
            Error::InvalidValue(format!(
                "no preset '{}' in {} ({})",
                job.preset,
                job.presets.display(),
                presets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let (hname, harmful) = &self.harmful;
        let (lname, harmless) = &self.harmless;
        sink.event(Event::Note(format!(
            "default persona answers {} prompts of {hname}",
            harmful.len()
        )));
        let answers = self.answers(model, harmful, None)?;
        let preset_labels = if job.generate_preset {
            sink.event(Event::Note(format!("preset {} answers them", preset.name)));
            Some(self.answers(model, harmful, Some(preset))?)
        } else {
            None
        };
        let hr = self.score(model, preset, harmful, hname, sink)?;
        let lr = self.score(model, preset, harmless, lname, sink)?;
        let rows = harmful
            .iter()
            .zip(answers)
            .zip(hr)
            .enumerate()
            .map(|(i, ((prompt, (answer, label)), guard))| HarmfulRow {
                prompt: prompt.clone(),
                default_label: label,
                default_answer: answer,
                preset_label: preset_labels.as_ref().map(|l| l[i].1),
                guard,
            })
            .collect();
        Ok(GuardEvalReport {
            model: model.info.name.clone(),
            preset: preset.name.clone(),
            guard_file: job.guard_file.clone(),
            refusal_layer: g.refusal_layer,
            threshold: g.threshold,
            shift_threshold: g.shift_threshold,
            harmful_set: hname.clone(),
            harmless_set: lname.clone(),
            harmful: rows,
            harmless: harmless.iter().cloned().zip(lr).collect(),
            preset_generated: job.generate_preset,
        })
    }

    /// Greedy answers under the default persona (`None`) or a preset, with their rules label.
    fn answers(
        &self,
        model: &Model,
        texts: &[String],
        preset: Option<&Preset>,
    ) -> Result<Vec<(String, Label)>> {
        let settings = GenSettings {
            max_new_tokens: self.job.max_tokens,
            sampling: Sampling::greedy(),
            batch_size: self.job.batch_size,
        };
        let prompts: Vec<ChatPrompt> = texts
            .iter()
            .map(|t| ChatPrompt::new(t).with_system(preset.and_then(|p| p.spec.system.clone())))
            .collect();
        let plan = preset.and_then(|p| p.plan.clone());
        let (ans, _) = generate_chat(model, &prompts, &settings, plan, |_, _| Ok(()))?;
        Ok(ans
            .into_iter()
            .map(|c| {
                let l = generation_label(&c.text, true).label;
                (c.text, l)
            })
            .collect())
    }

    /// Guard scores of `texts` served under `preset`.
    fn score(
        &self,
        model: &Model,
        preset: &Preset,
        texts: &[String],
        what: &str,
        sink: &mut dyn EventSink,
    ) -> Result<Vec<GuardReport>> {
        sink.event(Event::Note(format!(
            "scoring {} prompts of {what} under preset {}",
            texts.len(),
            preset.name
        )));
        let (g, batch) = (&self.guard, self.job.batch_size);
        let layers = g.layers();
        let default_ids = encode_default(model, texts)?;
        let d = capture_last(model, &default_ids, None, &layers, batch, |_, _| {})?;
        let s = if preset.plan.is_none() && preset.spec.system.is_none() {
            None
        } else {
            let served_ids = texts
                .iter()
                .map(|t| {
                    model
                        .tokenizer
                        .encode_prompt(preset.spec.system.as_deref(), t)
                })
                .collect::<Result<Vec<_>>>()?;
            let plan = preset.plan.as_ref();
            Some(capture_last(
                model,
                &served_ids,
                plan,
                &layers,
                batch,
                |_, _| {},
            )?)
        };
        (0..texts.len())
            .map(|i| g.score(&d[i], s.as_ref().map(|s| s[i].as_slice())))
            .collect()
    }
}

/// [`GuardEval::new`] then [`GuardEval::run`] for a model already loaded.
pub fn evaluate_guard(
    job: GuardEvalJob,
    model: &Model,
    sink: &mut dyn EventSink,
) -> Result<GuardEvalReport> {
    GuardEval::new(job)?.run(model, sink)
}

impl GuardEvalReport {
    /// Indices of the harmful prompts the default persona refuses.
    fn refused(&self) -> Vec<usize> {
        (0..self.harmful.len())
            .filter(|&i| self.harmful[i].default_label == Label::Refusal)
            .collect()
    }

    /// Flagged share of the harmful prompts the default persona refuses (the true positives).
    pub fn flagged_refused(&self) -> Rate {
        let refused = self.refused();
        let k = refused
            .iter()
            .filter(|&&i| self.harmful[i].guard.flagged)
            .count();
        wilson(k, refused.len())
    }

    /// Flagged share of all harmful prompts.
    pub fn flagged_harmful(&self) -> Rate {
        let k = self.harmful.iter().filter(|r| r.guard.flagged).count();
        wilson(k, self.harmful.len())
    }

    /// Flagged share of the harmless prompts (the false positives).
    pub fn flagged_harmless(&self) -> Rate {
        let k = self.harmless.iter().filter(|(_, r)| r.flagged).count();
        wilson(k, self.harmless.len())
    }

    /// One JSON line per prompt (set, prompt, labels, answer, scores).
    pub fn write_rows(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let io = |e| Error::io(path, e);
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        for r in &self.harmful {
            let row = serde_json::json!({"set": self.harmful_set, "prompt": r.prompt,
                "default_label": r.default_label, "default_answer": r.default_answer,
                "preset_label": r.preset_label, "guard": r.guard});
            writeln!(f, "{row}").map_err(io)?;
        }
        for (t, g) in &self.harmless {
            let row = serde_json::json!({"set": self.harmless_set, "prompt": t, "guard": g});
            writeln!(f, "{row}").map_err(io)?;
        }
        f.flush().map_err(io)
    }

    /// The rates and mean scores as lines of text (what `pgate guard eval` prints).
    pub fn to_text(&self) -> String {
        let (hname, lname) = (&self.harmful_set, &self.harmless_set);
        let refused = self.refused();
        let mut o = format!(
            "model {}, preset {}, guard {} (refusal layer {}, threshold {:.3}, shift threshold {:.1})\n",
            self.model,
            self.preset,
            self.guard_file.display(),
            self.refusal_layer,
            self.threshold,
            self.shift_threshold
        );
        o += &format!(
            "default persona refuses {}/{} of {hname}  {}\n",
            refused.len(),
            self.harmful.len(),
            wilson(refused.len(), self.harmful.len())
        );
        if self.preset_generated {
            let bypass = |r: &HarmfulRow| r.preset_label == Some(Label::Bypass);
            let by = self.harmful.iter().filter(|r| bypass(r)).count();
            let rr = refused
                .iter()
                .filter(|&&i| bypass(&self.harmful[i]))
                .count();
            o += &format!(
                "preset {} complies (bypass) on {by}/{} of {hname}; on {rr}/{} of those the default persona refuses\n",
                self.preset,
                self.harmful.len(),
                refused.len()
            );
        }
        let (fr, fh, fl) = (
            self.flagged_refused(),
            self.flagged_harmful(),
            self.flagged_harmless(),
        );
        o += &format!(
            "flagged: {}/{} of {hname} the default persona refuses  {fr}\n",
            fr.k, fr.n
        );
        o += &format!("flagged: {}/{} of all {hname}  {fh}\n", fh.k, fh.n);
        o += &format!("flagged: {}/{} of {lname} (harmless)  {fl}\n", fl.k, fl.n);
        let hr: Vec<&GuardReport> = self.harmful.iter().map(|r| &r.guard).collect();
        let lr: Vec<&GuardReport> = self.harmless.iter().map(|(_, r)| r).collect();
        let mean = |v: &[&GuardReport], f: fn(&GuardReport) -> f64| {
            v.iter().map(|r| f(r)).sum::<f64>() / v.len().max(1) as f64
        };
        o += &format!(
            "mean refusal intent: {hname} {:.3}, {lname} {:.3}; under the preset: {:.3}, {:.3}; mean persona shift {:.1}, {:.1}\n",
            mean(&hr, |r| r.refusal_intent),
            mean(&lr, |r| r.refusal_intent),
            mean(&hr, |r| r.refusal_intent_preset),
            mean(&lr, |r| r.refusal_intent_preset),
            mean(&hr, |r| r.persona_shift),
            mean(&lr, |r| r.persona_shift),
        );
        o
    }
}
