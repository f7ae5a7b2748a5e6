//! A study's summary table: label rates with Wilson intervals and paired comparisons with the
//! baseline (see [`crate::study::report`]), optionally written as CSV too.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{refused, OpResult};
use crate::study::export::report_csv;
use crate::study::report::{report, ReportOptions, ReportRow};
use crate::study::Store;
use crate::Error;

/// Options of [`table`].
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TableOptions {
    /// Study name or hash prefix (default: the latest run).
    #[cfg_attr(feature = "cli", arg(long))]
    pub study: Option<String>,
    /// Also write the table as CSV.
    #[cfg_attr(feature = "cli", arg(long))]
    pub csv: Option<PathBuf>,
    /// One row per prompt category within each condition and prompt set.
    #[cfg_attr(feature = "cli", arg(long))]
    pub by_category: bool,
    /// Compare with this condition instead of the study's baseline.
    #[cfg_attr(feature = "cli", arg(long))]
    pub baseline: Option<String>,
    /// Paired-bootstrap resamples (default: the study's `stats.bootstrap`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub bootstrap: Option<usize>,
}

/// The summary table of a study.
#[derive(Debug, Clone, Serialize)]
pub struct StudyTable {
    pub study: String,
    pub hash: String,
    /// The condition the rows are paired with.
    pub baseline: String,
    /// Paired-bootstrap resamples behind the difference intervals.
    pub bootstrap: usize,
    pub rows: Vec<ReportRow>,
}

/// The summary table of a study in `db`.
pub fn table(db: &Path, opts: &TableOptions) -> OpResult<StudyTable> {
    let store = Store::open_read(db)?;
    let rec = store.find_study(opts.study.as_deref())?;
    // Statistics settings come from the stored file; a file that no longer parses (e.g. its
    // prompt files moved) leaves the defaults.
    let file = rec.study_file().ok();
    let rows = store.rows(&rec.hash)?;
    if rows.is_empty() {
        return refused(format!(
            "study {} has no results yet in {} (pgate study run ...)",
            rec.name,
            db.display()
        ));
    }
    if let Some(b) = &opts.baseline {
        if !rows.iter().any(|r| &r.condition == b) {
            return refused(format!(
                "--baseline '{b}' has no results in study {}",
                rec.name
            ));
        }
    }
    let ropts = ReportOptions {
        baseline: opts.baseline.clone(),
        by_category: opts.by_category,
        bootstrap: opts
            .bootstrap
            .or(file.as_ref().map(|f| f.stats.bootstrap))
            .unwrap_or(2000),
        seed: file.as_ref().map(|f| f.stats.seed).unwrap_or(0),
    };
    let out = report(&rows, &rec.baseline, &ropts);
    if let Some(p) = &opts.csv {
        std::fs::write(p, report_csv(&out)).map_err(|e| Error::io(p, e))?;
    }
    Ok(StudyTable {
        study: rec.name,
        hash: rec.hash,
        baseline: ropts.baseline.unwrap_or(rec.baseline),
        bootstrap: ropts.bootstrap,
        rows: out,
    })
}
