//! Whole labeling operations (what `pgate label` and the Python package call): pick a labeler by
//! name, label rows, measure labelers on the development set, and count how labels move with the
//! answer's length.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::devset::{self, DevRow, Evaluation};
use super::ensemble::{combine, Ensemble, JudgeLabeler};
use super::features::{self, RowFeatures};
use super::probe::{probe_verdict, ProbeFile, ProbeLabeler};
use super::rules::{label_v2, RulesV1, RulesV2};
use super::{Label, LabelInput, LabelVerdict, Labeler};
use crate::eval::judge::JudgeConfig;
use crate::generate::{encode_chat, ChatPrompt};
use crate::model::Model;
use crate::{Error, Result};

/// Probes that ship with persona-gate, found by their reader model's sha256.
pub const BUILTIN_PROBES: &[(&str, &str)] = &[(
    "Qwen2.5-Coder-1.5B-Instruct",
    include_str!("../../../../data/labels/probes/q15.probe.json"),
)];

/// The built-in probe for a reader model, if one ships.
pub fn builtin_probe(model: &Model) -> Option<ProbeFile> {
    let sha = crate::directions::model_sha256(model, true)?;
    BUILTIN_PROBES.iter().find_map(|(_, text)| {
        let p: ProbeFile = serde_json::from_str(text).ok()?;
        (p.reader.sha256.as_deref() == Some(sha.as_str())).then_some(p)
    })
}

/// The probe to use: the file given, else the built-in one for this reader.
pub fn resolve_probe(model: &Model, file: Option<&Path>) -> Result<ProbeFile> {
    let p = match file {
        Some(f) => ProbeFile::load(f)?,
        None => builtin_probe(model).ok_or_else(|| {
            Error::InvalidValue(format!(
                "no built-in probe for reader model {}: train one with `pgate label train` and pass --probe",
                model.info.name
            ))
        })?,
    };
    p.check_reader(model)?;
    Ok(p)
}

/// Which labeler to build.
#[derive(Debug, Clone)]
pub enum LabelerChoice {
    RulesV1,
    Rules,
    Probe { file: Option<PathBuf> },
    Ensemble { file: Option<PathBuf> },
    Judge(Box<JudgeConfig>),
}

impl LabelerChoice {
    /// `rules-v1`, `rules`, `probe`, `ensemble` (probes from `probe` or built in); `judge` needs a
    /// judge config and is built by the caller.
    pub fn parse(name: &str, probe: Option<PathBuf>) -> Result<Self> {
        Ok(match name {
            "rules-v1" | "rules@1" => LabelerChoice::RulesV1,
            "rules" | "rules@2" | "rules-v2" => LabelerChoice::Rules,
            "probe" => LabelerChoice::Probe { file: probe },
            "ensemble" => LabelerChoice::Ensemble { file: probe },
            other => {
                return Err(Error::InvalidValue(format!(
                    "unknown labeler '{other}' (known: {})",
                    super::LABELER_NAMES.join(", ")
                )))
            }
        })
    }

    /// Whether the labeler reads with a model.
    pub fn needs_model(&self) -> bool {
        matches!(
            self,
            LabelerChoice::Probe { .. } | LabelerChoice::Ensemble { .. }
        )
    }
}

/// Build a labeler. Probe-based labelers need the reader `model`.
pub fn make_labeler<'m>(
    choice: &LabelerChoice,
    model: Option<&'m Model>,
    batch_size: usize,
    english: bool,
) -> Result<Box<dyn Labeler + 'm>> {
    let need = |m: Option<&'m Model>| {
        m.ok_or_else(|| Error::InvalidValue("this labeler reads with a model: give one".into()))
    };
    Ok(match choice {
        LabelerChoice::RulesV1 => Box::new(RulesV1 { english }),
        LabelerChoice::Rules => Box::new(RulesV2 { english }),
        LabelerChoice::Probe { file } => {
            let m = need(model)?;
            Box::new(ProbeLabeler::new(
                m,
                resolve_probe(m, file.as_deref())?,
                batch_size,
            )?)
        }
        LabelerChoice::Ensemble { file } => {
            let m = need(model)?;
            let probe = ProbeLabeler::new(m, resolve_probe(m, file.as_deref())?, batch_size)?;
            Box::new(Ensemble { probe, english })
        }
        LabelerChoice::Judge(cfg) => {
            let judge = crate::study::judging::make_judge(cfg, crate::device::Device::Cpu)?
                .ok_or_else(|| {
                    Error::InvalidValue(
                        "the rules judge is not an LLM judge: use --labeler rules".into(),
                    )
                })?;
            Box::new(JudgeLabeler { judge, english })
        }
    })
}

/// Each labeler's measurement on one split of the development set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevReport {
    pub split: String,
    pub evaluations: Vec<Evaluation>,
    /// Probe labeling time (one teacher-forced pass over every row), seconds.
    pub read_seconds: f64,
    pub probe_sha256: String,
}

/// Verdicts of rules v1, rules v2, probe and ensemble on rows whose features were read.
pub fn all_verdicts(
    probe: &ProbeFile,
    inputs: &[LabelInput],
    feats: &[RowFeatures],
) -> Result<Vec<(&'static str, Vec<LabelVerdict>)>> {
    let v1 = inputs
        .iter()
        .map(|r| {
            let l = crate::eval::label_output(&r.output, true);
            LabelVerdict::new(l.label, l.reason)
        })
        .collect();
    let v2: Vec<LabelVerdict> = inputs.iter().map(|r| label_v2(&r.output, true)).collect();
    let pv: Vec<LabelVerdict> = feats
        .iter()
        .zip(inputs)
        .map(|(f, r)| probe.score(f, &r.output).map(probe_verdict))
        .collect::<Result<_>>()?;
    let ens = inputs
        .iter()
        .zip(v2.iter().zip(&pv))
        .map(|(r, (a, b))| combine(&r.output, a.clone(), b.clone(), true))
        .collect();
    Ok(vec![
        ("rules@1", v1),
        ("rules@2", v2),
        ("probe@1", pv),
        ("ensemble@1", ens),
    ])
}

/// Measure every labeler on `split` of the development set with one read of its rows.
pub fn evaluate_devset(
    model: &Model,
    rows: &[DevRow],
    probe: &ProbeFile,
    split: &str,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DevReport> {
    let sel = devset::split(rows, split);
    if sel.is_empty() {
        return Err(Error::Empty(format!(
            "the development set has no rows in split '{split}'"
        )));
    }
    let inputs: Vec<LabelInput> = sel.iter().map(|r| r.input()).collect();
    let opts = probe.read_options(batch_size);
    let t = std::time::Instant::now();
    let feats = features::read(model, &inputs, &opts, progress)?;
    let read_seconds = t.elapsed().as_secs_f64();
    let mut evaluations = Vec::new();
    for (name, v) in all_verdicts(probe, &inputs, &feats)? {
        evaluations.push(devset::evaluate(name, split, &sel, &devset::labels_of(&v))?);
    }
    Ok(DevReport {
        split: split.into(),
        evaluations,
        read_seconds,
        probe_sha256: probe.sha256(),
    })
}

/// How labels move when the same answers are cut shorter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LengthRow {
    pub tokens: usize,
    /// Rows whose label at this length differs from the careful label of the full answer.
    pub differ_from_full_careful: usize,
    /// Rows whose label at this length differs from the same labeler's label at the longest length.
    pub differ_from_longest: usize,
    pub n: usize,
}

/// Label the full (256-token view) development rows cut at each of `lengths` tokens with the
/// ensemble; compare with the careful label of the full answer.
pub fn length_study(
    model: &Model,
    rows: &[DevRow],
    probe: &ProbeFile,
    lengths: &[usize],
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LengthRow>> {
    let full: Vec<&DevRow> = rows
        .iter()
        .filter(|r| r.max_tokens == 256 && !r.ambiguous)
        .collect();
    if full.is_empty() {
        return Err(Error::Empty(
            "no non-ambiguous 256-token rows in the development set".into(),
        ));
    }
    // One read of the full answers; `length_rows` reads each shorter cut (the same study
    // `train_and_measure` runs on the features it already has).
    let inputs: Vec<LabelInput> = full.iter().map(|r| r.input()).collect();
    let feats = features::read(model, &inputs, &probe.read_options(batch_size), progress)?;
    length_rows(
        model,
        probe,
        &full,
        &inputs,
        &feats,
        lengths,
        batch_size,
        &mut |_, d, n| progress(d, n),
    )
}

/// The first `n` tokens of `text` under the model's tokenizer, decoded.
pub fn cut_tokens(model: &Model, text: &str, n: usize) -> Result<String> {
    let ids = model.tokenizer.encode(text)?;
    if ids.len() <= n {
        return Ok(text.to_string());
    }
    model.tokenizer.decode(&ids[..n], true)
}

/// What [`train_and_measure`] found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub probe_sha256: String,
    /// Every labeler on the evaluation split, measured with the probe just trained.
    pub evaluation: DevReport,
    /// Rows read and their tokens (prompt + answer as read), and the seconds the read took.
    pub rows_read: usize,
    pub tokens_read: usize,
    pub read_seconds: f64,
    /// Ensemble labels of the evaluation split's full answers cut shorter.
    pub lengths: Vec<LengthRow>,
}

/// Read the whole development set once, train the probe on `tune`, measure every labeler on
/// `eval_split`, and (for each of `lengths` below the full answer) count how the ensemble's labels
/// move when the evaluation split's full answers are cut to that many tokens.
pub fn train_and_measure(
    model: &Model,
    rows: &[DevRow],
    opts: &super::probe::ProbeTrainOptions,
    eval_split: &str,
    lengths: &[usize],
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(ProbeFile, TrainReport)> {
    let inputs: Vec<LabelInput> = rows.iter().map(|r| r.input()).collect();
    let t = std::time::Instant::now();
    let feats = features::read(model, &inputs, &opts.read, &mut |d, n| {
        progress("reading", d, n)
    })?;
    let read_seconds = t.elapsed().as_secs_f64();
    let tokens_read = feats.iter().map(|f| f.n_output_tokens).sum::<usize>()
        + inputs.len() * prompt_tokens_estimate(model, &inputs)?;
    let probe = super::probe::fit_from_features(model, rows, &feats, opts)?;
    let idx: Vec<usize> = (0..rows.len())
        .filter(|&i| eval_split == "all" || rows[i].split == eval_split)
        .collect();
    if idx.is_empty() {
        return Err(Error::Empty(format!(
            "the development set has no rows in split '{eval_split}'"
        )));
    }
    let sel: Vec<&DevRow> = idx.iter().map(|&i| &rows[i]).collect();
    let sel_in: Vec<LabelInput> = idx.iter().map(|&i| inputs[i].clone()).collect();
    let sel_feats: Vec<RowFeatures> = idx.iter().map(|&i| feats[i].clone()).collect();
    let mut evaluations = Vec::new();
    for (name, v) in all_verdicts(&probe, &sel_in, &sel_feats)? {
        evaluations.push(devset::evaluate(
            name,
            eval_split,
            &sel,
            &devset::labels_of(&v),
        )?);
    }
    let evaluation = DevReport {
        split: eval_split.into(),
        evaluations,
        read_seconds,
        probe_sha256: probe.sha256(),
    };
    let lengths = length_rows(
        model,
        &probe,
        &sel,
        &sel_in,
        &sel_feats,
        lengths,
        opts.read.batch_size,
        progress,
    )?;
    let report = TrainReport {
        probe_sha256: probe.sha256(),
        evaluation,
        rows_read: rows.len(),
        tokens_read,
        read_seconds,
        lengths,
    };
    Ok((probe, report))
}

/// Mean prompt tokens of the rows under the reader's template (for cost accounting).
fn prompt_tokens_estimate(model: &Model, inputs: &[LabelInput]) -> Result<usize> {
    let mut total = 0;
    for r in inputs {
        total += encode_chat(model, &ChatPrompt::new(r.prompt.clone()))?.len();
    }
    Ok(total / inputs.len().max(1))
}

/// The length study on rows whose features at full length are already read.
#[allow(clippy::too_many_arguments)]
fn length_rows(
    model: &Model,
    probe: &ProbeFile,
    sel: &[&DevRow],
    sel_in: &[LabelInput],
    sel_feats: &[RowFeatures],
    lengths: &[usize],
    batch_size: usize,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<LengthRow>> {
    let keep: Vec<usize> = (0..sel.len())
        .filter(|&i| sel[i].max_tokens == 256 && !sel[i].ambiguous)
        .collect();
    if keep.is_empty() || lengths.is_empty() {
        return Ok(Vec::new());
    }
    let full_in: Vec<LabelInput> = keep.iter().map(|&i| sel_in[i].clone()).collect();
    let full_feats: Vec<RowFeatures> = keep.iter().map(|&i| sel_feats[i].clone()).collect();
    let full = devset::labels_of(&all_verdicts(probe, &full_in, &full_feats)?[3].1);
    let mut out = Vec::new();
    for &n in lengths {
        let labels = if n >= 256 {
            full.clone()
        } else {
            let cut: Vec<LabelInput> = full_in
                .iter()
                .map(|r| {
                    Ok(LabelInput {
                        output: cut_tokens(model, &r.output, n)?,
                        ..r.clone()
                    })
                })
                .collect::<Result<_>>()?;
            let opts = probe.read_options(batch_size);
            let feats = features::read(model, &cut, &opts, &mut |d, t| progress("lengths", d, t))?;
            devset::labels_of(&all_verdicts(probe, &cut, &feats)?[3].1)
        };
        out.push(LengthRow {
            tokens: n,
            differ_from_full_careful: labels
                .iter()
                .zip(&keep)
                .filter(|(l, &i)| **l != sel[i].label)
                .count(),
            differ_from_longest: labels.iter().zip(&full).filter(|(a, b)| a != b).count(),
            n: keep.len(),
        });
    }
    Ok(out)
}

/// Accuracy entries (`data/labels/accuracy.json`) for every labeler of an evaluation; trained
/// labelers are named with their probe's hash (`ensemble@1:ab12cd34ef567890`).
pub fn accuracy_entries(
    r: &DevReport,
    devset_sha256: &str,
) -> Vec<super::accuracy::LabelerAccuracy> {
    let artifact: String = r.probe_sha256.chars().take(16).collect();
    r.evaluations
        .iter()
        .map(|e| {
            let labeler = if e.labeler.starts_with("probe") || e.labeler.starts_with("ensemble") {
                format!("{}:{artifact}", e.labeler)
            } else {
                e.labeler.clone()
            };
            super::accuracy::LabelerAccuracy {
                labeler,
                split: e.split.clone(),
                n: e.agreement.n,
                agreement: e.agreement.p,
                agreement_lo: e.agreement.lo,
                agreement_hi: e.agreement.hi,
                refusal_precision: e.class(Label::Refusal).precision.p,
                refusal_recall: e.class(Label::Refusal).recall.p,
                degenerate_f1: e.class(Label::Degenerate).f1,
                devset_sha256: devset_sha256.to_string(),
            }
        })
        .collect()
}
