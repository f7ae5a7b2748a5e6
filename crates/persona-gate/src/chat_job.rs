//! `pgate generate` as a job: the prompts given by flags and a JSONL file, the generation
//! settings, and the one-line throughput summary. The generation itself is
//! [`crate::generate::generate_chat`].
//!
//! Why a type here: the flags are the job's fields (clap derive behind the `cli` feature), so the
//! binary flattens this group instead of repeating it, and other front ends build the same job.

use std::path::PathBuf;

use crate::eval::prompts::read_chat_prompts;
use crate::generate::{ChatPrompt, GenSettings, GenStats, Sampling};
use crate::Result;

/// Prompts, settings and intervention plan of one batch of chat generations, and where the
/// completions go.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ChatJob {
    /// A user message (repeatable).
    #[cfg_attr(feature = "cli", arg(long))]
    pub prompt: Vec<String>,
    /// System prompt for every conversation (the template's default applies when absent).
    #[cfg_attr(feature = "cli", arg(long))]
    pub system: Option<String>,
    /// JSONL file of prompts: {"prompt"|"user"|"instruction"|"forbidden_prompt": ..., "system"?: ..., "id"?: ...}.
    #[cfg_attr(feature = "cli", arg(long))]
    pub prompts: Option<PathBuf>,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 256))]
    pub max_tokens: usize,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 8))]
    pub batch_size: usize,
    /// Sampling temperature (0 = greedy).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.0))]
    pub temperature: f32,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub top_p: f32,
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub plan: crate::directions::PlanFlags,
    /// Write one JSON line per completion here (as each finishes).
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<PathBuf>,
}

impl ChatJob {
    /// The `--prompt` messages, then the file's prompts (which may carry their own system prompt);
    /// empty when neither is given.
    pub fn conversations(&self) -> Result<Vec<ChatPrompt>> {
        let mut list: Vec<ChatPrompt> = self
            .prompt
            .iter()
            .map(|p| ChatPrompt::new(p.clone()).with_system(self.system.clone()))
            .collect();
        if let Some(f) = &self.prompts {
            list.extend(read_chat_prompts(f, self.system.as_deref())?);
        }
        Ok(list)
    }

    /// The `--out` file, created (truncated) before any generation so a bad path fails first.
    pub fn out_file(&self) -> Result<Option<CompletionFile>> {
        let create = |p: &PathBuf| {
            CompletionFile::create(p)
                .map_err(|e| crate::Error::io(format!("creating {}", p.display()), e))
        };
        self.out.as_ref().map(create).transpose()
    }

    /// The generation settings.
    pub fn settings(&self) -> GenSettings {
        GenSettings {
            max_new_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
            },
            batch_size: self.batch_size,
        }
    }
}

/// `N prompts, T new tokens, prefill X tok/s, decode Y tok/s` for `prompts` conversations (the
/// first token of each answer comes from prefill, hence the `+ prompts`).
pub fn stats_line(prompts: usize, stats: &GenStats) -> String {
    format!(
        "{} prompts, {} new tokens, prefill {:.1} tok/s, decode {:.1} tok/s",
        prompts,
        stats.decode_tokens + prompts,
        stats.prefill_tokens as f64 / stats.prefill_secs.max(1e-9),
        stats.decode_tokens as f64 / stats.decode_secs.max(1e-9)
    )
}

/// `--out FILE`: one JSON line per completion, flushed as each finishes, so a run stopped
/// half-way keeps every completion it finished.
pub struct CompletionFile(std::io::BufWriter<std::fs::File>);

impl CompletionFile {
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(CompletionFile(std::io::BufWriter::new(
            std::fs::File::create(path)?,
        )))
    }

    /// Append `value` as one line and flush it.
    pub fn write(&mut self, value: &impl serde::Serialize) -> Result<()> {
        use std::io::Write;
        serde_json::to_writer(&mut self.0, value)?;
        writeln!(self.0)
            .and_then(|_| self.0.flush())
            .map_err(|e| crate::Error::io("--out", e))
    }
}
