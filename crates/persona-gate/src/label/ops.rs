//! Whole labeling operations (what `pgate label` and the Python package call): pick a labeler by
//! name, label rows, measure labelers on the development set, and count how labels move with the
//! answer's length.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::devset::{self, DevRow, Evaluation};
use super::ensemble::{combine, Ensemble, JudgeLabeler};
use super::features::{self, ReadOptions, RowFeatures};
use super::probe::{probe_verdict, ProbeFile, ProbeLabeler};
use super::rules::{label_v2, RulesV1, RulesV2};
use super::{Label, LabelInput, LabelVerdict, Labeler};
use crate::eval::judge::JudgeConfig;
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
        matches!(self, LabelerChoice::Probe { .. } | LabelerChoice::Ensemble { .. })
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
            Box::new(ProbeLabeler::new(m, resolve_probe(m, file.as_deref())?, batch_size)?)
        }
        LabelerChoice::Ensemble { file } => {
            let m = need(model)?;
            let probe = ProbeLabeler::new(m, resolve_probe(m, file.as_deref())?, batch_size)?;
            Box::new(Ensemble { probe, english })
        }
        LabelerChoice::Judge(cfg) => {
            let judge = crate::study::judging::make_judge(cfg, crate::device::Device::Cpu)?
                .ok_or_else(|| Error::InvalidValue("the rules judge is not an LLM judge: use --labeler rules".into()))?;
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
    Ok(vec![("rules@1", v1), ("rules@2", v2), ("probe@1", pv), ("ensemble@1", ens)])
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
        return Err(Error::Empty(format!("the development set has no rows in split '{split}'")));
    }
    let inputs: Vec<LabelInput> = sel.iter().map(|r| r.input()).collect();
    let opts = ReadOptions { max_output_tokens: probe.max_output_tokens, batch_size, losses: true };
    let t = std::time::Instant::now();
    let feats = features::read(model, &inputs, &opts, progress)?;
    let read_seconds = t.elapsed().as_secs_f64();
    let mut evaluations = Vec::new();
    for (name, v) in all_verdicts(probe, &inputs, &feats)? {
        evaluations.push(devset::evaluate(name, split, &sel, &devset::labels_of(&v))?);
    }
    Ok(DevReport { split: split.into(), evaluations, read_seconds, probe_sha256: probe.sha256() })
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
    let full: Vec<&DevRow> = rows.iter().filter(|r| r.max_tokens == 256 && !r.ambiguous).collect();
    if full.is_empty() {
        return Err(Error::Empty("no non-ambiguous 256-token rows in the development set".into()));
    }
    let mut per_len: Vec<Vec<Label>> = Vec::new();
    for &n in lengths {
        let inputs: Vec<LabelInput> = full
            .iter()
            .map(|r| {
                let mut i = r.input();
                i.output = cut_tokens(model, &r.output, n)?;
                Ok(i)
            })
            .collect::<Result<_>>()?;
        let opts = ReadOptions { max_output_tokens: probe.max_output_tokens, batch_size, losses: true };
        let feats = features::read(model, &inputs, &opts, progress)?;
        let v = all_verdicts(probe, &inputs, &feats)?;
        per_len.push(devset::labels_of(&v[3].1));
    }
    let longest = per_len.last().cloned().unwrap_or_default();
    Ok(lengths
        .iter()
        .zip(&per_len)
        .map(|(&n, ls)| LengthRow {
            tokens: n,
            differ_from_full_careful: ls.iter().zip(&full).filter(|(l, r)| **l != r.label).count(),
            differ_from_longest: ls.iter().zip(&longest).filter(|(a, b)| a != b).count(),
            n: full.len(),
        })
        .collect())
}

/// The first `n` tokens of `text` under the model's tokenizer, decoded.
pub fn cut_tokens(model: &Model, text: &str, n: usize) -> Result<String> {
    let ids = model.tokenizer.encode(text)?;
    if ids.len() <= n {
        return Ok(text.to_string());
    }
    model.tokenizer.decode(&ids[..n], true)
}
