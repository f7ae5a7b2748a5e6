//! Runtime persona drift: does what a preset's prompts look like inside the model still match a
//! calibration window? Every served prompt's last-token residual is already projected on the
//! persona and refusal directions per layer window (the engine's `Projector`); this keeps, per
//! preset, a rolling window of those projections and tests it against the calibration window
//! with a **two-sample rank test**.
//!
//! - Calibration: the first `calibration` requests of the calibration preset (`default`: the
//!   model's own persona, no steering).
//! - Score of a preset, once it has `min_requests`: for every (layer window, direction), the
//!   Mann-Whitney U (Wilcoxon rank-sum) test of its last `window` projections against the
//!   calibration's (two-sided; normal approximation with midranks, the tie-corrected variance and
//!   a continuity correction); the smallest p, times the number of pairs tested (Bonferroni), is
//!   the preset's p and `score = -log10(p)`. Over the threshold 3 (p < 0.001 after the
//!   correction) the preset is flagged. A steering vector moves the projections at its layers by
//!   many calibration standard deviations: 8 requests all beyond the calibration's range give
//!   z = 4.3 (p 1.6e-5 per pair, score 3.6 with 16 pairs), flagged from the 8th request.
//!   The response also says where (`persona@8-11`) and by how much (`shift_sd`: mean shift in
//!   calibration standard deviations).
//! - Why not the population stability index (the first version): with decile bins, a
//!   calibration of 32 and windows of 8-32 requests, PSI is noise: an 8-request window leaves at
//!   least two of ten bins empty, which alone adds 1.38 (so every preset, `default` included,
//!   was "drifted" at its 8th request), and with no drift at all its expected value is about
//!   9 (1/n + 1/32), 0.56 at n = 32, over the usual 0.25. A rank test's p means the same at any
//!   window size, and the projections' scale does not matter (ranks only).
//! - Over the threshold: `pgate_drift_alert{preset}` is 1, `pgate_drift_alerts_total` counts the
//!   crossings and one log line names the preset, the pair and the score. `GET /v1/drift`
//!   returns the scores as JSON. Projections also go to Prometheus histograms
//!   (`pgate_projection{preset,layers,direction}`).
//! - False alarms: a preset is tested again at every request, so over a long run a preset
//!   without drift is flagged at about 1 look in 1000 at most (less: the pairs are correlated,
//!   and the correction assumes they are not), and clears again as its window moves on.
//!
//! Cost: one insertion per request and a sort of `calibration + window` values per (layer window,
//! direction); no model work (the projections are computed anyway). `PGATE_SERVE_DRIFT=0` turns
//! it off, for an A/B throughput measurement with `scripts/serve-bench.sh`.

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
    /// Score (-log10 of the corrected p) above which a preset is flagged.
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
            threshold: 3.0,
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

/// A preset's latest score and where it came from.
#[derive(Debug, Clone)]
struct Scored {
    score: f64,
    p: f64,
    at: String,
    shift_sd: f64,
}

#[derive(Debug, Default)]
struct PresetState {
    recent: BTreeMap<Key, VecDeque<f64>>,
    requests: u64,
    alert: bool,
    alerts: u64,
    score: Option<Scored>,
}

#[derive(Debug, Default)]
struct Inner {
    calib: BTreeMap<Key, Vec<f64>>,
    calib_requests: usize,
    presets: BTreeMap<String, PresetState>,
    hist: BTreeMap<(String, Key), Hist>,
}

/// One preset's current score (`GET /v1/drift`).
#[derive(Debug, Clone, Serialize)]
pub struct PresetScore {
    pub preset: String,
    pub requests: u64,
    /// -log10 of the smallest rank-sum p times the pairs tested (None until scored).
    pub score: Option<f64>,
    /// That corrected p (at most 1).
    pub p: Option<f64>,
    /// Where the p is smallest: `persona@10-13`.
    pub at: Option<String>,
    /// There, the mean shift of the window from the calibration, in calibration standard
    /// deviations.
    pub shift_sd: Option<f64>,
    pub drifted: bool,
    pub alerts: u64,
}

/// What `GET /v1/drift` returns.
#[derive(Debug, Clone, Serialize)]
pub struct DriftScores {
    /// False when the monitor is off (`PGATE_SERVE_DRIFT=0`): nothing is recorded or scored.
    pub enabled: bool,
    /// `off (PGATE_SERVE_DRIFT=0)`, `calibrating (k of n requests of PRESET)` or `monitoring`.
    pub status: String,
    pub method: &'static str,
    pub config: DriftConfig,
    pub calibrated: bool,
    pub calibration_requests: usize,
    pub presets: Vec<PresetScore>,
}

/// Rolling projection distributions per preset and their rank test against the calibration.
#[derive(Debug, Default)]
pub struct DriftMonitor {
    pub config: DriftConfig,
    inner: Mutex<Inner>,
}

/// Two-sided p of the Mann-Whitney U (Wilcoxon rank-sum) test that `recent` and `calib` come
/// from one distribution. Normal approximation: midranks for ties, the tie-corrected variance
/// `mn/12 ((N+1) - sum(t^3 - t)/(N(N-1)))` and a continuity correction of 1/2. In the far tail
/// the exact distribution is bounded and the normal one is not, so there the approximation
/// overstates p (errs toward no alarm). 1 when either sample is empty or all values tie.
pub fn rank_sum_p(calib: &[f64], recent: &[f64]) -> f64 {
    let (m, n) = (calib.len() as f64, recent.len() as f64);
    if m == 0.0 || n == 0.0 {
        return 1.0;
    }
    let mut all: Vec<(f64, bool)> = calib
        .iter()
        .map(|&x| (x, false))
        .chain(recent.iter().map(|&x| (x, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut ties) = (0.0, 0.0);
    let mut i = 0;
    while i < all.len() {
        let j = i + all[i..].iter().take_while(|x| x.0 == all[i].0).count();
        // Positions i..j hold ranks i+1..=j; each gets their mean.
        let mid = (i + 1 + j) as f64 / 2.0;
        rank_sum += mid * all[i..j].iter().filter(|x| x.1).count() as f64;
        let t = (j - i) as f64;
        ties += t * t * t - t;
        i = j;
    }
    let big_n = m + n;
    let u = rank_sum - n * (n + 1.0) / 2.0;
    let var = m * n / 12.0 * ((big_n + 1.0) - ties / (big_n * (big_n - 1.0)));
    if var <= 0.0 {
        return 1.0;
    }
    let z = ((u - m * n / 2.0).abs() - 0.5).max(0.0) / var.sqrt();
    erfc(z / std::f64::consts::SQRT_2).min(1.0)
}

/// Complementary error function, fractional error under 1.2e-7 (the Chebyshev fit of Press et
/// al., Numerical Recipes, section 6.2): enough for p-values, and std has none.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = [
        -1.26551223,
        1.00002368,
        0.37409196,
        0.09678418,
        -0.18628806,
        0.27886807,
        -1.13520398,
        1.48851587,
        -0.82215223,
        0.17087277,
    ]
    .iter()
    .rev()
    .fold(0.0, |acc, c| c + t * acc);
    let r = t * (-z * z + poly).exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Mean shift of `recent` from `calib` in `calib`'s standard deviations (0 when it has none).
fn shift_sd(calib: &[f64], recent: &[f64]) -> f64 {
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let (mc, mr) = (mean(calib), mean(recent));
    let var = calib.iter().map(|x| (x - mc).powi(2)).sum::<f64>() / (calib.len().max(2) - 1) as f64;
    if var > 0.0 {
        (mr - mc) / var.sqrt()
    } else {
        0.0
    }
}

fn keys(p: &[WindowProjection]) -> impl Iterator<Item = (Key, f64)> + '_ {
    p.iter().flat_map(|w| {
        [("persona", w.persona), ("refusal", w.refusal)]
            .into_iter()
            .filter_map(move |(d, v)| Some(((w.layers.clone(), d), v?)))
            .filter(|(_, v)| v.is_finite())
    })
}

/// The smallest corrected p over the pairs with at least `min` recent values.
fn score(
    calib: &BTreeMap<Key, Vec<f64>>,
    recent: &BTreeMap<Key, VecDeque<f64>>,
    min: usize,
) -> Option<Scored> {
    let tested: Vec<(&Key, &Vec<f64>, Vec<f64>)> = recent
        .iter()
        .filter(|(_, q)| q.len() >= min.max(1))
        .filter_map(|(k, q)| Some((k, calib.get(k)?, q.iter().copied().collect())))
        .collect();
    let pairs = tested.len() as f64;
    let (k, c, r, p) = tested
        .into_iter()
        .map(|(k, c, r)| {
            let p = rank_sum_p(c, &r);
            (k, c, r, p)
        })
        .min_by(|a, b| a.3.total_cmp(&b.3))?;
    let p = (p * pairs).min(1.0);
    Some(Scored {
        // + 0.0: p = 1 gives 0, not -0.
        score: -p.max(f64::MIN_POSITIVE).log10() + 0.0,
        p,
        at: format!("{}@{}", k.1, k.0),
        shift_sd: shift_sd(c, &r),
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
        let st = inner.presets.entry(preset.to_string()).or_default();
        st.requests += 1;
        if preset == cfg.calibration_preset && inner.calib_requests < cfg.calibration {
            for (k, v) in keys(projections) {
                inner.calib.entry(k).or_default().push(v);
            }
            // The calibration requests themselves are not tested against themselves.
            inner.calib_requests += 1;
            return;
        }
        for (k, v) in keys(projections) {
            let q = st.recent.entry(k).or_default();
            q.push_back(v);
            while q.len() > cfg.window.max(1) {
                q.pop_front();
            }
        }
        if inner.calib_requests < cfg.calibration {
            return;
        }
        let Some(s) = score(&inner.calib, &st.recent, cfg.min_requests) else {
            return;
        };
        let over = s.score > cfg.threshold;
        if over && !st.alert {
            st.alerts += 1;
            eprintln!(
                "[pgate serve] drift: preset {preset} score {:.2} (rank-sum p {:.1e} after correction) at {}, mean shift {:+.1} sd, over the last {} requests exceeds {} (calibration: first {} requests of {})",
                s.score, s.p, s.at, s.shift_sd, cfg.window, cfg.threshold, cfg.calibration, cfg.calibration_preset
            );
        }
        st.alert = over;
        st.score = Some(s);
    }

    /// The current scores.
    pub fn scores(&self) -> DriftScores {
        let g = self.inner.lock().ok();
        let mut presets = Vec::new();
        let (mut calibrated, mut calib_n) = (false, 0);
        if let Some(g) = &g {
            calibrated = g.calib_requests >= self.config.calibration;
            calib_n = g.calib_requests;
            for (name, st) in &g.presets {
                let s = st.score.as_ref();
                presets.push(PresetScore {
                    preset: name.clone(),
                    requests: st.requests,
                    score: s.map(|s| s.score),
                    p: s.map(|s| s.p),
                    at: s.map(|s| s.at.clone()),
                    shift_sd: s.map(|s| s.shift_sd),
                    drifted: st.alert,
                    alerts: st.alerts,
                });
            }
        }
        let c = &self.config;
        let status = if !c.enabled {
            "off (PGATE_SERVE_DRIFT=0): nothing is recorded or scored".to_string()
        } else if !calibrated {
            format!(
                "calibrating ({calib_n} of {} requests of preset {})",
                c.calibration, c.calibration_preset
            )
        } else {
            "monitoring".to_string()
        };
        DriftScores {
            enabled: c.enabled,
            status,
            method: "rank-sum (Mann-Whitney U, normal approximation) of each layer window and direction against the calibration window; score = -log10(smallest p x pairs tested)",
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
        let _ = writeln!(o, "# HELP pgate_drift_score -log10 of the smallest rank-sum p (times the pairs tested) of a preset's recent projections against the calibration window.");
        let _ = writeln!(o, "# TYPE pgate_drift_score gauge");
        for (p, st) in &g.presets {
            if let Some(s) = &st.score {
                let _ = writeln!(o, "pgate_drift_score{{preset=\"{}\"}} {}", esc(p), s.score);
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

    /// Standard normal draws from a fixed linear congruential sequence (Box-Muller).
    struct Normals(u64);
    impl Normals {
        fn uniform(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn next(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
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
            let s = m.scores();
            let c = s.presets.iter().find(|p| p.preset == "compliant").unwrap();
            let n = i + 1;
            assert_eq!(c.score.is_some(), n >= 8, "{c:?}");
            assert_eq!(
                c.drifted,
                n >= 8,
                "steered preset after {n} requests: {c:?}"
            );
        }
        let s = m.scores();
        let d = s.presets.iter().find(|p| p.preset == "default").unwrap();
        assert!(!d.drifted && d.score.unwrap() < 3.0, "{d:?}");
        let c = s.presets.iter().find(|p| p.preset == "compliant").unwrap();
        assert_eq!(c.at.as_deref(), Some("persona@10-13"));
        assert!(c.shift_sd.unwrap() > 4.0, "{c:?}");
        assert_eq!(c.alerts, 1);
        let mut text = String::new();
        m.render(&mut text);
        assert!(text.contains("pgate_drift_alert{preset=\"compliant\"} 1"));
        assert!(text.contains("pgate_drift_alert{preset=\"default\"} 0"));
        assert!(text.contains("pgate_projection_bucket{preset=\"default\",layers=\"10-13\",direction=\"persona\",le=\"0\"}"));
    }

    #[test]
    fn rank_sum_p_matches_hand_computed_values() {
        // erfc against tabulated values.
        for (x, want) in [
            (0.0, 1.0),
            (1.0, 0.157299207),
            (2.0, 0.004677735),
            (3.0, 2.20905e-5),
        ] {
            assert!((erfc(x) / want - 1.0).abs() < 1e-5, "erfc({x})");
        }
        assert!((erfc(-1.0) - 1.842700793).abs() < 1e-7);
        // The same sample: z = 0, p = 1.
        let xs: Vec<f64> = (0..32).map(spread).collect();
        assert_eq!(rank_sum_p(&xs, &xs), 1.0);
        // 8 values above all 32: U = 256, mean 128, sd sqrt(256 * 41 / 12), z = 127.5 / 29.575.
        let above: Vec<f64> = (0..8).map(|i| 10.0 + i as f64).collect();
        let p = rank_sum_p(&xs, &above);
        assert!((p / 1.6244e-5 - 1.0).abs() < 1e-3, "{p}");
        // All tied: no information.
        assert_eq!(rank_sum_p(&[1.0; 5], &[1.0; 3]), 1.0);
        assert_eq!(rank_sum_p(&[], &[1.0]), 1.0);
    }

    /// With no drift, a preset scored at every request over 2,000 requests (16 pairs of Gaussian
    /// projections, as many as SmolLM2's 8 layer windows x 2 directions) is flagged at few looks:
    /// the correction holds the family-wise rate per look under 0.001.
    #[test]
    fn no_drift_is_rarely_flagged() {
        let mut g = Normals(20);
        let draw = |g: &mut Normals| -> Vec<WindowProjection> {
            (0..8)
                .map(|w| WindowProjection {
                    layers: format!("{w}"),
                    persona: Some(g.next()),
                    refusal: Some(3.0 * g.next() + 1.0),
                })
                .collect()
        };
        let m = DriftMonitor::new(DriftConfig::default());
        for _ in 0..32 {
            m.observe("default", &draw(&mut g));
        }
        let (mut looks, mut flagged) = (0, 0);
        for _ in 0..2000 {
            m.observe("other", &draw(&mut g));
            let s = m.scores();
            let o = s.presets.iter().find(|p| p.preset == "other").unwrap();
            if o.score.is_some() {
                looks += 1;
                flagged += o.drifted as usize;
            }
        }
        assert_eq!(looks, 2000 - 7);
        eprintln!("no drift: {flagged} of {looks} looks flagged");
        assert!(flagged <= 10, "{flagged} of {looks} looks flagged");
    }

    #[test]
    fn off_records_nothing() {
        let m = DriftMonitor::new(DriftConfig {
            enabled: false,
            ..DriftConfig::default()
        });
        m.observe("default", &proj(1.0, 2.0));
        let s = m.scores();
        assert!(!s.enabled && s.presets.is_empty() && s.calibration_requests == 0);
        assert!(s.status.starts_with("off"), "{}", s.status);
    }
}
