//! Chat-level generation: render each prompt with the model's own chat template, generate in
//! batches, decode the text. What `pgate generate` and the studies call.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Finish, GenRequest, GenStats, Generator, Sampling};
use crate::intervene::CompiledPlan;
use crate::model::Model;
use crate::{Error, Result};

/// One conversation to complete: optional system prompt and a user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatPrompt {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    pub user: String,
}

impl ChatPrompt {
    pub fn new(user: impl Into<String>) -> Self {
        Self {
            id: None,
            system: None,
            user: user.into(),
        }
    }

    pub fn with_system(mut self, system: Option<String>) -> Self {
        self.system = system;
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenSettings {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub batch_size: usize,
}

impl Default for GenSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: Sampling::greedy(),
            batch_size: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub id: Option<String>,
    pub system: Option<String>,
    pub user: String,
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
}

/// Render and tokenize one chat prompt with the model's template (no extra BOS: templates that
/// want one write it).
pub fn encode_chat(model: &Model, p: &ChatPrompt) -> Result<Vec<u32>> {
    if p.user.trim().is_empty() {
        return Err(Error::Empty(format!(
            "prompt {} has an empty user message",
            p.id.as_deref().unwrap_or("?")
        )));
    }
    // Prompt sets are data from elsewhere: control-token text in them stays text.
    model.tokenizer.encode_prompt(p.system.as_deref(), &p.user)
}

/// Generate completions for `prompts`; `on_done` sees each completion as soon as it finishes.
pub fn generate_chat(
    model: &Model,
    prompts: &[ChatPrompt],
    settings: &GenSettings,
    plan: Option<Arc<CompiledPlan>>,
    mut on_done: impl FnMut(usize, &Completion) -> Result<()>,
) -> Result<(Vec<Completion>, GenStats)> {
    if prompts.is_empty() {
        return Err(Error::Empty("no prompts given".into()));
    }
    let stop = model.tokenizer.stop_token_ids().to_vec();
    let reqs = prompts
        .iter()
        .map(|p| {
            Ok(GenRequest {
                prompt: encode_chat(model, p)?,
                max_new_tokens: settings.max_new_tokens,
                sampling: settings.sampling,
                stop: stop.clone(),
                plan: plan.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut gen = Generator::new(&model.decoder, settings.batch_size);
    let to_completion = |i: usize, o: &super::GenOutput| -> Result<Completion> {
        Ok(Completion {
            id: prompts[i].id.clone(),
            system: prompts[i].system.clone(),
            user: prompts[i].user.clone(),
            text: model.tokenizer.decode(&o.tokens, true)?,
            tokens: o.tokens.clone(),
            finish: o.finish,
            prompt_tokens: o.prompt_tokens,
        })
    };
    let outs = gen.run(&reqs, None, |i, o| on_done(i, &to_completion(i, o)?))?;
    let comps = outs
        .iter()
        .enumerate()
        .map(|(i, o)| to_completion(i, o))
        .collect::<Result<Vec<_>>>()?;
    Ok((comps, gen.stats.clone()))
}
