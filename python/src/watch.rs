//! Model work with the GIL released, Ctrl-C checked between engine steps, and progress events
//! handed to a Python callback.
//!
//! Why this shape: the library runs on the calling thread and reports progress through callbacks
//! and [`EventSink`]s. Released from the GIL (`Python::detach`), the work cannot see a pending
//! SIGINT, so each callback looks (at most every [`POLL`]) at the flag of our SIGINT handler
//! ([`crate::sigint`], under Python's default handling) or reacquires the GIL briefly and asks
//! Python whether a signal arrived (a custom Python handler). When one did, the work must stop without losing what it already
//! stored: operations with a stop flag (studies) get the flag set and return normally; the others
//! are left by unwinding with a private payload (`resume_unwind` skips the panic hook, so nothing
//! is printed) and caught at the boundary, where the `KeyboardInterrupt` is raised.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use persona_gate::events::{Event, EventSink};
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

use crate::sigint::Guard;

/// How often a running operation looks for a pending signal (a decode step is 5-50 ms on a CPU).
const POLL: Duration = Duration::from_millis(50);

/// The unwinding payload of an interrupted operation.
struct Interrupted;

/// What a running operation sees of Python: signals and the progress callback.
pub struct Watch {
    last: Instant,
    /// The exception to raise (KeyboardInterrupt, or whatever the progress callback raised).
    err: Option<PyErr>,
    progress: Option<Py<PyAny>>,
    /// Our SIGINT flag handler for the duration of the call (see [`crate::sigint`]).
    sigint: Option<Guard>,
}

impl Watch {
    fn new(py: Python<'_>, progress: Option<Py<PyAny>>) -> Self {
        Watch {
            last: Instant::now(),
            err: None,
            progress,
            sigint: Some(Guard::install(py)),
        }
    }

    pub fn interrupted(&self) -> bool {
        self.err.is_some()
    }

    /// Whether a signal handler raised (checked at most every [`POLL`]).
    pub fn poll(&mut self) -> bool {
        if self.err.is_some() {
            return true;
        }
        if self.last.elapsed() < POLL {
            return false;
        }
        self.last = Instant::now();
        if self.sigint.as_ref().is_some_and(|g| g.take()) {
            self.err = Some(PyKeyboardInterrupt::new_err(()));
            return true;
        }
        if let Err(e) = Python::attach(|py| py.check_signals()) {
            self.err = Some(e);
        }
        self.err.is_some()
    }

    /// [`Self::poll`], leaving the operation by unwinding when interrupted.
    pub fn poll_or_unwind(&mut self) {
        if self.poll() {
            resume_unwind(Box::new(Interrupted));
        }
    }

    /// Hand an event to the progress callback (as its JSON form) and look for signals.
    pub fn event(&mut self, ev: &Event) {
        if self.err.is_none() {
            if let Some(cb) = &self.progress {
                let json = serde_json::to_string(ev).unwrap_or_default();
                if let Err(e) = Python::attach(|py| cb.call1(py, (json,)).map(|_| ())) {
                    self.err = Some(e);
                }
            }
        }
        self.poll();
    }

    /// A `(phase, done, total)` progress callback of the library as an event.
    pub fn progress(&mut self, phase: &str, done: usize, total: usize) {
        if self.progress.is_some() && done == 0 {
            self.event(&Event::Phase {
                name: phase.into(),
                unit: "prompts".into(),
                total,
            });
        }
        self.event(&Event::Progress { done, total });
    }

    /// An event sink that sets `stop` instead of unwinding: for operations that check a stop flag
    /// and store their work before returning.
    pub fn sink<'a>(&'a mut self, stop: &'a AtomicBool) -> impl EventSink + 'a {
        move |ev: Event| {
            self.event(&ev);
            if self.interrupted() {
                stop.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Run `f` with the GIL released. A Ctrl-C (or an exception from the progress callback) seen
/// while it ran is raised when it returns, whatever it returned.
pub fn detached<T, F>(py: Python<'_>, progress: Option<Py<PyAny>>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce(&mut Watch) -> PyResult<T> + Send,
{
    let mut w = Watch::new(py, progress);
    let out = py.detach(|| catch_unwind(AssertUnwindSafe(|| f(&mut w))));
    // Python's SIGINT handler is back before any Python code runs again.
    w.sigint = None;
    if let Some(e) = w.err.take() {
        if let Err(p) = &out {
            if !p.is::<Interrupted>() {
                // A real panic: report it, not the interrupt.
                let Err(p) = out else { unreachable!() };
                resume_unwind(p);
            }
        }
        return Err(e);
    }
    match out {
        Ok(r) => r,
        Err(p) => resume_unwind(p),
    }
}
