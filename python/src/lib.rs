//! `persona_gate._native`: the Python bindings of persona-gate (pyo3, abi3).
//!
//! The Python package (`python/persona_gate/`) is the public face: it turns these functions'
//! plain values (numpy arrays, lists, JSON text of the library's serde results) into classes with
//! docstrings. Everything here calls the library as the `pgate` binary does: no second
//! implementation of an operation lives in the bindings.

mod arrays;
mod directions;
mod errors;
mod labels;
mod model;
mod plans;
mod receipts;
mod serve;
mod sigint;
mod studies;
mod watch;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<model::PyModel>()?;
    m.add_function(wrap_pyfunction!(model::plan_check, m)?)?;
    m.add_function(wrap_pyfunction!(directions::directions_load, m)?)?;
    m.add_function(wrap_pyfunction!(directions::directions_save, m)?)?;
    m.add_function(wrap_pyfunction!(directions::directions_export_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(directions::prompt_set, m)?)?;
    m.add_function(wrap_pyfunction!(directions::refusal, m)?)?;
    m.add_function(wrap_pyfunction!(directions::trait_direction, m)?)?;
    m.add_function(wrap_pyfunction!(directions::random_set, m)?)?;
    m.add_function(wrap_pyfunction!(directions::geometry, m)?)?;
    m.add_function(wrap_pyfunction!(labels::label_rows, m)?)?;
    m.add_function(wrap_pyfunction!(studies::study_check, m)?)?;
    m.add_function(wrap_pyfunction!(studies::study_run, m)?)?;
    m.add_function(wrap_pyfunction!(studies::study_status, m)?)?;
    m.add_function(wrap_pyfunction!(studies::study_table, m)?)?;
    m.add_function(wrap_pyfunction!(studies::study_compare, m)?)?;
    m.add_function(wrap_pyfunction!(studies::study_export, m)?)?;
    m.add_function(wrap_pyfunction!(receipts::receipts_write, m)?)?;
    m.add_function(wrap_pyfunction!(receipts::receipts_verify, m)?)?;
    m.add_function(wrap_pyfunction!(receipts::receipts_check, m)?)?;
    m.add_function(wrap_pyfunction!(serve::serve_forever, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
