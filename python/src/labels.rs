//! Labels: (request, output) rows through the labelers of `pgate label` (rules@2 by default,
//! measured at 96.9% on the held split; the probe and ensemble labelers read with a model).

use std::path::PathBuf;

use persona_gate::label::ops::{make_labeler, LabelerChoice};
use persona_gate::label::{LabelInput, Labeler};
use pyo3::prelude::*;

use crate::errors::{invalid, json_err, IntoPy};
use crate::model::PyModel;
use crate::watch::detached;

/// Label rows (JSON list of `{prompt, output, system?, id?}`) with `labeler`; returns the labeler's
/// id (`rules@2`) and the verdicts as JSON.
#[pyfunction]
#[pyo3(signature = (rows, labeler = "rules", model = None, probe = None, batch_size = 8, progress = None))]
pub fn label_rows(
    py: Python<'_>,
    rows: &str,
    labeler: &str,
    model: Option<&PyModel>,
    probe: Option<PathBuf>,
    batch_size: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, String)> {
    let rows: Vec<LabelInput> = serde_json::from_str(rows).map_err(json_err)?;
    if rows.is_empty() {
        return Err(crate::errors::to_py(persona_gate::Error::Empty(
            "no rows to label".into(),
        )));
    }
    let choice = LabelerChoice::parse(labeler, probe).py_err()?;
    if choice.needs_model() && model.is_none() {
        return Err(invalid(format!(
            "labeler '{labeler}' reads with a model: pass model="
        )));
    }
    let m = model.map(|m| m.inner.clone());
    detached(py, progress, |w| {
        let mut l: Box<dyn Labeler + '_> =
            make_labeler(&choice, m.as_deref(), batch_size, true).py_err()?;
        let id = l.id().to_string();
        let verdicts = l
            .label_batch(&rows, &mut |d, t| {
                w.progress("label", d, t);
                w.poll_or_unwind();
            })
            .py_err()?;
        Ok((id, serde_json::to_string(&verdicts).map_err(json_err)?))
    })
}
