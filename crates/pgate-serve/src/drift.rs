//! Runtime persona drift: does what a preset's prompts look like inside the model still match a
//! calibration window? Every served prompt's last-token residual is already projected on the
//! persona and refusal directions per layer window (the engine's `Projector`); this keeps, per
//! preset, a rolling window of those projections and scores it against the calibration window
//! with the **population stability index** (PSI).
//!
//! - Calibration: the first `calibration` requests of the calibration preset (`default`: the
//!   model's own persona, no steering). Bin edges are that window's deciles, per layer window and
//!   direction.
//! - Score of a preset: the largest PSI over (layer window, direction) between its last `window`
//!   requests and the calibration, once it has `min_requests`. PSI = sum over bins of
//!   `(p - q) ln(p / q)` with both shares floored at 1e-4; by the usual reading < 0.1 is stable,
//!   0.1-0.25 a moderate shift and > 0.25 a significant one, hence the default threshold 0.25.
//! - Over the threshold: `pgate_drift_alert{preset}` is 1, `pgate_drift_alerts_total` counts the
//!   crossings and one log line names the preset, the window and the score. `GET /v1/drift`
//!   returns the scores as JSON. Projections also go to Prometheus histograms
//!   (`pgate_projection{preset,layers,direction}`).
//!
//! Cost: one insertion per request and a PSI over `window` values per (layer window, direction);
//! no model work (the projections are computed anyway). `PGATE_SERVE_DRIFT=0` turns it off, for an
//! A/B throughput measurement with `scripts/serve-bench.sh`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;

use serde::Serialize;

use crate::projection::WindowProjection;

/// Buckets of the projection histograms (projections of the residual on unit directions).
const PROJ_BUCKETS: &[f64] = &[
    -64.0, -32.0, -16.0, -8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0,
];

/// Settings of the drift monitor.
#[derive(Debug, Clone, Serialize)]
pub struct DriftConfig {
    /// The preset whose first requests form the calibration window.
    pub calibration_preset: String,
    /// Requests in the calibration window.
    pub calibration: usize,
    /// Requests in each preset's rolling window.
    pub window: usize,
    /// Requests a preset needs before it is scored.
    pub min_requests: usize,
    /// PSI above which a preset is flagged.
    pub threshold: f64,
    /// Off with `PGATE_SERVE_DRIFT=0` (for measuring what the monitor costs).
    pub enabled: bool,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            calibration_preset: "default".into(),
            calibration: 32,
            window: 32,
            min_requests: 8,
            threshold: 0.25,
            enabled: std::env::var("PGATE_SERVE_DRIFT").map_or(true, |v| v != "0"),
        }
    }
}

/// (layer window label, direction name)
type Key = (String, &'static str);

#[derive(Debug, Default)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

#[derive(Debug, Default)]
struct PresetState {
    recent: BTreeMap<Key, VecDeque<f64>>,
    requests: u64,
    alert: bool,
    alerts: u64,
    score: Option<(f64, String)>,
}

#[derive(Debug, Default)]
struct Inner {
    calib: BTreeMap<Key, Vec<f64>>,
    calib_requests: usize,
    /// Decile edges per key, fixed once the calibration window is full.
    edges: BTreeMap<Key, Vec<f64>>,
    presets: BTreeMap<String, PresetState>,
    hist: BTreeMap<(String, Key), Hist>,
}

/// One preset's current score (`GET /v1/drift`).
#[derive(Debug, Clone, Serialize)]
pub struct PresetScore {
    pub preset: String,
    pub requests: u64,
    /// Largest PSI over layer windows and directions (None until scored).
    pub psi: Option<f64>,
    /// Where it is largest: `persona@10-13`.
    pub at: Option<String>,
    pub drifted: bool,
    pub alerts: u64,
}

/// What `GET /v1/drift` returns.
#[derive(Debug, Clone, Serialize)]
pub struct DriftScores {
    pub method: &'static str,
    pub config: DriftConfig,
    pub calibrated: bool,
    pub calibration_requests: usize,
    pub presets: Vec<PresetScore>,
}

/// Rolling projection distributions per preset and their PSI against the calibration window.
#[derive(Debug, Default)]
pub struct DriftMonitor {
    pub config: DriftConfig,
    inner: Mutex<Inner>,
}

/// PSI of `recent` against the calibration binned by `edges` (deciles).
pub fn psi(edges: &[f64], calib: &[f64], recent: &[f64]) -> f64 {
    let bin = |v: f64| edges.iter().take_while(|e| v > **e).count();
    let shares = |xs: &[f64]| {
        let mut c = vec![0f64; edges.len() + 1];
        for &x in xs {
            c[bin(x)] += 1.0;
        }
        let n = xs.len().max(1) as f64;
        c.into_iter().map(|k| (k / n).max(1e-4)).collect::<Vec<_>>()
    };
    let (q, p) = (shares(calib), shares(recent));
    p.iter().zip(&q).map(|(p, q)| (p - q) * (p / q).ln()).sum()
}

/// Decile edges of `xs` (distinct, ascending).
fn deciles(xs: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Vec::new();
    }
    let mut e: Vec<f64> = (1..10)
        .map(|i| v[(i * v.len() / 10).min(v.len() - 1)])
        .collect();
    e.dedup();
    e
}

fn keys(p: &[WindowProjection]) -> impl Iterator<Item = (Key, f64)> + '_ {
    p.iter().flat_map(|w| {
        [("persona", w.persona), ("refusal", w.refusal)]
            .into_iter()
            .filter_map(move |(d, v)| Some(((w.layers.clone(), d), v?)))
            .filter(|(_, v)| v.is_finite())
    })
}

impl DriftMonitor {
    pub fn new(config: DriftConfig) -> Self {
        DriftMonitor {
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Record one request's projections under `preset`; rescore that preset.
    pub fn observe(&self, preset: &str, projections: &[WindowProjection]) {
        if !self.config.enabled || projections.is_empty() {
            return;
        }
        let Ok(mut g) = self.inner.lock() else { return };
        let inner = &mut *g;
        let cfg = &self.config;
        for (k, v) in keys(projections) {
            let h = inner.hist.entry((preset.to_string(), k)).or_default();
            if h.counts.is_empty() {
                h.counts = vec![0; PROJ_BUCKETS.len()];
            }
            for (i, b) in PROJ_BUCKETS.iter().enumerate() {
                h.counts[i] += (v <= *b) as u64;
            }
            h.sum += v;
            h.n += 1;
        }
        if preset == cfg.calibration_preset && inner.calib_requests < cfg.calibration {
            for (k, v) in keys(projections) {
                inner.calib.entry(k).or_default().push(v);
            }
            inner.calib_requests += 1;
            if inner.calib_requests == cfg.calibration {
                inner.edges = inner
                    .calib
                    .iter()
                    .map(|(k, xs)| (k.clone(), deciles(xs)))
                    .collect();
            }
            // The calibration requests themselves are not scored against themselves.
            inner
                .presets
                .entry(preset.to_string())
                .or_default()
                .requests += 1;
            return;
        }
        let st = inner.presets.entry(preset.to_string()).or_default();
        st.requests += 1;
        for (k, v) in keys(projections) {
            let q = st.recent.entry(k).or_default();
            q.push_back(v);
            while q.len() > cfg.window.max(1) {
                q.pop_front();
            }
        }
        if inner.edges.is_empty() {
            return;
        }
        let mut best: Option<(f64, String)> = None;
        for (k, q) in &st.recent {
            if q.len() < cfg.min_requests {
                continue;
            }
            let (Some(e), Some(c)) = (inner.edges.get(k), inner.calib.get(k)) else {
                continue;
            };
            let recent: Vec<f64> = q.iter().copied().collect();
            let s = psi(e, c, &recent);
            if best.as_ref().is_none_or(|b| s > b.0) {
                best = Some((s, format!("{}@{}", k.1, k.0)));
            }
        }
        let Some((s, at)) = best else { return };
        let over = s > cfg.threshold;
        if over && !st.alert {
            st.alerts += 1;
            eprintln!(
                "[pgate serve] drift: preset {preset} PSI {s:.3} at {at} over the last {} requests exceeds {} (calibration: first {} requests of {})",
                cfg.window, cfg.threshold, cfg.calibration, cfg.calibration_preset
            );
        }
        st.alert = over;
        st.score = Some((s, at));
    }

    /// The current scores.
    pub fn scores(&self) -> DriftScores {
        let g = self.inner.lock().ok();
        let mut presets = Vec::new();
        let (mut calibrated, mut calib_n) = (false, 0);
        if let Some(g) = &g {
            calibrated = !g.edges.is_empty();
            calib_n = g.calib_requests;
            for (name, st) in &g.presets {
                presets.push(PresetScore {
                    preset: name.clone(),
                    requests: st.requests,
                    psi: st.score.as_ref().map(|s| s.0),
                    at: st.score.as_ref().map(|s| s.1.clone()),
                    drifted: st.alert,
                    alerts: st.alerts,
                });
            }
        }
        DriftScores {
            method: "psi (population stability index, decile bins of the calibration window)",
            config: self.config.clone(),
            calibrated,
            calibration_requests: calib_n,
            presets,
        }
    }

    /// Prometheus text: projection histograms, scores, alerts.
    pub fn render(&self, o: &mut String) {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let Ok(g) = self.inner.lock() else { return };
        let _ = writeln!(o, "# HELP pgate_projection Last prompt token's residual projected on a unit direction, per preset and layer window.");
        let _ = writeln!(o, "# TYPE pgate_projection histogram");
        for ((p, (w, d)), h) in &g.hist {
            let l = format!(
                "preset=\"{}\",layers=\"{}\",direction=\"{d}\"",
                esc(p),
                esc(w)
            );
            for (b, c) in PROJ_BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(o, "pgate_projection_bucket{{{l},le=\"{b}\"}} {c}");
            }
            let _ = writeln!(o, "pgate_projection_bucket{{{l},le=\"+Inf\"}} {}", h.n);
            let _ = writeln!(o, "pgate_projection_sum{{{l}}} {}", h.sum);
            let _ = writeln!(o, "pgate_projection_count{{{l}}} {}", h.n);
        }
        let _ = writeln!(o, "# HELP pgate_drift_score Largest PSI of a preset's recent projections against the calibration window.");
        let _ = writeln!(o, "# TYPE pgate_drift_score gauge");
        for (p, st) in &g.presets {
            if let Some((s, _)) = &st.score {
                let _ = writeln!(o, "pgate_drift_score{{preset=\"{}\"}} {s}", esc(p));
            }
        }
        let _ = writeln!(
            o,
            "# HELP pgate_drift_alert 1 while a preset's drift score is over the threshold."
        );
        let _ = writeln!(o, "# TYPE pgate_drift_alert gauge");
        for (p, st) in &g.presets {
            let _ = writeln!(
                o,
                "pgate_drift_alert{{preset=\"{}\"}} {}",
                esc(p),
                st.alert as u8
            );
        }
        let _ = writeln!(
            o,
            "# HELP pgate_drift_alerts_total Times a preset's drift score crossed the threshold."
        );
        let _ = writeln!(o, "# TYPE pgate_drift_alerts_total counter");
        for (p, st) in &g.presets {
            let _ = writeln!(
                o,
                "pgate_drift_alerts_total{{preset=\"{}\"}} {}",
                esc(p),
                st.alerts
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proj(persona: f64, refusal: f64) -> Vec<WindowProjection> {
        vec![WindowProjection {
            layers: "10-13".into(),
            persona: Some(persona),
            refusal: Some(refusal),
        }]
    }

    /// A deterministic spread (no RNG): prompts differ, so projections do.
    fn spread(i: usize) -> f64 {
        ((i * 37 % 101) as f64 / 101.0 - 0.5) * 4.0
    }

    #[test]
    fn steered_preset_drifts_within_min_requests_default_does_not() {
        let m = DriftMonitor::new(DriftConfig::default());
        for i in 0..32 {
            m.observe("default", &proj(-10.0 + spread(i), 5.0 + spread(i + 7)));
        }
        for i in 0..40 {
            m.observe(
                "default",
                &proj(-10.0 + spread(i + 50), 5.0 + spread(i + 3)),
            );
            // A steered preset moves the persona projection by ~6 (a few standard deviations).
            m.observe(
                "compliant",
                &proj(-4.0 + spread(i + 11), 5.0 + spread(i + 5)),
            );
            if i + 1 == DriftConfig::default().min_requests {
                let s = m.scores();
                let c = s.presets.iter().find(|p| p.preset == "compliant").unwrap();
                assert!(
                    c.drifted,
                    "steered preset not flagged after {} requests: {c:?}",
                    i + 1
                );
            }
        }
        let s = m.scores();
        let d = s.presets.iter().find(|p| p.preset == "default").unwrap();
        assert!(!d.drifted && d.psi.unwrap() < 0.25, "{d:?}");
        let mut text = String::new();
        m.render(&mut text);
        assert!(text.contains("pgate_drift_alert{preset=\"compliant\"} 1"));
        assert!(text.contains("pgate_projection_bucket{preset=\"default\",layers=\"10-13\",direction=\"persona\",le=\"0\"}"));
    }

    #[test]
    fn psi_is_zero_for_the_same_sample() {
        let xs: Vec<f64> = (0..50).map(|i| spread(i)).collect();
        let e = deciles(&xs);
        assert!(psi(&e, &xs, &xs).abs() < 1e-12);
    }
}
