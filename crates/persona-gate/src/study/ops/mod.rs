//! Whole study operations, as `pgate study ...`, the server and the Python package call them: run a
//! study (local weights or an endpoint, then its judges), judge, status, table, compare, relabel,
//! check, export, merge.
//!
//! Why a layer of its own: each operation used to be assembled in the binary from the pieces below
//! (`runner`, `remote`, `judging`, `report`, `relabel`), so a second front end would have had to
//! repeat the assembly, and the decisions in it (local or endpoint, which judges, which reader
//! model). Here every operation takes its options, a cancellation flag where it runs long, and an
//! [`EventSink`](crate::events::EventSink) for progress, and returns a typed result; the caller
//! only chooses how to show it (`study::text` has the plain-text forms `pgate` prints).
//!
//! Cancellation: a long operation checks its `stop` flag between waves, batches and judges, stores
//! what it finished and returns with its result marked as stopped, so running it again continues.

mod check;
mod compare;
mod judge;
mod relabel;
mod run;
mod status;
mod table;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use check::{check, ConditionInfo, JudgeInfo, PromptSetInfo, StudyOverview, Target};
pub use compare::{compare, CompareOptions, Comparison, ConditionPair, Disagreement};
pub use judge::{judge, JudgeRun, JudgeSpec};
pub use relabel::{relabel, RelabelSpec};
pub use run::{parse_shard, run, RunFlags, RunSpec, Stopped, StudyRun};
pub use status::{status, ConditionUsage, EndpointStatus, StudyStatus};
pub use table::{table, StudyTable, TableOptions};

use super::export::Format;
use super::Store;

/// Why a study operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The operation cannot do what was asked, said in the caller's terms (an option that does not
    /// apply to this study, nothing to judge or compare); shown as it is, without a prefix.
    #[error("{0}")]
    Refused(String),
    /// A failure of the library underneath (files, database, model, endpoint).
    #[error(transparent)]
    Lib(#[from] crate::Error),
}

pub type OpResult<T> = std::result::Result<T, OpError>;

fn refused<T>(msg: String) -> OpResult<T> {
    Err(OpError::Refused(msg))
}

/// What [`export`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// The study's name.
    pub study: String,
    pub rows: usize,
}

impl Exported {
    /// `N rows of study NAME -> OUT`, once written to `out`.
    pub fn summary(&self, out: &Path) -> String {
        format!(
            "{} rows of study {} -> {}",
            self.rows,
            self.study,
            out.display()
        )
    }
}

/// Write every result row of a study (`which`: name or hash prefix; `None`: the latest run) to
/// `out` in `format`.
pub fn export(db: &Path, which: Option<&str>, format: Format, out: &Path) -> OpResult<Exported> {
    let store = Store::open_read(db)?;
    let rec = store.find_study(which)?;
    let rows = store.rows(&rec.hash)?;
    let n = super::export::export(&rows, format, out)?;
    Ok(Exported {
        study: rec.name,
        rows: n,
    })
}

/// The flags of `pgate study export`.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ExportFlags {
    #[cfg_attr(feature = "cli", arg(long, default_value = "results.sqlite"))]
    pub db: PathBuf,
    #[cfg_attr(feature = "cli", arg(long))]
    pub study: Option<String>,
    /// jsonl, csv or parquet.
    #[cfg_attr(feature = "cli", arg(long, default_value = "jsonl"))]
    pub format: String,
    #[cfg_attr(feature = "cli", arg(short, long))]
    pub out: PathBuf,
}

impl ExportFlags {
    /// [`export`] with the format named as on the command line.
    pub fn run(&self) -> OpResult<Exported> {
        let format = Format::parse(&self.format)?;
        export(&self.db, self.study.as_deref(), format, &self.out)
    }
}

/// What [`merge`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Merged {
    /// Each source database with the results it added.
    pub sources: Vec<(PathBuf, usize)>,
    /// Results in the merged database.
    pub total: usize,
}

/// Merge shard databases into `db` (created if missing). Results are keyed, so the merge is exact.
pub fn merge(db: &Path, from: &[PathBuf]) -> OpResult<Merged> {
    let mut store = Store::open(db)?;
    let mut sources = Vec::new();
    for f in from {
        sources.push((f.clone(), store.merge_from(f)?));
    }
    Ok(Merged {
        sources,
        total: store.count_results()?,
    })
}
