//! Ctrl-C while the GIL is released: a SIGINT handler of our own for the duration of a call.
//!
//! Why not only `PyErr_CheckSignals` from the callbacks: measured on this package, a SIGINT that
//! arrived while the engine ran was seen by Python only when the call returned (a 100-prompt
//! capture ran to its end). So while a long call runs on the main thread under Python's default
//! handler, this module swaps in a handler that only sets a flag, the running call looks at the
//! flag between steps, and Python's handler is put back when the call returns: one SIGINT, one
//! KeyboardInterrupt, and Python's own handling everywhere else. A custom Python handler
//! (`signal.signal(SIGINT, f)`) is left alone and polled through `PyErr_CheckSignals` instead.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::prelude::*;

static SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    SEEN.store(true, Ordering::SeqCst);
}

/// Our handler while alive; Python's is restored on drop.
pub struct Guard {
    prev: Option<libc::sigaction>,
}

impl Guard {
    /// Install the flag handler when the caller is Python's main thread and SIGINT has Python's
    /// default handler (KeyboardInterrupt); otherwise do nothing.
    pub fn install(py: Python<'_>) -> Self {
        if !default_handler(py).unwrap_or(false) {
            return Guard { prev: None };
        }
        SEEN.store(false, Ordering::SeqCst);
        // SAFETY: plain sigaction calls; the handler only stores to an atomic.
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigint as *const () as usize;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGINT, &new, &mut old) != 0 {
                return Guard { prev: None };
            }
            Guard { prev: Some(old) }
        }
    }

    /// Whether a SIGINT arrived since the last look.
    pub fn take(&self) -> bool {
        self.prev.is_some() && SEEN.swap(false, Ordering::SeqCst)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(old) = self.prev.take() {
            // SAFETY: restores the handler saved in `install`.
            unsafe {
                libc::sigaction(libc::SIGINT, &old, std::ptr::null_mut());
            }
        }
    }
}

fn default_handler(py: Python<'_>) -> PyResult<bool> {
    let threading = py.import("threading")?;
    let main = threading.call_method0("main_thread")?;
    let current = threading.call_method0("current_thread")?;
    if !main.is(&current) {
        return Ok(false);
    }
    let signal = py.import("signal")?;
    let handler = signal.call_method1("getsignal", (signal.getattr("SIGINT")?,))?;
    Ok(handler.is(&signal.getattr("default_int_handler")?))
}
