//! Studies: many conditions (persona modes, steering, ablations, sweeps) x prompt sets x samples,
//! generated once, stored durably, judged and summarized with paired statistics.
//!
//! A study is a TOML file ([`file`]) checked before anything runs: unknown direction names,
//! malformed op specs, NaN coefficients, unknown personas and empty prompt sets are errors that
//! name the offending field. [`plan`] resolves it into conditions and work items with stable
//! hashes:
//!
//! - a **condition hash** is the sha256 of the canonical JSON of what determines its outputs: the
//!   model spec and dtype, the system prompt text, the ordered intervention ops (each direction by
//!   the sha256 of its file, or the recipe of a generated one), and the generation settings. Names
//!   are not hashed, so renaming a condition recomputes nothing, and two conditions that would
//!   generate the same text are caught as duplicates;
//! - a **prompt-set hash** is [`crate::eval::PromptSet::sha256`] of the whole set before `skip` and
//!   `n`, so raising `n` only adds work;
//! - a **work item** is `(condition hash, prompt-set hash, prompt id, sample index)`: the UNIQUE key
//!   of a result row. Its sha256 ([`plan::item_hash`]) assigns it to a shard (`--shard i/k`), so
//!   shards split work without coordination and merge exactly.
//!
//! [`store`] keeps everything in one SQLite file (WAL mode); every finished sequence is committed
//! at once, so a run killed at any point continues where it stopped. [`runner`] generates the
//! missing items, [`judging`] grades stored outputs with a [`crate::eval::judge::Judge`],
//! [`report`] computes label rates with Wilson intervals and paired comparisons against the
//! baseline (McNemar, paired bootstrap), and [`export`] writes JSONL, CSV or Parquet (the last
//! two from the one typed form of [`flat`]).
//! [`relabel`] labels stored outputs again with another labeler (`crate::label`), keeping every
//! earlier label in the store's `labels` history.
//!
//! A study may target an OpenAI-compatible endpoint instead of local weights (`[model] endpoint`):
//! [`remote`] then sends the same work items as chat-completions requests (black-box conditions
//! only: system prompts and sampling settings), into the same store with the same keys, so it
//! resumes, shards and merges exactly like a local run. What the two runners share (options,
//! pending items, summary, progress events) lives in [`work`], so neither depends on the other.
//!
//! [`ops`] assembles these pieces into whole operations (run, judge, status, table, compare,
//! relabel, check, export, merge) with typed results and [`crate::events`] for progress; [`text`]
//! has the plain-text forms of those results. `pgate study` is a thin layer over the two.
//! [`cluster`] splits a study over a Slurm array, a Kubernetes Indexed Job or the GPUs of a node,
//! and merges the shard databases with checks.

pub mod canon;
pub mod cluster;
pub mod export;
pub mod file;
pub mod flat;
pub mod judging;
pub mod ops;
mod parquet_out;
pub mod personas;
pub mod plan;
pub mod relabel;
pub mod remote;
pub mod report;
pub mod runner;
pub mod store;
pub mod text;
pub mod work;

pub use file::StudyFile;
pub use plan::{Condition, Study, WorkItem};
pub use remote::run_endpoint_study;
pub use runner::run_study;
pub use store::Store;
pub use work::{RunOptions, RunSummary};
