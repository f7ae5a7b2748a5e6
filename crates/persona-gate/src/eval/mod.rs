//! Evaluation: prompt sets, labels for outputs, and the statistics of label rates.
//!
//! - [`prompts`]: prompt sets from StrongREJECT CSV, JSON lists, JSONL, by path or by name from the
//!   cache (downloaded from the canonical URLs when online).
//! - [`labels`]: `refusal` / `bypass` / `degenerate` by documented, measurable rules.
//! - [`stats`]: rates with Wilson 95% intervals.
//! - [`paired`]: paired comparisons of two conditions (McNemar exact / mid-p, paired bootstrap).
//! - [`judge`]: judges beyond the rules (StrongREJECT rubric, Llama-Guard-style safety, leakage),
//!   over HTTP ([`judge_http`]) or with a local model ([`judge_local`]).

pub mod judge;
pub mod judge_http;
pub mod judge_local;
pub mod labels;
pub mod paired;
pub mod prompts;
pub mod stats;

pub use labels::{label_output, Label, RuleLabel};
pub use prompts::{PromptItem, PromptSet};
pub use stats::{wilson, Rate};
