//! Device selection. CUDA is an opt-in feature (`--features cuda`); CPU builds report a clear error.

pub use candle_core::Device;

use crate::{Error, Result};

/// CUDA device `ordinal`.
pub fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Unsupported(
            "this pgate was built without CUDA: rebuild with --features cuda (scripts/build-cuda.sh)".into(),
        ));
    }
    Ok(Device::new_cuda(ordinal)?)
}
