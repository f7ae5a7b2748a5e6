//! Prometheus text metrics (`GET /metrics`), kept by hand: counters and histograms by label.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pgate_requests_total` | counter | `preset`, `status` (HTTP code) |
//! | `pgate_rejected_total` | counter | `reason` (`queue_full`, `shutting_down`) |
//! | `pgate_prompt_tokens_total`, `pgate_completion_tokens_total` | counter | `preset` |
//! | `pgate_request_duration_seconds` | histogram | `preset` |
//! | `pgate_time_to_first_token_seconds` | histogram | `preset` |
//! | `pgate_guard_flags_total` | counter | `preset`, `mode` (`monitor`, `block`) |
//! | `pgate_guard_checked_total` | counter | `preset` |
//! | `pgate_output_guard_total` | counter | `preset`, `outcome` (`pass`, `flagged`, `blocked`, `error`) |
//! | `pgate_output_guard_errors_total` | counter | `preset` (every failed read, checkpoints included) |
//! | `pgate_output_guard_seconds` | histogram | `preset` (one read: queueing in the reader + the pass) |
//! | `pgate_queue_depth`, `pgate_running_sequences` | gauge | |
//! | `pgate_decode_steps_total`, `pgate_decode_tokens_total` | counter | |
//! | `pgate_decode_steppers_total`, `pgate_slots_reused_total` | counter | |
//! | `pgate_prefill_seconds_total`, `pgate_graph_record_seconds_total`, `pgate_join_seconds_total` | counter | |
//! | `pgate_open_connections` | gauge | |
//! | `pgate_connections_total`, `pgate_connections_evicted_total`, `pgate_connection_header_timeouts_total` | counter | |
//! | `pgate_handler_panics_total` | counter | |
//! | `process_resident_memory_bytes` | gauge | |
//! | `pgate_projection` | histogram | `preset`, `layers`, `direction` ([`crate::drift`]) |
//! | `pgate_drift_score`, `pgate_drift_alert` | gauge | `preset` |
//! | `pgate_drift_alerts_total` | counter | `preset` |

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use persona_gate::generate::GenStats;

const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    rejected: BTreeMap<String, u64>,
    prompt_tokens: BTreeMap<String, u64>,
    completion_tokens: BTreeMap<String, u64>,
    duration: BTreeMap<String, Histogram>,
    ttft: BTreeMap<String, Histogram>,
    flags: BTreeMap<(String, String), u64>,
    checked: BTreeMap<String, u64>,
    output: BTreeMap<(String, String), u64>,
    output_errors: BTreeMap<String, u64>,
    output_seconds: BTreeMap<String, Histogram>,
}

/// Shared by the HTTP handlers (behind `Arc`) and the engine thread (gauges and step counters).
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub decode_steps: AtomicU64,
    pub decode_tokens: AtomicU64,
    /// Fixed-slot steppers made and requests placed into ended rows (slot reuse).
    pub steppers: AtomicU64,
    pub slots_reused: AtomicU64,
    /// Engine time in prefill and in steps that made a stepper or recorded a CUDA graph, in
    /// microseconds (rendered as seconds): where a burst's time to first token goes.
    pub prefill_us: AtomicU64,
    pub graph_record_us: AtomicU64,
    /// Microseconds joining prefilled rows to the running batch (K/V copies).
    pub join_us: AtomicU64,
    /// Connections open now (the accept loop caps them).
    pub conn_open: AtomicUsize,
    /// Connections accepted.
    pub conn_total: AtomicU64,
    /// Idle connections closed to make room for a new one at the cap.
    pub conn_evicted: AtomicU64,
    /// Connections closed for not sending a request head in time.
    pub conn_timeouts: AtomicU64,
    /// Handler panics turned into 500s (each one is a bug).
    pub panics: AtomicU64,
    /// Runtime persona drift per preset (`pgate_projection`, `pgate_drift_*`; see [`crate::drift`]).
    pub drift: crate::drift::DriftMonitor,
}

impl Metrics {
    /// Add what one engine step did (`now` against the stats `before` it) to the step counters.
    pub fn record_engine_step(&self, before: &GenStats, now: &GenStats) {
        for (counter, now, was) in [
            (&self.decode_steps, now.decode_steps, before.decode_steps),
            (&self.decode_tokens, now.decode_tokens, before.decode_tokens),
            (&self.steppers, now.steppers, before.steppers),
            (&self.slots_reused, now.slots_reused, before.slots_reused),
        ] {
            counter.fetch_add(now.saturating_sub(was) as u64, Ordering::Relaxed);
        }
        for (counter, now, was) in [
            (&self.prefill_us, now.prefill_secs, before.prefill_secs),
            (
                &self.graph_record_us,
                now.graph_record_secs,
                before.graph_record_secs,
            ),
            (&self.join_us, now.join_secs, before.join_secs),
        ] {
            counter.fetch_add(((now - was).max(0.0) * 1e6) as u64, Ordering::Relaxed);
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn request(&self, preset: &str, status: u16) {
        self.with(|m| *m.requests.entry((preset.into(), status)).or_default() += 1);
    }

    pub fn rejected(&self, reason: &str) {
        self.with(|m| *m.rejected.entry(reason.into()).or_default() += 1);
    }

    pub fn tokens(&self, preset: &str, prompt: usize, completion: usize) {
        self.with(|m| {
            *m.prompt_tokens.entry(preset.into()).or_default() += prompt as u64;
            *m.completion_tokens.entry(preset.into()).or_default() += completion as u64;
        });
    }

    pub fn duration(&self, preset: &str, secs: f64) {
        self.with(|m| m.duration.entry(preset.into()).or_default().observe(secs));
    }

    pub fn ttft(&self, preset: &str, secs: f64) {
        self.with(|m| m.ttft.entry(preset.into()).or_default().observe(secs));
    }

    pub fn guard(&self, preset: &str, mode: &str, flagged: bool) {
        self.with(|m| {
            *m.checked.entry(preset.into()).or_default() += 1;
            if flagged {
                *m.flags.entry((preset.into(), mode.into())).or_default() += 1;
            }
        });
    }

    /// One answer's output-guard outcome: `pass`, `flagged` (monitor), `blocked` or `error`.
    pub fn output_guard(&self, preset: &str, outcome: &str) {
        self.with(|m| *m.output.entry((preset.into(), outcome.into())).or_default() += 1);
    }

    /// A failed output-guard read (the answer stays unflagged).
    pub fn output_guard_error(&self, preset: &str) {
        self.with(|m| *m.output_errors.entry(preset.into()).or_default() += 1);
    }

    /// Time one output-guard read took, waiting for the reader included.
    pub fn output_guard_seconds(&self, preset: &str, secs: f64) {
        self.with(|m| {
            m.output_seconds
                .entry(preset.into())
                .or_default()
                .observe(secs)
        });
    }

    /// Total requests answered with `status`.
    pub fn count_status(&self, status: u16) -> u64 {
        self.with(|m| {
            m.requests
                .iter()
                .filter(|((_, s), _)| *s == status)
                .map(|(_, n)| *n)
                .sum()
        })
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let mut o = String::new();
        self.render_by_preset(&mut o);
        self.render_gauges(&mut o);
        self.render_counters(&mut o);
        self.drift.render(&mut o);
        o
    }

    /// The labelled families (by preset, status, mode, outcome), read under the lock.
    fn render_by_preset(&self, o: &mut String) {
        self.with(|m| {
            family(o, "pgate_requests_total", "Chat completion requests by preset and HTTP status.", "counter");
            for ((p, s), n) in &m.requests {
                let _ = writeln!(o, "pgate_requests_total{{preset=\"{}\",status=\"{s}\"}} {n}", esc(p));
            }
            family(o, "pgate_rejected_total", "Requests turned away before queueing (429 queue_full, 503 shutting_down).", "counter");
            for (r, n) in &m.rejected {
                let _ = writeln!(o, "pgate_rejected_total{{reason=\"{}\"}} {n}", esc(r));
            }
            for (name, map, help) in [
                ("pgate_prompt_tokens_total", &m.prompt_tokens, "Prompt tokens processed."),
                ("pgate_completion_tokens_total", &m.completion_tokens, "Completion tokens generated."),
            ] {
                family(o, name, help, "counter");
                for (p, n) in map {
                    let _ = writeln!(o, "{name}{{preset=\"{}\"}} {n}", esc(p));
                }
            }
            for (name, map, help) in [
                ("pgate_request_duration_seconds", &m.duration, "Time from request to last byte."),
                ("pgate_time_to_first_token_seconds", &m.ttft, "Time from request to the first generated token."),
                ("pgate_output_guard_seconds", &m.output_seconds, "Time of one output-guard read (waiting for the reader included)."),
            ] {
                family(o, name, help, "histogram");
                for (p, h) in map {
                    let p = esc(p);
                    for (b, c) in BUCKETS.iter().zip(&h.counts) {
                        let _ = writeln!(o, "{name}_bucket{{preset=\"{p}\",le=\"{b}\"}} {c}");
                    }
                    let _ = writeln!(o, "{name}_bucket{{preset=\"{p}\",le=\"+Inf\"}} {}", h.n);
                    let _ = writeln!(o, "{name}_sum{{preset=\"{p}\"}} {}", h.sum);
                    let _ = writeln!(o, "{name}_count{{preset=\"{p}\"}} {}", h.n);
                }
            }
            family(o, "pgate_guard_checked_total", "Requests scored by the guard.", "counter");
            for (p, n) in &m.checked {
                let _ = writeln!(o, "pgate_guard_checked_total{{preset=\"{}\"}} {n}", esc(p));
            }
            family(o, "pgate_guard_flags_total", "Requests the guard flagged, by preset and guard mode.", "counter");
            for ((p, mode), n) in &m.flags {
                let _ = writeln!(o, "pgate_guard_flags_total{{preset=\"{}\",mode=\"{mode}\"}} {n}", esc(p));
            }
            family(o, "pgate_output_guard_total", "Answers checked by the output guard, by preset and outcome (pass, flagged, blocked, error).", "counter");
            for ((p, outcome), n) in &m.output {
                let _ = writeln!(o, "pgate_output_guard_total{{preset=\"{}\",outcome=\"{outcome}\"}} {n}", esc(p));
            }
            family(o, "pgate_output_guard_errors_total", "Output-guard reads that failed (the answer stays unflagged).", "counter");
            for (p, n) in &m.output_errors {
                let _ = writeln!(o, "pgate_output_guard_errors_total{{preset=\"{}\"}} {n}", esc(p));
            }
        });
    }

    fn render_gauges(&self, o: &mut String) {
        for (name, help, v) in [
            (
                "pgate_queue_depth",
                "Requests waiting for a batch slot.",
                self.queue_depth.load(Ordering::Relaxed) as u64,
            ),
            (
                "pgate_running_sequences",
                "Sequences in the decode batch.",
                self.running.load(Ordering::Relaxed) as u64,
            ),
            (
                "pgate_open_connections",
                "HTTP connections open now.",
                self.conn_open.load(Ordering::Relaxed) as u64,
            ),
        ] {
            family(o, name, help, "gauge");
            let _ = writeln!(o, "{name} {v}");
        }
        if let Some(rss) = rss_bytes() {
            family(
                o,
                "process_resident_memory_bytes",
                "Resident memory of the server process.",
                "gauge",
            );
            let _ = writeln!(o, "process_resident_memory_bytes {rss}");
        }
    }

    /// The engine's and the connections' counters; `micros`: kept in microseconds, rendered as
    /// seconds.
    fn render_counters(&self, o: &mut String) {
        for (name, v, help, micros) in [
            ("pgate_decode_steps_total", &self.decode_steps, "Shared decode steps (one token for every running sequence).", false),
            ("pgate_decode_tokens_total", &self.decode_tokens, "Tokens produced by decode steps.", false),
            ("pgate_decode_steppers_total", &self.steppers, "Fixed-slot decode steppers made (on a GPU each records its CUDA graphs anew).", false),
            ("pgate_slots_reused_total", &self.slots_reused, "Requests placed into the batch rows of ended ones, keeping the stepper.", false),
            ("pgate_connections_total", &self.conn_total, "HTTP connections accepted.", false),
            ("pgate_connections_evicted_total", &self.conn_evicted, "Idle connections closed to admit a new one at the connection cap.", false),
            ("pgate_connection_header_timeouts_total", &self.conn_timeouts, "Connections closed for not sending a request head within the header timeout.", false),
            ("pgate_handler_panics_total", &self.panics, "Handler panics answered with a 500 (each one is a bug).", false),
            ("pgate_prefill_seconds_total", &self.prefill_us, "Engine time spent in prefill chunks.", true),
            ("pgate_graph_record_seconds_total", &self.graph_record_us, "Engine time of decode steps that made a fixed-slot stepper or recorded a CUDA graph.", true),
            ("pgate_join_seconds_total", &self.join_us, "Engine time joining prefilled rows to the running batch (their K/V copied in).", true),
        ] {
            family(o, name, help, "counter");
            let v = v.load(Ordering::Relaxed);
            let _ = if micros {
                writeln!(o, "{name} {:.6}", v as f64 / 1e6)
            } else {
                writeln!(o, "{name} {v}")
            };
        }
    }
}

/// A metric family's `# HELP` and `# TYPE` lines.
fn family(o: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// A label value with `\` and `"` escaped.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Resident set size from /proc/self/statm (Linux), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("default", 200);
        m.request("default", 200);
        m.request("compliant", 429);
        m.duration("default", 0.3);
        m.guard("compliant", "monitor", true);
        m.output_guard("compliant", "flagged");
        m.output_guard_error("compliant");
        m.output_guard_seconds("compliant", 0.2);
        let t = m.render();
        assert!(
            t.contains("pgate_output_guard_total{preset=\"compliant\",outcome=\"flagged\"} 1"),
            "{t}"
        );
        assert!(t.contains("pgate_output_guard_errors_total{preset=\"compliant\"} 1"));
        assert!(t.contains("pgate_output_guard_seconds_count{preset=\"compliant\"} 1"));
        assert!(
            t.contains("pgate_requests_total{preset=\"default\",status=\"200\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("pgate_request_duration_seconds_bucket{preset=\"default\",le=\"0.5\"} 1")
        );
        assert!(
            t.contains("pgate_request_duration_seconds_bucket{preset=\"default\",le=\"0.25\"} 0")
        );
        assert!(t.contains("pgate_guard_flags_total{preset=\"compliant\",mode=\"monitor\"} 1"));
        assert_eq!(m.count_status(200), 2);
    }
}
