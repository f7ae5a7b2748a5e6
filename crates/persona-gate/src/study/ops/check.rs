//! A study file checked and described without loading a model: its target, prompt sets,
//! conditions with their hashes and work, and judges.

use std::path::Path;

use serde::Serialize;

use super::OpResult;
use crate::eval::judge::JudgeKind;
use crate::study::Study;

/// What a study file asks for.
#[derive(Debug, Clone, Serialize)]
pub struct StudyOverview {
    pub name: String,
    pub hash: String,
    pub target: Target,
    pub prompt_sets: Vec<PromptSetInfo>,
    pub conditions: Vec<ConditionInfo>,
    pub judges: Vec<JudgeInfo>,
    /// Work items of the whole study.
    pub items: usize,
}

/// What generates the answers.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Local weights.
    Local { spec: String, dtype: String },
    /// An OpenAI-compatible server (black box: system prompts and sampling only).
    Endpoint {
        base_url: String,
        model: String,
        concurrency: usize,
        requests_per_minute: Option<f64>,
        tokens_per_minute: Option<f64>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptSetInfo {
    pub name: String,
    /// Prompts of the set after `skip` and `n`.
    pub prompts: usize,
    pub source: String,
    pub skip: usize,
    /// sha256 of the whole set.
    pub hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConditionInfo {
    pub name: String,
    pub hash: String,
    /// Work items of the condition (prompts of its sets times samples).
    pub items: usize,
    pub persona: Option<String>,
    /// Whether it has a system prompt (a persona's or its own).
    pub system: bool,
    /// Its intervention ops as written (`add c:8@12`).
    pub ops: Vec<String>,
    pub baseline: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct JudgeInfo {
    pub name: String,
    pub kind: JudgeKind,
    /// The judge's mode (`strongreject`, `safety`, ...); None for the rules judge.
    pub mode: Option<String>,
}

/// Check the study file at `path` (every error names its field) and describe it.
pub fn check(path: &Path) -> OpResult<StudyOverview> {
    let study = Study::load(path)?;
    Ok(overview(&study))
}

/// The overview of a resolved study.
pub fn overview(study: &Study) -> StudyOverview {
    let target = match study.endpoint() {
        None => Target::Local {
            spec: study.file.model.spec.clone(),
            dtype: study.file.model.dtype.clone(),
        },
        Some(ep) => Target::Endpoint {
            base_url: ep.normalized_base(),
            model: ep.model.clone(),
            concurrency: ep.concurrency,
            requests_per_minute: ep.requests_per_minute,
            tokens_per_minute: ep.tokens_per_minute,
        },
    };
    let samples = study.file.generation.samples;
    let conditions = study
        .conditions
        .iter()
        .enumerate()
        .map(|(i, c)| ConditionInfo {
            name: c.name.clone(),
            hash: c.hash.clone(),
            items: c
                .prompt_sets
                .iter()
                .map(|&s| study.prompt_sets[s].items.len() * samples)
                .sum(),
            persona: c.persona.clone(),
            system: c.system.is_some(),
            ops: c
                .ops
                .iter()
                .map(|o| format!("{} {}", o.field.key(), o.text))
                .collect(),
            baseline: i == study.baseline,
        })
        .collect();
    StudyOverview {
        name: study.name.clone(),
        hash: study.hash.clone(),
        target,
        prompt_sets: study
            .prompt_sets
            .iter()
            .map(|s| PromptSetInfo {
                name: s.name.clone(),
                prompts: s.items.len(),
                source: s.source.clone(),
                skip: s.skip,
                hash: s.hash.clone(),
            })
            .collect(),
        conditions,
        judges: study
            .file
            .judges
            .iter()
            .map(|j| JudgeInfo {
                name: j.display_name(),
                kind: j.kind,
                mode: j.effective_mode().map(|m| m.name().to_string()),
            })
            .collect(),
        items: study.items().len(),
    }
}
