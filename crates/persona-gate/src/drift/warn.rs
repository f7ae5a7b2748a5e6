//! Steering that warns. The paper's advice to steering tools: a persona direction added to the
//! residual stream can be anti-aligned with the refusal direction, and then steering toward the
//! persona quietly steers away from refusal. Any command that applies a plan checks each added
//! direction against the model's refusal direction, when one is known for that model (`--refusal
//! FILE`, or the cache `$PGATE_CACHE/refusal/<model sha256>.safetensors` that `pgate drift`
//! --cache-refusal fills), and prints one line naming the most anti-aligned layer and its cosine.
//!
//! The threshold: cosines of unrelated directions in a d-dimensional residual stream are about
//! `N(0, 1/d)`, so a warning needs `cos < -3/sqrt(d)` (about -0.077 at d = 1536), which a random
//! direction crosses at one layer with probability ~0.1%.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::directions::{cosine, model_sha256, DirectionSet};
use crate::intervene::{InterventionPlan, OpKind};
use crate::model::source::cache_dir;
use crate::model::Model;
use crate::Result;

/// The most anti-aligned added direction of a plan against the refusal direction.
#[derive(Debug, Clone, Serialize)]
pub struct SteeringWarning {
    pub direction: String,
    pub layer: usize,
    /// cos(signed added vector, refusal direction at that layer).
    pub cos: f64,
    pub threshold: f64,
    /// Where the refusal direction came from.
    pub refusal: String,
}

impl SteeringWarning {
    /// The one line a command prints.
    pub fn line(&self) -> String {
        format!(
            "warning: steering with '{}' works against refusal: at layer {} it has cosine {:.3} with the refusal direction ({}; below -{:.3} is flagged); refusal may fall under this plan (--quiet-warnings silences this)",
            self.direction, self.layer, self.cos, self.refusal, self.threshold
        )
    }
}

/// Where the refusal direction of a model with this sha256 is cached.
pub fn cache_path(model_sha256: &str) -> PathBuf {
    cache_dir()
        .join("refusal")
        .join(format!("{model_sha256}.safetensors"))
}

/// Remember `set` as the refusal direction of `model` (when its sha256 is known from the setup
/// sidecar); returns the cache file written.
pub fn remember_refusal(model: &Model, set: &DirectionSet) -> Result<Option<PathBuf>> {
    let Some(sha) = model_sha256(model, false) else {
        return Ok(None);
    };
    let p = cache_path(&sha);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    set.save(&p)?;
    Ok(Some(p))
}

/// The refusal direction known for `model`: `explicit` when given, else the cache entry of its
/// sha256 (from the setup sidecar; nothing is hashed here). `None` when none is known.
pub fn known_refusal(
    model: &Model,
    explicit: Option<&Path>,
) -> Result<Option<(DirectionSet, String)>> {
    if let Some(p) = explicit {
        return Ok(Some((DirectionSet::load(p)?, p.display().to_string())));
    }
    let Some(sha) = model_sha256(model, false) else {
        return Ok(None);
    };
    let p = cache_path(&sha);
    if !p.is_file() {
        return Ok(None);
    }
    Ok(Some((
        DirectionSet::load(&p)?,
        format!("cached for sha256 {}", &sha[..12]),
    )))
}

/// The warning for `plan` against `refusal`, if any added direction is anti-aligned beyond the
/// threshold at any of its layers (the most anti-aligned one is named). Layers the refusal set
/// does not cover, or of another width, are skipped.
pub fn steering_warning(
    plan: &InterventionPlan,
    refusal: &DirectionSet,
    refusal_source: &str,
) -> Option<SteeringWarning> {
    let d = refusal.d_model().max(1);
    let threshold = 3.0 / (d as f64).sqrt();
    let mut worst: Option<SteeringWarning> = None;
    for op in &plan.ops {
        let OpKind::Add { coeff, .. } = op.kind else {
            continue;
        };
        if coeff == 0.0 || op.direction.len() != d {
            continue;
        }
        let sign = coeff.signum();
        let v: Vec<f32> = op.direction.iter().map(|x| x * sign).collect();
        for &l in &op.layers.0 {
            let Ok(r) = refusal.layer(l) else { continue };
            let Some(c) = cosine(&v, r) else { continue };
            if c < -threshold && worst.as_ref().is_none_or(|w| c < w.cos) {
                worst = Some(SteeringWarning {
                    direction: op.direction_name.clone(),
                    layer: l,
                    cos: c,
                    threshold,
                    refusal: refusal_source.to_string(),
                });
            }
        }
    }
    worst
}

/// [`steering_warning`] for a plan applied to `model`, with the refusal direction looked up by
/// [`known_refusal`]. An unreadable `explicit` file is an error; no known direction is `None`.
pub fn warn_for_model(
    plan: &InterventionPlan,
    model: &Model,
    explicit: Option<&Path>,
) -> Result<Option<SteeringWarning>> {
    Ok(known_refusal(model, explicit)?.and_then(|(set, src)| steering_warning(plan, &set, &src)))
}
