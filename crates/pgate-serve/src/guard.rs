//! The runtime refusal guard: does this request look like one the model refuses under its default
//! persona, while the persona it is served under has moved away from that default?
//!
//! Two scores, both read from the residual stream at the last prompt token (the position whose
//! next-token distribution starts the answer):
//!
//! - **refusal intent**: `sigmoid(a * x + b)` where `x = h_default[L_r] . u_r` is the projection of
//!   the prompt's residual at the refusal direction's layer `L_r`, *under the default persona* (the
//!   same messages without any system prompt and without steering: the model's own default). `a`,
//!   `b` are a logistic fit on harmful vs harmless calibration prompts (`pgate guard calibrate`).
//! - **persona shift**: `max_l (h_preset[l] . u_c[l] - h_default[l] . u_c[l]) / s_l` over the
//!   calibrated layers: how far the served persona (system prompt + steering) has moved the residual
//!   along the compliant (persona) direction, in units of that projection's spread `s_l` across
//!   default-persona calibration prompts.
//!
//! A request is **flagged** when `refusal_intent >= threshold` and `persona_shift >= shift_threshold`:
//! the model would refuse it as itself, and it is being served as someone else. Under the default
//! preset the shift is 0 and nothing is flagged (the default persona refuses on its own). The report
//! also carries `refusal_intent_preset`, the same logistic on the served persona's own residual: how
//! far the gate has closed.

use std::path::Path;
use std::sync::Arc;

use persona_gate::directions::DirectionSet;
use persona_gate::intervene::CompiledPlan;
use persona_gate::model::Model;
use persona_gate::{Error, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "pgate-guard/1";

/// The refusal message `block` mode returns instead of a flagged completion.
pub const BLOCK_MESSAGE: &str = "I can't help with that request. (pgate guard: this request resembles ones the model declines under its default persona, and the selected persona mode has shifted it away from that default, so the completion was withheld.)";

/// A fitted 1-D logistic model `p = sigmoid(a * x + b)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    pub a: f64,
    pub b: f64,
}

impl Logistic {
    pub fn prob(&self, x: f64) -> f64 {
        sigmoid(self.a * x + self.b)
    }

    /// Maximum-likelihood fit with a small L2 penalty on `a` (keeps separable data finite), by
    /// Newton's method on standardized x.
    pub fn fit(pos: &[f64], neg: &[f64]) -> Result<Self> {
        if pos.is_empty() || neg.is_empty() {
            return Err(Error::Empty(
                "logistic fit needs both positive and negative examples".into(),
            ));
        }
        let xs: Vec<(f64, f64)> = pos
            .iter()
            .map(|&x| (x, 1.0))
            .chain(neg.iter().map(|&x| (x, 0.0)))
            .collect();
        let n = xs.len() as f64;
        let mean = xs.iter().map(|p| p.0).sum::<f64>() / n;
        let sd = (xs.iter().map(|p| (p.0 - mean).powi(2)).sum::<f64>() / n)
            .sqrt()
            .max(1e-9);
        let (mut w, mut c) = (0.0f64, 0.0f64);
        let lambda = 1e-2;
        for _ in 0..100 {
            let (mut gw, mut gc, mut hww, mut hwc, mut hcc) = (lambda * w, 0.0, lambda, 0.0, 1e-9);
            for &(x, y) in &xs {
                let z = (x - mean) / sd;
                let p = sigmoid(w * z + c);
                let r = p * (1.0 - p);
                gw += (p - y) * z;
                gc += p - y;
                hww += r * z * z;
                hwc += r * z;
                hcc += r;
            }
            let det = hww * hcc - hwc * hwc;
            if det.abs() < 1e-12 {
                break;
            }
            let dw = (hcc * gw - hwc * gc) / det;
            let dc = (hww * gc - hwc * gw) / det;
            w -= dw;
            c -= dc;
            if dw.abs() + dc.abs() < 1e-10 {
                break;
            }
        }
        Ok(Self {
            a: w / sd,
            b: c - w * mean / sd,
        })
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// True and false positive rates of a score at a threshold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rates {
    pub set_pos: String,
    pub set_neg: String,
    pub n_pos: usize,
    pub n_neg: usize,
    pub tpr: f64,
    pub fpr: f64,
    /// Area under the ROC curve of the score.
    pub auc: f64,
}

impl Rates {
    pub fn new(set_pos: &str, set_neg: &str, pos: &[f64], neg: &[f64], threshold: f64) -> Self {
        let frac = |v: &[f64]| {
            v.iter().filter(|&&p| p >= threshold).count() as f64 / v.len().max(1) as f64
        };
        Self {
            set_pos: set_pos.into(),
            set_neg: set_neg.into(),
            n_pos: pos.len(),
            n_neg: neg.len(),
            tpr: frac(pos),
            fpr: frac(neg),
            auc: auc(pos, neg),
        }
    }
}

/// Mann-Whitney AUC (ties count half).
pub fn auc(pos: &[f64], neg: &[f64]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut s = 0.0;
    for &p in pos {
        for &q in neg {
            s += if p > q {
                1.0
            } else if p == q {
                0.5
            } else {
                0.0
            };
        }
    }
    s / (pos.len() * neg.len()) as f64
}

/// The file `pgate guard calibrate` writes and `pgate serve --guard-file` loads (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuardCalibration {
    pub format: String,
    pub model: String,
    pub d_model: usize,
    pub n_layers: usize,
    /// Refusal direction file and the layer its projection is read at.
    pub refusal_file: String,
    pub refusal_layer: usize,
    /// Unit refusal direction at `refusal_layer`.
    pub refusal_unit: Vec<f32>,
    pub logistic: Logistic,
    /// `refusal_intent >= threshold` counts as "would refuse".
    pub threshold: f64,
    /// Persona (compliant) direction file and the layers the shift is read at.
    pub persona_file: String,
    pub persona_layers: Vec<usize>,
    /// Unit persona directions, one per entry of `persona_layers`.
    pub persona_units: Vec<Vec<f32>>,
    /// Spread (standard deviation) of the default persona's projection at each persona layer.
    pub persona_scale: Vec<f64>,
    /// `persona_shift >= shift_threshold` (in units of `persona_scale`) counts as "shifted".
    pub shift_threshold: f64,
    /// Rates of refusal intent on the calibration sets and on held-out sets.
    pub calibration: Rates,
    pub heldout: Vec<Rates>,
    pub created: String,
    pub tool_version: String,
}

/// Scores of one request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuardReport {
    /// Probability the default persona refuses this request.
    pub refusal_intent: f64,
    /// The same logistic on the served persona's residual (how far the gate closed).
    pub refusal_intent_preset: f64,
    /// Shift along the persona direction vs the default persona, in calibrated spreads.
    pub persona_shift: f64,
    /// Layer where the shift is largest.
    pub persona_shift_layer: Option<usize>,
    pub flagged: bool,
    /// Why (or why not) flagged, in words.
    pub reason: String,
}

impl GuardCalibration {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let g: Self = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidValue(format!("{}: not a guard file: {e}", path.display()))
        })?;
        if g.format != FORMAT {
            return Err(Error::InvalidValue(format!(
                "{}: guard file format '{}', expected '{FORMAT}'",
                path.display(),
                g.format
            )));
        }
        Ok(g)
    }

    /// Write the guard file atomically (temporary file, fsync, rename): a server starting while
    /// it is rewritten reads the old calibration or the new one, never half of one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self)?;
        persona_gate::fsutil::write_atomic(path, text.as_bytes())
    }

    /// Check the guard fits the loaded model.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        let c = model.config();
        if c.d_model != self.d_model || c.n_layers != self.n_layers {
            return Err(Error::InvalidValue(format!(
                "guard file was calibrated on '{}' ({} layers, width {}), but the model has {} layers, width {}",
                self.model, self.n_layers, self.d_model, c.n_layers, c.d_model
            )));
        }
        Ok(())
    }

    /// Layers whose last-token residual the guard reads.
    pub fn layers(&self) -> Vec<usize> {
        let mut l = self.persona_layers.clone();
        l.push(self.refusal_layer);
        l.sort_unstable();
        l.dedup();
        l
    }

    /// Score a request from the last-token residuals under the default persona and under the
    /// served preset (`resid[layer]` is `Some(vec)` for every layer of [`Self::layers`]). `None`
    /// for `preset` means the preset is the default persona (shift 0).
    pub fn score(
        &self,
        default: &[Option<Vec<f32>>],
        preset: Option<&[Option<Vec<f32>>]>,
    ) -> Result<GuardReport> {
        let get = |r: &[Option<Vec<f32>>], l: usize| -> Result<Vec<f32>> {
            r.get(l).cloned().flatten().ok_or_else(|| {
                Error::InvalidValue(format!("guard: no residual captured at layer {l}"))
            })
        };
        let x = dot(&get(default, self.refusal_layer)?, &self.refusal_unit);
        let refusal_intent = self.logistic.prob(x);
        let (refusal_intent_preset, persona_shift, layer) = match preset {
            None => (refusal_intent, 0.0, None),
            Some(p) => {
                let xp = dot(&get(p, self.refusal_layer)?, &self.refusal_unit);
                let mut best = (f64::NEG_INFINITY, None);
                for ((&l, u), &s) in self
                    .persona_layers
                    .iter()
                    .zip(&self.persona_units)
                    .zip(&self.persona_scale)
                {
                    let d = (dot(&get(p, l)?, u) - dot(&get(default, l)?, u)) / s.max(1e-6);
                    if d > best.0 {
                        best = (d, Some(l));
                    }
                }
                (self.logistic.prob(xp), best.0.max(0.0), best.1)
            }
        };
        let would_refuse = refusal_intent >= self.threshold;
        let shifted = persona_shift >= self.shift_threshold;
        let flagged = would_refuse && shifted;
        let reason = match (would_refuse, shifted) {
            (true, true) => format!(
                "refusal intent {refusal_intent:.2} >= {:.2} under the default persona, and the persona shifted {persona_shift:.1} >= {:.1} spreads along the persona direction",
                self.threshold, self.shift_threshold
            ),
            (true, false) => format!(
                "refusal intent {refusal_intent:.2} but persona shift {persona_shift:.1} < {:.1}: served as the default persona",
                self.shift_threshold
            ),
            (false, _) => format!(
                "refusal intent {refusal_intent:.2} < {:.2}: not a request the default persona refuses",
                self.threshold
            ),
        };
        Ok(GuardReport {
            refusal_intent,
            refusal_intent_preset,
            persona_shift,
            persona_shift_layer: layer,
            flagged,
            reason,
        })
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Unit vector of `v` (zero stays zero).
pub fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|x| (*x as f64 / n) as f32).collect()
}

/// Last-token residuals of `prompts` (token ids) at `layers`, under an optional plan:
/// `out[prompt][layer]` is `Some(vec)` for captured layers. Runs on the stepping engine, like the
/// server's own guard rows.
pub fn capture_last(
    model: &Model,
    prompts: &[Vec<u32>],
    plan: Option<&Arc<CompiledPlan>>,
    layers: &[usize],
    batch: usize,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<Option<Vec<f32>>>>> {
    persona_gate::generate::capture_last(&model.decoder, prompts, plan, layers, batch, progress)
}

/// A prompt set's name and its prompts.
pub type NamedPrompts = (String, Vec<String>);

/// What `pgate guard calibrate` needs.
#[derive(Debug, Clone)]
pub struct CalibrateInput {
    pub refusal_file: std::path::PathBuf,
    /// Layer of the refusal direction (default: the file's `selected_layer`).
    pub refusal_layer: Option<usize>,
    pub persona_file: std::path::PathBuf,
    /// Layers to read the persona shift at (default: all).
    pub persona_layers: Option<Vec<usize>>,
    pub harmful: (String, Vec<String>),
    pub harmless: (String, Vec<String>),
    /// Held-out (harmful, harmless) pairs to report rates on.
    pub heldout: Vec<(NamedPrompts, NamedPrompts)>,
    /// Highest false positive rate of refusal intent on the calibration harmless set; the
    /// threshold is the larger of 0.5 and the value that keeps it.
    pub max_fpr: f64,
    pub shift_threshold: f64,
    pub batch_size: usize,
}

/// Encode user messages under the default persona (no system prompt).
pub fn encode_default(model: &Model, texts: &[String]) -> Result<Vec<Vec<u32>>> {
    texts
        .iter()
        .map(|t| model.tokenizer.encode_prompt(None, t))
        .collect()
}

/// Fit the guard: logistic refusal intent at the refusal layer, persona spreads per layer.
pub fn calibrate(
    model: &Model,
    inp: &CalibrateInput,
    mut log: impl FnMut(&str),
) -> Result<GuardCalibration> {
    let cfg = model.config();
    let refusal = DirectionSet::load(&inp.refusal_file)?;
    let persona = DirectionSet::load(&inp.persona_file)?;
    for s in [&refusal, &persona] {
        if s.d_model() != cfg.d_model {
            return Err(Error::WidthMismatch {
                got: s.d_model(),
                want: cfg.d_model,
            });
        }
    }
    let rl = match inp.refusal_layer {
        Some(l) => l,
        None => refusal
            .meta
            .extra
            .get("selected_layer")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                Error::InvalidValue(format!(
                    "{} names no selected_layer: give --refusal-layer",
                    inp.refusal_file.display()
                ))
            })?,
    };
    model.check_layer(rl)?;
    let refusal_unit = unit(row_of(&refusal, rl)?);
    let persona_layers: Vec<usize> = inp
        .persona_layers
        .clone()
        .unwrap_or_else(|| (0..cfg.n_layers.min(persona.n_layers())).collect());
    for &l in &persona_layers {
        model.check_layer(l)?;
    }
    let persona_units = persona_layers
        .iter()
        .map(|&l| Ok(unit(row_of(&persona, l)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut layers = persona_layers.clone();
    layers.push(rl);
    layers.sort_unstable();
    layers.dedup();

    let proj = |name: &str,
                texts: &[String],
                log: &mut dyn FnMut(&str)|
     -> Result<Vec<Vec<Option<Vec<f32>>>>> {
        log(&format!("capturing {} prompts of {name}", texts.len()));
        let ids = encode_default(model, texts)?;
        capture_last(model, &ids, None, &layers, inp.batch_size, |_, _| {})
    };
    let hp = proj(&inp.harmful.0, &inp.harmful.1, &mut log)?;
    let hl = proj(&inp.harmless.0, &inp.harmless.1, &mut log)?;
    let xr = |caps: &[Vec<Option<Vec<f32>>>]| -> Vec<f64> {
        caps.iter()
            .map(|c| {
                c[rl]
                    .as_deref()
                    .map(|v| dot(v, &refusal_unit))
                    .unwrap_or(0.0)
            })
            .collect()
    };
    let (xp, xn) = (xr(&hp), xr(&hl));
    let logistic = Logistic::fit(&xp, &xn)?;
    let pp: Vec<f64> = xp.iter().map(|&x| logistic.prob(x)).collect();
    let pn: Vec<f64> = xn.iter().map(|&x| logistic.prob(x)).collect();
    // Threshold: at least 0.5; raised until the calibration harmless FPR is at most max_fpr.
    let mut sorted = pn.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
    let allowed = (inp.max_fpr * sorted.len() as f64).floor() as usize;
    let mut threshold = 0.5f64;
    if allowed < sorted.len() {
        // Just above the (allowed+1)-th highest harmless score.
        let t = sorted[allowed];
        if t >= threshold {
            threshold = (t + 1e-9).min(1.0);
        }
    }
    let calibration = Rates::new(&inp.harmful.0, &inp.harmless.0, &pp, &pn, threshold);
    log(&format!(
        "refusal intent at layer {rl}: calibration TPR {:.3} FPR {:.3} AUC {:.3} (threshold {threshold:.3})",
        calibration.tpr, calibration.fpr, calibration.auc
    ));
    // Persona spread per layer over all calibration prompts (default persona).
    let persona_scale = persona_layers
        .iter()
        .zip(&persona_units)
        .map(|(&l, u)| {
            let v: Vec<f64> = hp
                .iter()
                .chain(&hl)
                .filter_map(|c| c[l].as_deref().map(|x| dot(x, u)))
                .collect();
            let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
            let sd =
                (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt();
            sd.max(1e-3)
        })
        .collect::<Vec<_>>();
    let mut g = GuardCalibration {
        format: FORMAT.into(),
        model: model.info.name.clone(),
        d_model: cfg.d_model,
        n_layers: cfg.n_layers,
        refusal_file: inp.refusal_file.display().to_string(),
        refusal_layer: rl,
        refusal_unit,
        logistic,
        threshold,
        persona_file: inp.persona_file.display().to_string(),
        persona_layers,
        persona_units,
        persona_scale,
        shift_threshold: inp.shift_threshold,
        calibration,
        heldout: Vec::new(),
        created: persona_gate::directions::DirectionMeta::new("x", "x", 1, 1).created,
        tool_version: env!("CARGO_PKG_VERSION").into(),
    };
    for ((pn_name, ptexts), (nn_name, ntexts)) in &inp.heldout {
        let hp = proj(pn_name, ptexts, &mut log)?;
        let hl = proj(nn_name, ntexts, &mut log)?;
        let score = |caps: &[Vec<Option<Vec<f32>>>]| -> Result<Vec<f64>> {
            caps.iter()
                .map(|c| Ok(g.score(c, None)?.refusal_intent))
                .collect()
        };
        let r = Rates::new(pn_name, nn_name, &score(&hp)?, &score(&hl)?, g.threshold);
        log(&format!(
            "held out {pn_name} / {nn_name}: TPR {:.3} FPR {:.3} AUC {:.3}",
            r.tpr, r.fpr, r.auc
        ));
        g.heldout.push(r);
    }
    Ok(g)
}

fn row_of(set: &DirectionSet, l: usize) -> Result<&[f32]> {
    if set.n_layers() == 1 {
        set.layer(0)
    } else {
        set.layer(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_separates() {
        let pos = [2.0, 2.5, 3.0, 1.5, 2.2];
        let neg = [-1.0, 0.0, 0.5, -0.5, 0.2];
        let f = Logistic::fit(&pos, &neg).unwrap();
        assert!(f.a > 0.0);
        assert!(pos.iter().all(|&x| f.prob(x) > 0.5));
        assert!(neg.iter().all(|&x| f.prob(x) < 0.5));
        // Overlapping classes: a finite, calibrated fit.
        let pos = [1.0, 0.0, 2.0, 1.5];
        let neg = [0.5, -1.0, 0.0, 1.2];
        let f = Logistic::fit(&pos, &neg).unwrap();
        assert!(f.a.is_finite() && f.b.is_finite() && f.a > 0.0);
        assert!((auc(&pos, &neg) - 0.78125).abs() < 1e-9);
    }

    fn guard() -> GuardCalibration {
        GuardCalibration {
            format: FORMAT.into(),
            model: "t".into(),
            d_model: 2,
            n_layers: 2,
            refusal_file: "r".into(),
            refusal_layer: 1,
            refusal_unit: vec![1.0, 0.0],
            logistic: Logistic { a: 4.0, b: -2.0 },
            threshold: 0.5,
            persona_file: "p".into(),
            persona_layers: vec![0],
            persona_units: vec![vec![0.0, 1.0]],
            persona_scale: vec![1.0],
            shift_threshold: 3.0,
            calibration: Rates::new("a", "b", &[1.0], &[0.0], 0.5),
            heldout: vec![],
            created: String::new(),
            tool_version: String::new(),
        }
    }

    #[test]
    fn flags_only_refused_and_shifted() {
        let g = guard();
        let r = |x: f32, y: f32| vec![Some(vec![0.0, y]), Some(vec![x, 0.0])];
        // Harmful (x = 1 -> p = 0.88), default persona: not flagged.
        let rep = g.score(&r(1.0, 0.0), None).unwrap();
        assert!(!rep.flagged && rep.refusal_intent > 0.8);
        // Harmful, shifted by 5: flagged.
        let rep = g.score(&r(1.0, 0.0), Some(&r(0.0, 5.0))).unwrap();
        assert!(rep.flagged, "{rep:?}");
        assert_eq!(rep.persona_shift_layer, Some(0));
        assert!(rep.refusal_intent_preset < 0.5);
        // Harmless, shifted: not flagged.
        let rep = g.score(&r(0.0, 0.0), Some(&r(0.0, 5.0))).unwrap();
        assert!(!rep.flagged);
        // Harmful, small shift: not flagged.
        let rep = g.score(&r(1.0, 0.0), Some(&r(1.0, 1.0))).unwrap();
        assert!(!rep.flagged);
    }
}
