//! Device selection. CUDA is an opt-in feature (`--features cuda`); CPU builds report a clear error.

pub use candle_core::Device;

use crate::{Error, Result};

/// A device named `cpu`, `cuda` (or `gpu`: CUDA device 0) or `cuda:N`: one spelling for every
/// command, server preset and binding that picks a device.
pub fn parse(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(Error::InvalidValue(format!(
                "unknown device '{d}' (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}

/// CUDA device `ordinal`.
pub fn cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Unsupported(
            "this pgate was built without CUDA: rebuild with --features cuda (scripts/build-cuda.sh)".into(),
        ));
    }
    let dev = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &dev {
        // cudarc creates and destroys two CUDA events per allocation for cross-stream tracking, i.e.
        // per tensor op. The engine runs everything on the one stream candle creates, so the
        // tracking is pure host overhead (decode is launch-bound at small batches).
        // SAFETY: no other stream ever touches these tensors.
        unsafe { c.disable_event_tracking() };
        keep_pool_memory(c);
    }
    Ok(dev)
}

/// Let the device's default memory pool (what candle's stream-ordered allocations draw from) keep
/// freed memory instead of returning it to the driver at every synchronization: decode synchronizes
/// once per step (to read the next tokens), and with the default threshold of 0 the pool would be
/// trimmed and regrown every step. Best effort: a failure leaves the default in place.
#[cfg(feature = "cuda")]
fn keep_pool_memory(c: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = c.cuda_stream();
    let ctx = stream.context();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    // SAFETY: plain driver calls on the device's own default pool with valid out-pointers.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let mut keep: u64 = u64::MAX;
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}
