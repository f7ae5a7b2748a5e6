//! Refusal receipts: write them from a study, verify them (every hash recomputed), and gate on
//! them (`pgate check`). Results cross as (JSON, the text `pgate` prints).

use std::path::{Path, PathBuf};

use persona_gate::report::ops::{verify_path, write_study_receipts};
use persona_gate::report::{
    check_paths, Bound, GateOptions, GateSources, ReceiptOptions, VerifyOptions,
};
use pyo3::prelude::*;

use crate::errors::{json_err, IntoPy};

/// Write the receipts of a study in `db` to the folder `out`; returns the files written and the
/// summary line.
#[pyfunction]
#[pyo3(signature = (db, out, study = None, policy_version = None))]
pub fn receipts_write(
    db: &str,
    out: &str,
    study: Option<String>,
    policy_version: Option<String>,
) -> PyResult<(Vec<PathBuf>, String)> {
    let opts = ReceiptOptions {
        study,
        policy_version,
        ..Default::default()
    };
    let w = write_study_receipts(Path::new(db), Path::new(out), &opts).py_err()?;
    Ok((w.files.clone(), w.summary()))
}

/// Verify receipts (a receipt, a `bundle.json` or a folder): returns whether every check passed,
/// the report as JSON and the text `pgate receipt verify` prints.
#[pyfunction]
#[pyo3(signature = (path, db = None, model = None, pubkey = None, skip_files = false, verbose = false))]
pub fn receipts_verify(
    path: &str,
    db: Option<PathBuf>,
    model: Option<PathBuf>,
    pubkey: Option<PathBuf>,
    skip_files: bool,
    verbose: bool,
) -> PyResult<(bool, String, String)> {
    let opts = VerifyOptions {
        db,
        model,
        pubkey,
        skip_files,
        ..Default::default()
    };
    let v = verify_path(Path::new(path), &opts).py_err()?;
    Ok((
        v.report.ok(),
        serde_json::to_string(&v.report).map_err(json_err)?,
        v.to_text(verbose),
    ))
}

/// The deployment gate (`pgate check`): refusal drop within `max_refusal_drop` points (interval
/// bound), optional unsafe and benign-refusal limits. Returns pass, JSON, text.
#[pyfunction]
#[pyo3(signature = (paths, max_refusal_drop = 5.0, bound = "upper", max_unsafe_rate = None, max_benign_refusal = None, min_labeler_accuracy = None, pubkey = None, db = None))]
#[allow(clippy::too_many_arguments)]
pub fn receipts_check(
    paths: Vec<PathBuf>,
    max_refusal_drop: f64,
    bound: &str,
    max_unsafe_rate: Option<f64>,
    max_benign_refusal: Option<f64>,
    min_labeler_accuracy: Option<f64>,
    pubkey: Option<PathBuf>,
    db: Option<PathBuf>,
) -> PyResult<(bool, String, String)> {
    let opts = GateOptions {
        max_refusal_drop,
        max_unsafe_rate,
        max_benign_refusal,
        bound: Bound::parse(bound).py_err()?,
        only: Vec::new(),
        min_labeler_accuracy,
    };
    let r = check_paths(&paths, &opts, &GateSources { pubkey, db }).py_err()?;
    Ok((
        r.pass(),
        serde_json::to_string(&r).map_err(json_err)?,
        r.to_text(max_refusal_drop, bound),
    ))
}
