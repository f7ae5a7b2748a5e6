//! Events of long library operations (a study run, judging, relabeling, ...), for whoever drives
//! them: the CLI draws progress bars from them, the server can log them, the Python package can
//! hand them to a callback.
//!
//! Why one small vocabulary for every operation: a driver then renders any operation without
//! knowing its internals, and an operation adds no printing of its own. The numbers a caller acts
//! on come back in the operation's typed result when it returns; events only report what is
//! happening meanwhile.

use serde::Serialize;

/// What an operation reports while it works.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// A phase begins (`generate`, `request`, `judge`, `relabel`, ...) with `total` units of work
    /// planned; `unit` names them for a display (`items`, `rows`, `judged`).
    Phase {
        name: String,
        unit: String,
        total: usize,
    },
    /// Units of the current phase done so far.
    Progress { done: usize, total: usize },
    /// One unit of the current phase finished: `key` is the group it belongs to (a condition, a
    /// judge), `outcome` how it came out (a label, `ok`, `failed`).
    Row { key: String, outcome: String },
    /// A sentence for a person watching (what is being done, with its numbers).
    Note(String),
    /// Something went wrong that does not stop the operation.
    Warning(String),
    /// The current phase is over (its progress display can go).
    PhaseEnd { name: String },
}

/// Receives the events of an operation. Any `FnMut(Event)` closure is a sink.
pub trait EventSink {
    fn event(&mut self, event: Event);
}

impl<F: FnMut(Event)> EventSink for F {
    fn event(&mut self, event: Event) {
        self(event)
    }
}

/// A sink that drops every event (tests, batch jobs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

impl EventSink for Discard {
    fn event(&mut self, _: Event) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_their_kind() {
        let e = Event::Progress { done: 2, total: 5 };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"progress","data":{"done":2,"total":5}}"#
        );
        let w = Event::Warning("slow".into());
        assert_eq!(
            serde_json::to_string(&w).unwrap(),
            r#"{"event":"warning","data":"slow"}"#
        );
    }

    #[test]
    fn closures_are_sinks() {
        let mut seen = Vec::new();
        let mut sink = |e: Event| seen.push(e);
        sink.event(Event::Note("hi".into()));
        Discard.event(Event::Note("dropped".into()));
        assert_eq!(seen, [Event::Note("hi".into())]);
    }
}
