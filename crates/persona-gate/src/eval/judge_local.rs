//! A judge model loaded by pgate and run with the same batched generator as the study.
//!
//! Greedy decoding, so a verdict is reproducible. StrongREJECT mode renders the rubric through the
//! judge model's own chat template; guard mode feeds Llama Guard 3's full prompt (with its Llama 3
//! header tokens) as is, because the guard model's template expects a conversation, not a task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::judge::{
    llama_guard_prompt, strongreject_prompt, Judge, JudgeConfig, JudgeInput, JudgeMode,
    JudgeOutcome, STRONGREJECT_SYSTEM,
};
use crate::generate::{encode_chat, ChatPrompt, GenRequest, Generator, Sampling};
use crate::model::{DTypeMode, LoadOptions, Model};
use crate::{Error, Result};

pub struct LocalJudge {
    name: String,
    mode: JudgeMode,
    cfg: JudgeConfig,
    model: Arc<Model>,
}

impl LocalJudge {
    /// Load the judge model named by `cfg.model`.
    pub fn load(cfg: &JudgeConfig, device: crate::device::Device) -> Result<Self> {
        cfg.check()?;
        let spec = cfg.model.clone().unwrap_or_default();
        let dtype = DTypeMode::parse(&cfg.dtype)?;
        let model = Model::load(&spec, &LoadOptions { dtype, device })?;
        Ok(Self::with_model(cfg, Arc::new(model)))
    }

    /// A judge on an already loaded model (tests, or judging with the study's own model).
    pub fn with_model(cfg: &JudgeConfig, model: Arc<Model>) -> Self {
        Self {
            name: cfg.display_name(),
            mode: cfg.effective_mode().unwrap_or(JudgeMode::StrongReject),
            cfg: cfg.clone(),
            model,
        }
    }

    fn encode(&self, item: &JudgeInput) -> Result<Vec<u32>> {
        match self.mode {
            JudgeMode::StrongReject => encode_chat(
                &self.model,
                &ChatPrompt {
                    id: None,
                    system: Some(STRONGREJECT_SYSTEM.into()),
                    user: strongreject_prompt(&item.prompt, &item.response),
                },
            ),
            JudgeMode::Guard => self
                .model
                .tokenizer
                .encode(&llama_guard_prompt(&item.prompt, &item.response)),
        }
    }
}

impl Judge for LocalJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn mode(&self) -> JudgeMode {
        self.mode
    }

    fn judge_all(
        &self,
        items: &[JudgeInput],
        stop: &AtomicBool,
        on_done: &mut dyn FnMut(usize, JudgeOutcome) -> Result<()>,
    ) -> Result<()> {
        let stop_ids = self.model.tokenizer.stop_token_ids().to_vec();
        let wave = self.cfg.batch_size.max(1) * 2;
        let mut start = 0;
        while start < items.len() && !stop.load(Ordering::SeqCst) {
            let end = (start + wave).min(items.len());
            let mut reqs = Vec::with_capacity(end - start);
            let mut index = Vec::with_capacity(end - start);
            for (i, item) in items.iter().enumerate().take(end).skip(start) {
                match self.encode(item) {
                    Ok(prompt) => {
                        reqs.push(GenRequest {
                            prompt,
                            max_new_tokens: self.cfg.max_tokens,
                            sampling: Sampling::greedy(),
                            stop: stop_ids.clone(),
                            plan: None,
                        });
                        index.push(i);
                    }
                    Err(e) => on_done(i, JudgeOutcome::failed(format!("encoding: {e}"), 1))?,
                }
            }
            if !reqs.is_empty() {
                let mut gen = Generator::new(&self.model.decoder, self.cfg.batch_size);
                gen.run(&reqs, None, |k, o| {
                    let text = self
                        .model
                        .tokenizer
                        .decode(&o.tokens, true)
                        .map_err(|e| Error::Tokenizer(e.to_string()))?;
                    on_done(index[k], JudgeOutcome::from_answer(self.mode, text, 1))
                })?;
            }
            start = end;
        }
        Ok(())
    }
}
