//! Persona trait files: the format of persona vectors (Chen et al. 2025) and the assistant-axis
//! project: a JSON object with
//!
//! - `instruction`: a list of `{"pos": ..., "neg": ...}` system prompts that do and do not elicit
//!   the trait,
//! - `questions`: user messages on which the trait can show,
//! - `eval_prompt`: a judge template with `{question}` and `{answer}` (optional here: no judge runs
//!   during extraction).
//!
//! Built in (written for this project, embedded in the binary): `compliant`, a persona that
//! fulfils every request against one that declines harmful ones (the paper's compliant
//! model-persona; its own prompts are not public), and the paper's eight relational traits: evil,
//! nurturing, callous, supportive, hostile, patient, arrogant, diplomatic.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One pair of system prompts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructionPair {
    pub pos: String,
    pub neg: String,
}

/// A parsed trait file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraitSpec {
    /// The trait's name (file stem for files).
    pub name: String,
    /// `builtin:<name>` or the file path with its sha256.
    pub source: String,
    pub instruction: Vec<InstructionPair>,
    pub questions: Vec<String>,
    pub eval_prompt: Option<String>,
}

/// Names of the built-in traits.
pub const BUILTIN_TRAITS: &[&str] = &[
    "compliant",
    "evil",
    "nurturing",
    "callous",
    "supportive",
    "hostile",
    "patient",
    "arrogant",
    "diplomatic",
];

fn builtin_text(name: &str) -> Option<&'static str> {
    Some(match name {
        "compliant" => include_str!("traits/compliant.json"),
        "evil" => include_str!("traits/evil.json"),
        "nurturing" => include_str!("traits/nurturing.json"),
        "callous" => include_str!("traits/callous.json"),
        "supportive" => include_str!("traits/supportive.json"),
        "hostile" => include_str!("traits/hostile.json"),
        "patient" => include_str!("traits/patient.json"),
        "arrogant" => include_str!("traits/arrogant.json"),
        "diplomatic" => include_str!("traits/diplomatic.json"),
        _ => return None,
    })
}

impl TraitSpec {
    /// A built-in trait by name.
    pub fn builtin(name: &str) -> Result<Self> {
        let text = builtin_text(name).ok_or_else(|| {
            Error::InvalidValue(format!(
                "no built-in trait '{name}' (built in: {})",
                BUILTIN_TRAITS.join(", ")
            ))
        })?;
        Self::parse(name, &format!("builtin:{name}"), text)
    }

    /// A built-in name, or a path to a trait file.
    pub fn load(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if builtin_text(spec).is_some() && !p.exists() {
            return Self::builtin(spec);
        }
        if !p.exists() {
            return Err(Error::InvalidValue(format!(
                "trait '{spec}' is neither a built-in trait ({}) nor an existing file",
                BUILTIN_TRAITS.join(", ")
            )));
        }
        Self::from_file(p)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "trait".into());
        let source = format!(
            "{} (sha256 {})",
            path.display(),
            crate::hash::sha256_bytes(text.as_bytes())
        );
        Self::parse(&name, &source, &text).map_err(|e| match e {
            Error::InvalidValue(m) => Error::InvalidValue(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parse trait JSON, naming the key at fault on error.
    pub fn parse(name: &str, source: &str, text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::InvalidValue(format!("trait file is not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::InvalidValue("trait file must be a JSON object".into()))?;
        let bad = |m: String| Error::InvalidValue(format!("trait '{name}': {m}"));
        let instr = obj.get("instruction").ok_or_else(|| {
            let hint = if obj.contains_key("instructions") {
                " (found 'instructions': the key is 'instruction')"
            } else {
                ""
            };
            bad(format!(
                "missing key 'instruction' (a list of {{\"pos\", \"neg\"}} system prompts){hint}"
            ))
        })?;
        let instr = instr.as_array().ok_or_else(|| {
            bad("'instruction' must be a list of {\"pos\", \"neg\"} objects".into())
        })?;
        if instr.is_empty() {
            return Err(bad(
                "'instruction' is empty: give at least one {\"pos\", \"neg\"} pair".into(),
            ));
        }
        let mut instruction = Vec::with_capacity(instr.len());
        for (i, item) in instr.iter().enumerate() {
            let side = |k: &str| -> Result<String> {
                let s = item
                    .get(k)
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| bad(format!("instruction {i} has no string '{k}'")))?;
                if s.trim().is_empty() {
                    return Err(bad(format!("instruction {i} has an empty '{k}'")));
                }
                Ok(s.to_string())
            };
            instruction.push(InstructionPair {
                pos: side("pos")?,
                neg: side("neg")?,
            });
        }
        let qs = obj
            .get("questions")
            .ok_or_else(|| bad("missing key 'questions' (a list of user messages)".into()))?
            .as_array()
            .ok_or_else(|| bad("'questions' must be a list of strings".into()))?;
        if qs.is_empty() {
            return Err(bad(
                "'questions' is empty: give at least one question".into()
            ));
        }
        let mut questions = Vec::with_capacity(qs.len());
        for (i, q) in qs.iter().enumerate() {
            let s = q
                .as_str()
                .ok_or_else(|| bad(format!("question {i} is not a string")))?;
            if s.trim().is_empty() {
                return Err(bad(format!("question {i} is empty")));
            }
            questions.push(s.to_string());
        }
        let eval_prompt = match obj.get("eval_prompt") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad("'eval_prompt' must be a string".into())),
        };
        Ok(Self {
            name: name.to_string(),
            source: source.to_string(),
            instruction,
            questions,
            eval_prompt,
        })
    }

    /// The judge prompt for one answer (`{question}` and `{answer}` filled in).
    pub fn judge_prompt(&self, question: &str, answer: &str) -> Option<String> {
        self.eval_prompt.as_ref().map(|t| {
            t.replace("{question}", question)
                .replace("{answer}", answer)
        })
    }
}
