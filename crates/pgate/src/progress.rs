//! Draws the events of library operations ([`persona_gate::events`]) on stderr: one progress bar
//! per phase, notes and warnings above it.
//!
//! Why here: library operations print nothing; each command hands them this sink, so every long
//! command shows its progress the same way (and a hidden bar, when stderr is not a terminal, still
//! lets notes and warnings through).

use indicatif::{ProgressBar, ProgressStyle};
use persona_gate::events::{Event, EventSink};

/// A progress display for one operation.
#[derive(Default)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }

    /// A bar of `total` `unit`s shown at once (for a loop the command drives itself).
    pub fn bar(total: usize, unit: &str) -> Self {
        let mut p = Self::new();
        p.start(total, unit);
        p
    }

    fn start(&mut self, total: usize, unit: &str) {
        self.finish();
        let b = ProgressBar::new(total as u64);
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{bar:40}} {{pos}}/{{len}} {unit}  {{elapsed_precise}} eta {{eta}}"
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.bar = Some(b);
    }

    /// One more unit done.
    pub fn inc(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    /// A line on stderr above the bar (printed directly when the bar is hidden or absent).
    pub fn say(&self, msg: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.println(msg),
            _ => eprintln!("{msg}"),
        }
    }

    /// A line on stdout that the bar does not overwrite.
    pub fn print(&self, msg: &str) {
        match &self.bar {
            Some(b) if !b.is_hidden() => b.suspend(|| println!("{msg}")),
            _ => println!("{msg}"),
        }
    }

    /// Remove the bar.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl EventSink for Progress {
    fn event(&mut self, event: Event) {
        match event {
            Event::Phase { unit, total, .. } => self.start(total, &unit),
            Event::Progress { done, total } => {
                if let Some(b) = &self.bar {
                    b.set_length(total as u64);
                    b.set_position(done as u64);
                }
            }
            Event::Row { .. } => {}
            Event::Note(s) => self.say(&format!("[pgate] {s}")),
            Event::Warning(s) => self.say(&format!("[pgate] warning: {s}")),
            Event::PhaseEnd { .. } => self.finish(),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
