//! Numpy arrays in and out.
//!
//! Results leave as numpy arrays that own the library's `Vec` (`PyArray::from_vec` moves the
//! buffer; `reshape` of a contiguous array is a view), so a capture of `[layers, n, d]` floats is
//! never copied on its way to Python. Vectors coming in are read from contiguous float32 arrays
//! (the Python side converts lists, other dtypes and torch tensors first).

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::invalid;

/// A `Vec` as a numpy array of `shape` without copying it.
pub fn to_numpy<'py>(
    py: Python<'py>,
    data: Vec<f32>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(invalid(format!(
            "internal: {} values for shape {shape:?}",
            data.len()
        )));
    }
    let a = PyArray1::from_vec(py, data);
    Ok(a.reshape(shape.to_vec())?.into_any())
}

/// A float32 vector from a contiguous numpy array (one copy into the library's own `Vec`).
pub fn from_numpy(a: &PyReadonlyArray1<'_, f32>) -> PyResult<Vec<f32>> {
    if a.len() == 0 {
        return Err(invalid("empty vector"));
    }
    Ok(a.as_slice()
        .map(|s| s.to_vec())
        .unwrap_or_else(|_| a.as_array().iter().copied().collect()))
}
