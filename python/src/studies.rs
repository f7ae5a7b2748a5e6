//! Studies: check, run (resumable; Ctrl-C stops after the current wave with everything stored),
//! status, table, compare, export. Results cross as (JSON of the library's typed result, the
//! text `pgate study ...` prints).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use persona_gate::study::export::Format;
use persona_gate::study::ops::{self, CompareOptions, RunSpec, TableOptions};
use pyo3::prelude::*;
use serde::Serialize;

use crate::errors::{json_err, IntoPy};
use crate::watch::detached;

fn both<T: Serialize + std::fmt::Display>(v: &T) -> PyResult<(String, String)> {
    Ok((serde_json::to_string(v).map_err(json_err)?, v.to_string()))
}

/// What a study file holds (conditions, prompt sets, judges), checked without running anything.
#[pyfunction]
pub fn study_check(path: &str) -> PyResult<(String, String)> {
    both(&ops::check(Path::new(path)).py_err()?)
}

/// Run a study into `db`: generate its missing results, then grade them with its model judges.
/// Returns the run as JSON. A Ctrl-C stops it after the current wave (results stored; running
/// again continues) and then raises KeyboardInterrupt.
#[pyfunction]
#[pyo3(signature = (study, db, limit = None, judge = true, device = "cpu", wave = None, progress = None))]
#[allow(clippy::too_many_arguments)]
pub fn study_run(
    py: Python<'_>,
    study: &str,
    db: &str,
    limit: Option<usize>,
    judge: bool,
    device: &str,
    wave: Option<usize>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let spec = RunSpec {
        study: PathBuf::from(study),
        db: PathBuf::from(db),
        limit,
        shard: None,
        shard_by: Default::default(),
        wave,
        judge,
        device: persona_gate::device::parse(device).py_err()?,
        concurrency: None,
    };
    let run = detached(py, progress, |w| {
        let stop = AtomicBool::new(false);
        let mut sink = w.sink(&stop);
        ops::run(&spec, &stop, &mut sink).py_err()
    })?;
    serde_json::to_string(&run).map_err(json_err)
}

/// Progress of a study in `db` (`which`: name or hash prefix; default the latest run).
#[pyfunction]
#[pyo3(signature = (db, which = None))]
pub fn study_status(db: &str, which: Option<&str>) -> PyResult<(String, String)> {
    both(&ops::status(Path::new(db), which).py_err()?)
}

/// The summary table: rates with Wilson intervals per condition and prompt set, paired
/// differences to the baseline.
#[pyfunction]
#[pyo3(signature = (db, study = None, by_category = false, baseline = None, bootstrap = None))]
pub fn study_table(
    db: &str,
    study: Option<String>,
    by_category: bool,
    baseline: Option<String>,
    bootstrap: Option<usize>,
) -> PyResult<(String, String)> {
    let opts = TableOptions {
        study,
        by_category,
        baseline,
        bootstrap,
        csv: None,
    };
    both(&ops::table(Path::new(db), &opts).py_err()?)
}

/// Compare two studies of one database item by item.
#[pyfunction]
#[pyo3(signature = (db, a, b, show = 5))]
pub fn study_compare(db: &str, a: String, b: String, show: usize) -> PyResult<(String, String)> {
    both(&ops::compare(Path::new(db), &CompareOptions { a, b, show }).py_err()?)
}

/// Write every result row (JSONL, CSV or Parquet); returns the number of rows.
#[pyfunction]
#[pyo3(signature = (db, out, format = "jsonl", which = None))]
pub fn study_export(db: &str, out: &str, format: &str, which: Option<&str>) -> PyResult<usize> {
    let f = Format::parse(format).py_err()?;
    Ok(ops::export(Path::new(db), which, f, Path::new(out))
        .py_err()?
        .rows)
}
