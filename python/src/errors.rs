//! Library errors as Python exceptions, with the library's one-line messages unchanged.
//!
//! Why a small hierarchy instead of one class: a notebook catches "my input was wrong"
//! (`InvalidInput`) differently from "a file could not be read" (`FileError`) or "the model
//! failed" (`ModelError`); everything stays catchable as `persona_gate.Error`.

use persona_gate::study::ops::OpError;
use persona_gate::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

create_exception!(
    _native,
    PersonaGateError,
    PyException,
    "Any persona-gate failure."
);
create_exception!(
    _native,
    InvalidInput,
    PersonaGateError,
    "Bad input: a layer out of range, a wrong width, an empty set, a malformed spec, a NaN."
);
create_exception!(
    _native,
    FileError,
    PersonaGateError,
    "A file could not be read or written, or is not what it should be."
);
create_exception!(
    _native,
    ModelError,
    PersonaGateError,
    "A model could not be loaded or failed while running."
);

/// Register the exception classes on the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<PersonaGateError>())?;
    m.add("InvalidInput", py.get_type::<InvalidInput>())?;
    m.add("FileError", py.get_type::<FileError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    Ok(())
}

/// The Python exception for a library error; the message is the error's `Display`, one line.
pub fn to_py(e: Error) -> PyErr {
    let msg = one_line(&e.to_string());
    match e {
        Error::LayerOutOfRange { .. }
        | Error::WidthMismatch { .. }
        | Error::InvalidValue(_)
        | Error::InvalidSpec { .. }
        | Error::Empty(_)
        | Error::Unsupported(_) => InvalidInput::new_err(msg),
        Error::Io { .. } | Error::NotAModel { .. } | Error::CorruptModel { .. } => {
            FileError::new_err(msg)
        }
        Error::UnknownArchitecture(_)
        | Error::MissingMetadata { .. }
        | Error::MissingTensor(_)
        | Error::MissingTokenizer(_)
        | Error::Hub { .. }
        | Error::Tensor(_)
        | Error::Generation(_) => ModelError::new_err(msg),
        _ => PersonaGateError::new_err(msg),
    }
}

/// Study operations refuse in the caller's terms (`OpError::Refused`): that is bad input too.
pub fn op_to_py(e: OpError) -> PyErr {
    match e {
        OpError::Refused(m) => InvalidInput::new_err(one_line(&m)),
        OpError::Lib(e) => to_py(e),
    }
}

/// Errors of the bindings themselves (a JSON form that did not parse, ...).
pub fn invalid(msg: impl Into<String>) -> PyErr {
    InvalidInput::new_err(msg.into())
}

pub fn json_err(e: serde_json::Error) -> PyErr {
    PyValueError::new_err(format!("json: {e}"))
}

/// Library messages are one line already; a nested source with a newline is folded so the
/// exception reads like the CLI's error line.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

pub trait IntoPy<T> {
    /// `?` for library results inside the bindings.
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

impl<T> IntoPy<T> for Result<T, OpError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(op_to_py)
    }
}
